"""The total ‖∂L/∂h_t‖ of every layer of a fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``.

A module hook sees only the gradient of the module's *output* tensor: the direct path ∂L/∂y_t.
What the vanishing-gradient-through-time literature means by ∂L/∂h_t is the total derivative,
the direct path plus everything flowing back through the later steps (and, in a stacked module,
through the layers above). The fused kernel never materialises it, and only the last layer's h_t
leaves the module at all: for a loss on the last step the direct path is exactly 0 for every
t < T, which reads as total vanishing even for a healthy LSTM.

So on detail steps the watcher captures what the module was given (input, initial state) and
the gradients that reached what it returned (output, and h_n / c_n when the loss uses them), and
at ``step()`` :func:`total_time_grads` replays the call with the module's own weights, detached,
and back-propagates the captured gradients through the replay with one ``torch.autograd.grad``.
GRU is replayed step by step (PyTorch's gate equations) with a zero tensor added to every layer's
h_t: the gradient reaching each zero tensor is exactly the total ∂L/∂h_t. LSTM and RNN go through
PyTorch's fused kernel instead, one layer at a time (:func:`_fused` says how). The user's graph,
gradients and numbers are untouched. A replay costs about one more forward and backward of the
module, hence detail steps only (docs/BENCHMARKS.md).

Not replayable, so recorded as not measured (no series; one notice): ``PackedSequence`` inputs, and
dropout between stacked layers in training mode (its random masks are gone by the time of the
replay). A bidirectional layer's h_t is its output at t, the forward and reverse halves together.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .engine import RECURRENT, downsample_time, recomputing

__all__ = ["ThroughTime", "total_time_grads", "series_names"]


def series_names(name: str, module: nn.Module) -> list[str]:
    """Keys in ``StepRecord.time_act_grad_norm``: the module's name for a one-layer module,
    ``<name>.l<k>`` per stacked layer otherwise (PyTorch's ``_l<k>`` parameter suffix)."""
    if module.num_layers == 1:
        return [name]
    return [f"{name}.l{k}" for k in range(module.num_layers)]


def refusal(module: nn.Module, x) -> str | None:
    """Why this call cannot be replayed exactly, or None."""
    if isinstance(x, PackedSequence):
        return "PackedSequence input (variable lengths) is not replayed"
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return (f"dropout={module.dropout:g} between stacked layers in training mode: its random masks "
                "cannot be replayed")
    return None


def _weights(module: nn.Module, layer: int, direction: int, dtype: torch.dtype):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")

    def get(kind: str):
        p = getattr(module, kind + suffix, None)
        return None if p is None else p.detach().to(dtype)

    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


def _run_direction(module: nn.Module, xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None,
                   w_hh, b_hh, w_hr, tap: torch.Tensor, reverse: bool):
    """One direction of one layer, step by step; ``xw`` holds the input projections of every t.
    Returns the (tapped) h_t of every t in time order, and the final h and c."""
    steps = xw.shape[0]
    out: list[torch.Tensor | None] = [None] * steps
    lstm = isinstance(module, nn.LSTM)
    gru = isinstance(module, nn.GRU)
    act = torch.relu if not (lstm or gru) and module.nonlinearity == "relu" else torch.tanh
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        gh = h @ w_hh.T
        if b_hh is not None:
            gh = gh + b_hh
        if lstm:
            i, f, g, o = (xw[t] + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.T
        elif gru:
            xr, xz, xn = xw[t].chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
        else:
            h = act(xw[t] + gh)
        h = h + tap[t]  # the zero tap: its gradient is the total ∂L/∂h_t
        out[t] = h
    return torch.stack(out), h, c


def total_time_grads(module: nn.Module, x: torch.Tensor, hx, grad_out: torch.Tensor | None,
                     grad_hn: torch.Tensor | None, grad_cn: torch.Tensor | None,
                     fused: bool | None = None) -> list[torch.Tensor]:
    """‖∂L/∂h_t‖² per time step (t ascending, shape (T,)) for every layer of ``module``, given the
    call's input ``x`` and initial state ``hx`` and the gradients that reached its output and
    final state (None where none did). Gradients stay on the device; nothing is synchronised.
    ``fused``: replay through PyTorch's fused kernel (LSTM and RNN; the default for them) or step
    by step in Python (GRU, whose h_{t-1} also enters outside W_hh, always is)."""
    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    lstm = isinstance(module, nn.LSTM)
    hidden = module.hidden_size
    out_size = module.proj_size if lstm and module.proj_size > 0 else hidden
    dtype = module.weight_ih_l0.dtype
    batched = x.dim() == 3
    x = x.detach().to(dtype)
    if not batched:  # unbatched (T, I): a batch of one
        x = x.unsqueeze(1)
        grad_out = grad_out.unsqueeze(1) if grad_out is not None else None
        grad_hn = grad_hn.unsqueeze(1) if grad_hn is not None else None
        grad_cn = grad_cn.unsqueeze(1) if grad_cn is not None else None
    elif module.batch_first:
        x = x.transpose(0, 1)
        grad_out = grad_out.transpose(0, 1) if grad_out is not None else None
    steps, batch = x.shape[0], x.shape[1]
    h0 = c0 = None
    if hx is not None:
        h0, c0 = hx if lstm else (hx, None)
        h0 = h0.detach().to(dtype)
        c0 = c0.detach().to(dtype) if c0 is not None else None
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    if h0 is None:
        h0 = x.new_zeros(layers * dirs, batch, out_size)
    if lstm and c0 is None:
        c0 = x.new_zeros(layers * dirs, batch, hidden)
    grads = [None if g is None else g.detach().to(dtype) for g in (grad_out, grad_hn, grad_cn)]
    if not any(g is not None for g in grads):
        return [x.new_zeros(steps) for _ in range(layers)]
    if fused is None:
        fused = not isinstance(module, nn.GRU)
    replay = _fused if fused else _unrolled
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuDNN's "weights are not one contiguous chunk" and the like
        per_layer = replay(module, x, h0, c0, *grads)
    return [g.detach().reshape(steps, -1).float().square().sum(dim=1) for g in per_layer]


def _unrolled(module, x, h0, c0, grad_out, grad_hn, grad_cn) -> list[torch.Tensor]:
    """Every step in Python, a zero tap added to every layer's h_t: the taps' gradients."""
    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    lstm = isinstance(module, nn.LSTM)
    out_size = h0.shape[2]
    steps, batch = x.shape[0], x.shape[1]
    taps = [x.new_zeros(steps, batch, dirs * out_size, requires_grad=True) for _ in range(layers)]
    inp = x
    h_n, c_n = [], []
    for k in range(layers):
        halves = []
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh, w_hr = _weights(module, k, d, x.dtype)
            xw = inp @ w_ih.T
            if b_ih is not None:
                xw = xw + b_ih
            tap = taps[k][:, :, d * out_size:(d + 1) * out_size]
            seq, h_last, c_last = _run_direction(module, xw, h0[k * dirs + d], c0[k * dirs + d] if lstm else None,
                                                 w_hh, b_hh, w_hr, tap, reverse=d == 1)
            halves.append(seq)
            h_n.append(h_last)
            c_n.append(c_last)
        inp = torch.cat(halves, dim=2) if dirs > 1 else halves[0]
    outputs, given = _with_grads((inp, grad_out), (torch.stack(h_n), grad_hn),
                                 (torch.stack(c_n) if lstm else None, grad_cn))
    found = torch.autograd.grad(outputs, taps, given, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(found, taps)]


def _with_grads(*pairs):
    outputs, grads = [], []
    for value, grad in pairs:
        if value is not None and grad is not None:
            outputs.append(value)
            grads.append(grad)
    return outputs, grads


_SHADOWS: dict[tuple, nn.Module] = {}


def _shadow(module: nn.Module, input_size: int) -> nn.Module:
    """A one-layer module of the same kind on the meta device: a signature for functional_call."""
    lstm = isinstance(module, nn.LSTM)
    key = (type(module), getattr(module, "nonlinearity", None), input_size, module.hidden_size,
           module.proj_size if lstm else 0, module.bias, module.bidirectional)
    shadow = _SHADOWS.get(key)
    if shadow is None:
        extra = {"proj_size": module.proj_size} if lstm else {"nonlinearity": module.nonlinearity}
        shadow = _SHADOWS[key] = type(module)(input_size, module.hidden_size, num_layers=1, bias=module.bias,
                                              bidirectional=module.bidirectional, device="meta", **extra)
    return shadow


def _fused(module, x, h0, c0, grad_out, grad_hn, grad_cn) -> list[torch.Tensor]:
    """Through PyTorch's own kernel, one layer at a time. h_{t-1} enters an LSTM or RNN step only
    as W_hh h_{t-1}, so each layer is run on [x_t, e_t] with weights [W_ih, W_hh] and e = 0 (same
    forward): ∂L/∂e_{t+1} = W_hh^T ∂L/∂gates_{t+1} is exactly what flows back into h_t through the
    recurrence. The rest of ∂L/∂h_t, the layer output's own gradient (the layers above and the
    module's output) and h_n's, comes from a zero tap on the output. Reverse direction: e_{t-1}."""
    from torch.func import functional_call

    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    lstm = isinstance(module, nn.LSTM)
    out_size = h0.shape[2]
    steps, batch = x.shape[0], x.shape[1]
    extras, taps, outs = [], [], []
    h_n, c_n = [], []
    inp = x
    for k in range(layers):
        extra = x.new_zeros(steps, batch, dirs * out_size, requires_grad=True)
        params = {}
        for d in range(dirs):
            w_ih, w_hh, b_ih, b_hh, w_hr = _weights(module, k, d, x.dtype)
            blocks = [w_ih] + [w_hh if e == d else torch.zeros_like(w_hh) for e in range(dirs)]
            suffix = "_l0" + ("_reverse" if d else "")
            params["weight_ih" + suffix] = torch.cat(blocks, dim=1)
            params["weight_hh" + suffix] = w_hh
            if b_ih is not None:
                params["bias_ih" + suffix], params["bias_hh" + suffix] = b_ih, b_hh
            if w_hr is not None:
                params["weight_hr" + suffix] = w_hr
        state = h0[k * dirs:(k + 1) * dirs]
        if lstm:
            state = (state, c0[k * dirs:(k + 1) * dirs])
        shadow = _shadow(module, inp.shape[2] + dirs * out_size)
        out, last = functional_call(shadow, params, (torch.cat([inp, extra], dim=2), state))
        tap = torch.zeros_like(out, requires_grad=True)
        inp = out + tap
        extras.append(extra)
        taps.append(tap)
        h_last, c_last = last if lstm else (last, None)
        h_n.append(h_last)
        c_n.append(c_last)
    h_n_all = torch.cat(h_n)
    outputs, given = _with_grads((inp, grad_out), (h_n_all, grad_hn), (torch.cat(c_n) if lstm else None, grad_cn))
    found = torch.autograd.grad(outputs, extras + taps, given, allow_unused=True)
    result = []
    for k in range(layers):
        g_extra = found[k] if found[k] is not None else torch.zeros_like(extras[k])
        total = found[layers + k].clone() if found[layers + k] is not None else torch.zeros_like(taps[k])
        for d in range(dirs):
            part = slice(d * out_size, (d + 1) * out_size)
            if d == 0:  # h_t feeds step t+1; h_{T-1} is h_n
                total[:-1, :, part] += g_extra[1:, :, part]
                last = steps - 1
            else:  # the reverse direction's h_t feeds step t-1; h_0 is its h_n
                total[1:, :, part] += g_extra[:-1, :, part]
                last = 0
            if grad_hn is not None:
                total[last, :, part] += grad_hn[k * dirs + d]
        result.append(total)
    return result


class _Call:
    """One captured forward call: what the replay needs, filled in as the gradients arrive."""

    __slots__ = ("x", "hx", "grad_out", "grad_hn", "grad_cn")

    def __init__(self, x, hx):
        self.x, self.hx = x, hx
        self.grad_out = self.grad_hn = self.grad_cn = None

    def setter(self, slot: str):
        def on_grad(grad: torch.Tensor) -> None:
            prev = getattr(self, slot)  # a tensor used twice in the loss: its gradients add
            setattr(self, slot, grad.detach() if prev is None else prev + grad.detach())
        return on_grad


class ThroughTime:
    """Captures each fused recurrent layer's calls on measured steps and turns them into the
    through-time series of one step. ``active()`` says whether this step is measured through time;
    ``fail(exc, where)`` is the watcher's fault handler (a monitor never takes training down)."""

    def __init__(self, active: Callable[[], bool], fail: Callable[[BaseException, str], None]):
        self.active = active
        self.fail = fail
        self.calls: dict[str, list[_Call]] = {}
        self.modules: dict[str, nn.Module] = {}
        self.refused: dict[str, str] = {}  # name -> why, for the steps since the last take()
        self.notified: set[str] = set()
        self.broken: set[str] = set()  # modules whose replay failed once: not replayed again
        self._current: dict[str, _Call] = {}  # the call whose forward is running, per module

    def install(self, specs) -> list:
        """Forward pre-hooks and hooks on every fused recurrent layer; returns their handles."""
        handles = []
        for spec in specs:
            module = spec.output_module
            if isinstance(module, RECURRENT):
                self.modules[spec.name] = module
                handles.append(module.register_forward_pre_hook(self._pre_hook(spec.name), with_kwargs=True))
                handles.append(module.register_forward_hook(self._hook(spec.name)))
        return handles

    def _skip(self) -> bool:
        return (torch.compiler.is_compiling() or not torch.is_grad_enabled() or recomputing()
                or not self.active())

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            try:
                if name in self.broken or self._skip():
                    return None
                x = args[0] if args else kwargs.get("input")
                hx = args[1] if len(args) > 1 else kwargs.get("hx")
                why = refusal(module, x)
                if why is not None:
                    self.refused[name] = why
                    return None
                if isinstance(hx, tuple):
                    hx = tuple(h.detach() for h in hx)
                elif hx is not None:
                    hx = hx.detach()
                call = self._current[name] = _Call(x.detach(), hx)
                self.calls.setdefault(name, []).append(call)
            except Exception as exc:
                self.fail(exc, "a recurrent forward hook")
            return None
        return hook

    def _hook(self, name: str):
        def hook(module, args, output):
            try:
                call = self._current.pop(name, None)
                if call is None:
                    return
                out, state = output
                h_n, c_n = state if isinstance(state, tuple) else (state, None)
                for tensor, slot in ((out, "grad_out"), (h_n, "grad_hn"), (c_n, "grad_cn")):
                    if tensor is not None and tensor.requires_grad:
                        tensor.register_hook(call.setter(slot))
            except Exception as exc:
                self.fail(exc, "a recurrent forward hook")
        return hook

    def take(self) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
        """This step's ‖∂L/∂h_t‖² per t for every stacked layer, pooled over the step's calls
        (micro-batches) as Σ_k ‖∂L_k/∂h_t‖², keyed by series name; and the one-time notices of
        modules this step could not be replayed for (their series are left out: not measured)."""
        calls, self.calls = self.calls, {}
        refused, self.refused = self.refused, {}
        series: dict[str, list[torch.Tensor]] = {}
        notices = []
        for name, why in refused.items():
            if name not in self.notified:
                self.notified.add(name)
                notices.append(f"{name}: ‖∂L/∂h_t‖ through time not measured ({why})")
        for name, captured in calls.items():
            if name in refused:
                continue  # one call of the step is missing: the pooled series would be wrong
            module = self.modules[name]
            pooled: list[torch.Tensor] | None = None
            try:
                for call in captured:
                    if call.grad_out is None and call.grad_hn is None and call.grad_cn is None:
                        continue  # its output never reached the loss
                    squares = total_time_grads(module, call.x, call.hx, call.grad_out, call.grad_hn, call.grad_cn)
                    if pooled is None or pooled[0].shape != squares[0].shape:
                        pooled = squares  # calls of another length: the latest length wins
                    else:
                        pooled = [a + b for a, b in zip(pooled, squares)]
            except Exception as exc:  # this module's series only: every other measurement goes on
                self.broken.add(name)
                notices.append(f"{name}: ‖∂L/∂h_t‖ through time not measured from now on "
                               f"(the replay failed: {type(exc).__name__}: {exc})")
                continue
            if pooled is not None:
                series.update(zip(series_names(name, module), pooled))
        return series, notices

    def series(self, grad_scale) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
        """(name, ‖∂L/∂h_t‖ downsampled to ≤ TIME_POINTS) for the step, the gradient scale (AMP's
        1/S, DDP's 1/R) applied, and the notices to show."""
        squares, notices = self.take()
        out = []
        for name, sq in squares.items():
            norms = sq.sqrt()
            if grad_scale is not None:
                norms = norms * grad_scale
            out.append((name, downsample_time(norms.float())))
        for notice in notices:
            warnings.warn(f"vgtui: {notice}", stacklevel=2)
        return out, notices
