"""The gradient probe: measures every layer on sampled steps, at one transfer a step.

It sees each layer's output h through taps (vgtui's own models report them: ``model(x,
taps=[])``) or, for any other model, forward hooks that exist only on sampled steps. Everything
is computed on the model's device as a few vectors, packed into one flat tensor, and copied to
the host once. On CUDA the copy goes into pinned memory without waiting, and the values are read
when a CUDA event says they have arrived (usually on the next step), so the training loop never
stalls on the monitor. On the CPU there is nothing to copy: numpy reads the vectors in place.
Unsampled steps cost nothing.

Two tiers keep the cost near zero. Every sampled step measures the core: loss, global norm and
clipping, per-layer ‖∂L/∂W‖ and ‖∂L/∂h‖, and where values first turn non-finite. Every
``detail_every``-th sampled step also measures the detail: activation mean/std/saturation/dead
units, ‖W‖ and the update ratio, and the gradient histograms (NaN / None on the other steps: not
measured, never invented).

Order of measurement inside a step (it matters; see wandb#4369):
forward (activation stats) -> backward (‖∂L/∂h‖) -> weight-gradient norms and histograms,
before clipping -> clipping (global norm before and after) -> optimiser step -> update sizes.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .engine import (SATURATION_MARGIN, HostSide, Layout, Percentiles, ProbeClock, UpdateMeter, UpdatePlan,
                     WindowMeter, alive_units, downsample_time, first_tensor, measures_dead, pack, recomputing,
                     saturated_mask, strided_sample, time_squares, unit_dim, unpack)
from .layers import LayerSpec
from .records import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN, StepRecord

__all__ = ["Probe", "SATURATION_MARGIN", "HostTransfer", "LogHistograms", "tensor_norms"]
#: Histograms are estimated from at most this many evenly strided entries per layer: enough for
#: a 28-bin shape, and it keeps the cost flat whatever the layer's size (measured: exact
#: histograms of 50 layers cost 3x the training step on a CPU).
HIST_MAX_ELEMENTS = 1024

#: By default the detail tier (activation statistics, update ratios, histograms) is measured on
#: every 10th sampled step: at 10-20 steps/s that still refreshes those views about twice a second.
DETAIL_EVERY = 10

def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor: a float32 vector on their device, in their order.

    CUDA: one fused foreach kernel for them all. CPU: a BLAS dot per large tensor (its square
    root taken once for all), faster than torch's norm kernels there and more accurate (a float32
    dot accumulates in blocks; docs/BENCHMARKS.md has the figures); the small ones (biases) in one foreach call, whose C++ loop beats a
    Python call per tensor. No per-tensor ``sqrt``/``float``/``stack`` work: each is a dispatch
    (a kernel launch on CUDA) that costs more than the arithmetic on small tensors.
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    if device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors)).float()
    squares, small, large_at, small_at = [], [], [], []
    for k, tensor in enumerate(tensors):
        if tensor.numel() >= _LARGE and tensor.dtype is torch.float32:
            flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
            squares.append(torch.dot(flat, flat))
            large_at.append(k)
        else:
            small.append(tensor)
            small_at.append(k)
    parts = []
    if squares:
        parts.append(torch.stack(squares).sqrt_())
    if small:
        parts.append(torch.stack(torch._foreach_norm(small)).float())
    norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    if large_at and small_at:
        norms = norms[_order(tuple(large_at + small_at), device)]
    return norms


def finite_marks(tensors: list[torch.Tensor], norms: torch.Tensor | None = None) -> torch.Tensor:
    """A vector with one value per tensor, finite exactly when every entry of the tensor is.

    A 2-norm cannot decide this alone: a float32 sum of squares overflows to inf long before the
    entries do. CUDA: max |x| (one fused inf-norm kernel). CPU, where that kernel is ~20x slower
    than a 2-norm: the tensors' 2-norms when given and all finite (the usual case, one check);
    otherwise per tensor its 2-norm unless inf (finite or NaN decides already), else dot(x, 0),
    which is 0, or NaN when some entry is inf or NaN, and cannot overflow.
    """
    if not tensors:
        return torch.zeros(0)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, ord=math.inf)).float()
    # All finite, decided by one sum of the (non-negative) norms: torch.isfinite is four kernels.
    # A sum that overflows only sends the check down the exact path below.
    if norms is not None and math.isfinite(float(norms.sum())):  # host: no sync
        return norms
    marks = []
    for k, tensor in enumerate(tensors):
        norm = norms[k] if norms is not None else None
        if norm is not None and not bool(torch.isinf(norm)):
            marks.append(norm)
        elif tensor.dtype in _BLAS_DTYPES:
            flat = tensor.reshape(-1)
            marks.append(torch.dot(flat, _zeros(flat.numel(), flat.dtype)).float())
        else:
            marks.append(torch.linalg.vector_norm(tensor, ord=math.inf).float())
    return torch.stack(marks)


def norms_and_marks(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """2-norms and finite marks (see :func:`finite_marks`) of each tensor, as two vectors.

    CUDA: one pass, a 2-norm accumulated in float64, where the squares of float32 entries cannot
    overflow (n * (3.4e38)^2 is far below 1.8e308): it is finite exactly when every entry is,
    and ``norm * 0`` is the mark (0, or NaN): one read of the tensors instead of two (2-norm and
    max). CPU: the 2-norms, and marks from them where they decide.
    """
    if tensors and tensors[0].device.type != "cpu" and all(t.dtype in _BLAS_DTYPES for t in tensors):
        wide = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
        return wide.float(), (wide * 0).float()
    norms = tensor_norms(tensors)
    return norms, finite_marks(tensors, norms)


def largest_magnitudes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |x| of each tensor (NaN if it holds one), as a vector; on CPU via amax/amin, ~20x
    faster there than the inf-norm."""
    if not tensors:
        return torch.zeros(0)
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, ord=math.inf)).float()
    return torch.stack([torch.maximum(t.amax(), t.amin().neg()).float() if t.numel()
                        else torch.zeros(()) for t in tensors])


#: On CPU, float32 tensors at least this large get their own BLAS dot; smaller ones share a
#: foreach call.
_LARGE = 1 << 14
_BLAS_DTYPES = (torch.float32, torch.float64)
_ZEROS: dict[torch.dtype, torch.Tensor] = {}
_INDICES: dict[tuple, torch.Tensor] = {}


def _index(positions: tuple[int, ...], device) -> torch.Tensor:
    """``positions`` as an index tensor on ``device``, made once: the same layouts come back every
    step, and a fresh index would be a host->device copy (on CUDA, a wait for the queue)."""
    key = (positions, str(device))
    index = _INDICES.get(key)
    if index is None:
        index = _INDICES[key] = torch.tensor(positions, device=device)
    return index


def _order(positions: tuple[int, ...], device) -> torch.Tensor:
    """The index that puts values computed in ``positions`` order back in 0..n-1 order."""
    inverse = [0] * len(positions)
    for i, k in enumerate(positions):
        inverse[k] = i
    return _index(tuple(inverse), device)


def _zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A shared read-only CPU vector of zeros at least ``numel`` long (grown, never written)."""
    zeros = _ZEROS.get(dtype)
    if zeros is None or zeros.numel() < numel:
        zeros = _ZEROS[dtype] = torch.zeros(max(numel, 1 << 16), dtype=dtype)
    return zeros[:numel]


def spread(values: torch.Tensor, present: list[bool], fill: float = math.nan) -> torch.Tensor:
    """``values`` (one per True in ``present``) at their positions in a vector of len(present),
    ``fill`` elsewhere; ``values`` itself when nothing is missing."""
    if all(present):
        return values
    padded = torch.cat([values.float(), torch.full((1,), fill, device=values.device)])
    slots, k = [], 0
    for here in present:
        slots.append(k if here else -1)
        k += here
    return padded[_index(tuple(slots), values.device)]


class LogHistograms:
    """Every layer's histogram of |g| on the recording's log-spaced bins in one bucketize and one
    index_add, from at most HIST_MAX_ELEMENTS evenly strided entries per layer (exact zeros fall
    in the lowest bin; NaN and inf in the highest: "too large to measure")."""

    def __init__(self):
        self._plan = None
        self._ones_cache: torch.Tensor | None = None

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor:
        device = grads[0].device
        sizes = [g.numel() for g in grads]
        if self._plan is None or self._plan[0] != (device, sizes):
            strides = [max(1, math.ceil(n / HIST_MAX_ELEMENTS)) for n in sizes]
            counts = torch.tensor([len(range(0, n, s)) for n, s in zip(sizes, strides)])
            offsets = torch.repeat_interleave(torch.arange(len(grads)) * HIST_BINS, counts).to(device)
            inner = torch.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1, dtype=torch.float64)[1:-1]
            self._plan = ((device, sizes), strides, offsets, inner.float().to(device))
        _, strides, offsets, inner = self._plan
        samples = torch.cat([g.detach().reshape(-1)[::s].float() for g, s in zip(grads, strides)])
        magnitudes = samples.abs_().nan_to_num_(nan=math.inf)
        index = torch.bucketize(magnitudes, inner).add_(offsets)
        # index_add_ into a fixed-size row, not bincount: on CUDA bincount reads the largest
        # index back to size its output, a device synchronisation on every histogram.
        counts = torch.zeros(len(grads) * HIST_BINS, device=device)
        counts.index_add_(0, index, self._ones(index.numel(), device))
        return counts.reshape(len(grads), HIST_BINS)

    def _ones(self, numel: int, device) -> torch.Tensor:
        ones = self._ones_cache
        if ones is None or ones.numel() != numel or ones.device != device:
            ones = self._ones_cache = torch.ones(numel, device=device)
        return ones


class HostTransfer:
    """One device->host copy per measured step. On CUDA the copy goes into pinned memory without
    waiting and is read once a CUDA event says it has landed (usually by the next step)."""

    def __init__(self):
        self._pending: deque = deque()
        self._pool: dict[int, list[torch.Tensor]] = {}
        self.count = 0

    def start(self, packed: torch.Tensor | np.ndarray, tag) -> None:
        """Start copying ``packed``; ``tag`` comes back with its values from :meth:`poll`. A
        numpy array (float64) is on the host already, and is handed back as it is."""
        if isinstance(packed, torch.Tensor) and packed.is_cuda:
            host = self._buffer(packed.numel())
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((tag, host, event))
        else:
            self._pending.append((tag, packed, None))
        self.count += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _buffer(self, numel: int) -> torch.Tensor:
        pool = self._pool.setdefault(numel, [])
        in_use = {id(buffer) for _, buffer, _ in self._pending}
        for buffer in pool:
            if id(buffer) not in in_use:
                return buffer
        buffer = torch.empty(numel, dtype=torch.float32, pin_memory=True)
        pool.append(buffer)
        return buffer

    def poll(self, wait: bool = False) -> list[tuple[object, np.ndarray]]:
        """(tag, float64 values) of every copy that has landed (all of them if ``wait``), in order."""
        done = []
        while self._pending:
            tag, buffer, event = self._pending[0]
            if event is not None and not wait and not event.query():
                break
            self._pending.popleft()
            if event is not None:
                event.synchronize()
            if isinstance(buffer, torch.Tensor):
                buffer = buffer.numpy().astype(np.float64, copy=True)
            done.append((tag, buffer))
        return done


def _charged(method):
    """A step method whose work on a sampled step is the probe's own cost: timed by its clock
    (nothing on unsampled steps, where the method does nothing either)."""

    @functools.wraps(method)
    def charged(self, *args, **kwargs):
        if self.clock is None or not self.sampled:
            return method(self, *args, **kwargs)
        with self.timed():
            return method(self, *args, **kwargs)

    return charged


class Probe:
    """Measures ``layers`` (input to output) of a model whose trainable parameters are ``params``.

    Use per training step::

        probe.begin(sampled)           # before forward
        out = probe.forward(model, x)  # vgtui's models (taps); any other: attach() once, model(x)
        loss = ...
        probe.backward(loss)           # loss.backward(), or with owns_backward one autograd.grad
        probe.after_backward()         # gradient norms + histograms, before clipping
        probe.clip(kind, threshold)    # clips (always) and measures the global norm
        probe.count(step, loss)        # every step: loss and global norm into the step window
        probe.before_step(optimizer)
        optimizer.step()
        probe.finish(step, loss, accuracy, optimizer)  # packs and starts the one transfer
        for rec in probe.poll(): ...   # finished measurements, as StepRecords

    With ``clock=`` (the overhead budget's :class:`vgtui.engine.ProbeClock`) the probe charges its
    own work on sampled steps to it; wrap what is done with the polled records in
    ``probe.timed()``.

    The layout, packing, encodings and update ratios are :mod:`vgtui.engine`'s, shared with
    :func:`vgtui.watch`; this class is the trainer's way of collecting.
    """

    def __init__(self, layers: list[LayerSpec], params: list[nn.Parameter], histograms: bool = True,
                 detail_every: int = DETAIL_EVERY, owns_backward: bool = False, window: bool | None = None,
                 clock: ProbeClock | None = None):
        self.layers = layers
        #: The overhead budget's clock: the probe charges its own work to it (see :meth:`timed`),
        #: so a training loop needs no timing of its own between the calls.
        self.clock = clock
        self._timing = False
        self.layout = Layout(layers, list(params))
        #: The caller runs backward through :meth:`backward`, and ``params`` are every trainable
        #: parameter the loss depends on: ∂L/∂h then comes from the same autograd call, not hooks.
        self.owns_backward = owns_backward
        self.detail_every = max(1, int(detail_every))
        self.detail = False
        self._sampled_count = 0
        self.names = [layer.name for layer in layers]
        self.params = self.layout.params
        self.histograms = histograms
        self.sampled = False
        self._handles: list = []
        self._attached = False
        n = len(layers)
        # Per sampled step: the tensors themselves, reduced later in a few batched kernels rather
        # than a handful of small kernels per layer (that costs more than the step on deep nets).
        self._acts: list[torch.Tensor | None] = [None] * n
        self._out_grads: list[torch.Tensor | None] = [None] * n
        self._outs: list[torch.Tensor | None] = [None] * n  # h itself, for backward()
        self._act_grad: torch.Tensor | None = None
        self._act_grad_max: torch.Tensor | None = None
        self._got_grad: np.ndarray | None = None
        self._has_wgrad: np.ndarray | None = None
        self._series: list[tuple[int, torch.Tensor]] = []
        self._total: torch.Tensor | None = None
        self._wgrad: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None
        self._histograms = LogHistograms()
        self._percentiles = Percentiles()
        self._clip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._plan: UpdatePlan | None = None
        self._meter = UpdateMeter()
        self._transfer = HostTransfer()
        self._nan_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._owners_with_grad: dict[tuple, np.ndarray] = {}
        self._window = WindowMeter()
        #: Count every step's loss into StepRecord.window (a few float operations a step); off
        #: only with ``window=False``.
        self.windowing = window is not False
        #: ... and its global norm: one read of every gradient per step, so by default only on
        #: CUDA (a fused kernel); elsewhere only where clip-by-norm computes it anyway, or when
        #: ``window=True`` asks for the full cost.
        self.norm_windowing = window is True or (window is None and self.device.type == "cuda")
        self._step_norm: torch.Tensor | None = None  # this step's global norm before clipping

    @property
    def device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> "Probe":
        """Hook the model. The hooks exist only while steps are sampled: an unsampled step
        removes them and a sampled one puts them back, so the steps between measurements run
        the model's own fast path (a module with a hook, even one that only tests a flag, goes
        through the slow one: 4.5 % of relu-30-he's step for its 62 hooks)."""
        self._attached = True
        self._install()
        return self

    def detach(self) -> None:
        self._attached = False
        self._remove()

    def _install(self) -> None:
        if self._handles:
            return
        for index, layer in enumerate(self.layers):
            if layer.output_module is None:
                continue
            if layer.act_module is None or layer.act_is_output:
                # h is also the activation: one hook keeps it and asks for its gradient.
                hook = self._output_hook(index, keep_activation=True)
                self._handles.append(layer.output_module.register_forward_hook(hook))
            else:
                self._handles.append(layer.act_module.register_forward_hook(self._keep_activation(index)))
                hook = self._output_hook(index, keep_activation=False)
                self._handles.append(layer.output_module.register_forward_hook(hook))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_activation(self, index: int):
        def hook(module, inputs, output):
            out = first_tensor(output)
            if self.sampled and out is not None and not recomputing():
                self._acts[index] = out.detach()

        return hook

    def _output_hook(self, index: int, keep_activation: bool):
        def hook(module, inputs, output):
            out = first_tensor(output)
            if self.sampled and out is not None and not recomputing():
                if keep_activation:
                    self._acts[index] = out.detach()
                self._keep_output(index, out)

        return hook

    def _keep_output(self, index: int, output: torch.Tensor) -> None:
        """Arrange for ∂L/∂h of layer ``index``: h itself for :meth:`backward`, or a tensor hook."""
        if not output.requires_grad:
            return
        if self.owns_backward:
            self._outs[index] = output
        else:
            def on_grad(grad: torch.Tensor) -> None:
                self._out_grads[index] = grad.detach()

            output.register_hook(on_grad)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)``; on a sampled step ``model(x, taps=[])``, the taps going to :meth:`tapped`.
        For vgtui's own models (``models.Taps``), in place of :meth:`attach`."""
        if not self.sampled:
            return model(x)
        taps: list = []
        out = model(x, taps=taps)
        self.tapped(taps)
        return out

    def tapped(self, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """This sampled step's (activation, h) of every layer, in order, from a model that reports
        them itself (``model(x, taps=[])``, see ``models.Taps``): what the hooks of :meth:`attach`
        would keep, without hooks. A model with a forward hook takes PyTorch's slow call path;
        taps cost nothing (relu-30-he measured every step: 1.209x with hooks, 1.175x with taps)."""
        if not self.sampled:
            return
        if len(taps) != len(self.layers):
            raise ValueError(f"{len(taps)} taps for {len(self.layers)} probed layers")
        for index, (activation, output) in enumerate(taps):
            self._acts[index] = activation.detach()
            self._keep_output(index, output)

    # -- the step ------------------------------------------------------------------------------
    def begin(self, sampled: bool) -> None:
        self.sampled = sampled
        if self._attached:
            self._install() if sampled else self._remove()
        if sampled:
            n = len(self.layers)
            self.detail = self._sampled_count % self.detail_every == 0
            self._sampled_count += 1
            self._acts = [None] * n
            self._out_grads = [None] * n
            self._outs = [None] * n
            self._clip = None

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; on a sampled step (with ``owns_backward``) one
        ``torch.autograd.grad`` call that returns the parameters' gradients and every layer's
        ∂L/∂h together, so no Python hook runs inside backward (a tensor hook per layer cost
        ~30 µs: ~5 % of relu-30-he's step). Gradients are accumulated into ``.grad`` as
        ``backward()`` would."""
        outs = [(k, h) for k, h in enumerate(self._outs) if h is not None]
        self._outs = [None] * len(self.layers)
        if not (self.sampled and self.owns_backward and outs):
            loss.backward()
            return
        params = [p for p in self.params if p.requires_grad]
        grads = torch.autograd.grad(loss, [*params, *(h for _, h in outs)], allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is not None:
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        for (k, _), grad in zip(outs, grads[len(params):]):
            if grad is not None:
                self._out_grads[k] = grad

    def _weight_grads(self) -> list[torch.Tensor]:
        return [layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
                for layer in self.layers]

    @_charged
    def after_backward(self) -> None:
        """Per-layer ‖∂L/∂W‖ (over all of a layer's parameters), ‖∂L/∂h‖ (and per time step for
        recurrent layers) and histograms of |∂L/∂W|, before anything rescales them."""
        if not self.sampled:
            return
        grads = [p.grad for p in self.params]
        present = tuple(k for k, g in enumerate(grads) if g is not None)
        n = len(self.layers)
        # One fused norm over every parameter's gradient serves the global norm and, summed by
        # layer, the per-layer norms.
        if present:
            norms = tensor_norms([grads[k] for k in present])
            self._total = torch.linalg.vector_norm(norms)
            self._wgrad = self.layout.per_layer(norms, None if len(present) == len(grads) else present)
        else:
            self._total = None
            self._wgrad = self._nans(self.device)[1]
        self._has_wgrad = self._layers_with(present)
        self._act_grad, self._act_grad_max = self._activation_gradient_norms()
        self._series = []
        for index, layer in enumerate(self.layers):
            grad = self._out_grads[index]
            if layer.time_dim is not None and grad is not None and grad.dim() > layer.time_dim:
                self._series.append((index, downsample_time(time_squares(grad, layer.time_dim).sqrt())))
        self._out_grads = [None] * n
        if self.histograms and self.detail:
            self._hist = self._histograms(self._weight_grads())

    def _layers_with(self, present: tuple[int, ...]) -> np.ndarray:
        """(n,) bool: layers at least one of whose parameters has a gradient (cached per pattern)."""
        found = self._owners_with_grad.get(present)
        if found is None:
            found = np.zeros(len(self.layers), dtype=bool)
            for k in present:
                if self.layout.owner[k] < len(self.layers):
                    found[self.layout.owner[k]] = True
            self._owners_with_grad[present] = found
        return found

    def _activation_gradient_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖∂L/∂h‖ per layer and a mark finite exactly when every entry of ∂L/∂h is (the 2-norm
        alone cannot tell: a float32 sum of squares overflows long before the entries do); NaN
        for a layer whose gradient never came (marked not measured on unpacking)."""
        present = [g is not None for g in self._out_grads]
        self._got_grad = np.array(present, dtype=bool)
        if not any(present):
            nans = self._nans(self.device)[1]
            return nans, nans
        norms, marks = norms_and_marks([g for g in self._out_grads if g is not None])
        return spread(norms, present), spread(marks, present)

    def _activation_stats(self, device) -> torch.Tensor:
        """(n_layers, 4 + len(ACT_PERCENTILES)): mean, std, saturated fraction, dead fraction,
        batched by shape and kind, then the percentiles of a strided sample of each layer's
        activation, all layers in one sort (detail steps only; from :mod:`vgtui.engine`)."""
        missing = torch.full((4,), float("nan"), device=device)
        rows = [missing] * len(self.layers)
        groups: dict[tuple, list[int]] = {}
        for index, act in enumerate(self._acts):
            if act is not None:
                layer = self.layers[index]
                groups.setdefault((tuple(act.shape), layer.act_kind, unit_dim(layer)), []).append(index)
        for (shape, kind, units_at), members in groups.items():
            stacked = torch.stack([self._acts[i] for i in members]).float()
            flat = stacked.reshape(len(members), -1)
            # mean and std from a sum and a norm: two fast reductions (std_mean is ~10x slower on CPU).
            n = flat.shape[1]
            mean = flat.mean(1)
            mean_sq = torch.linalg.vector_norm(flat, dim=1).square_().div_(n)
            std = (mean_sq - mean.square()).clamp_min_(0).mul_(n / max(n - 1, 1)).sqrt_()
            columns = [mean, std]
            saturated = saturated_mask(flat, kind)
            columns.append(saturated.float().mean(1) if saturated is not None else torch.full_like(mean, float("nan")))
            if measures_dead(kind, shape):
                # A unit (feature or channel) is dead for this batch when inactive on every example.
                columns.append((~alive_units(stacked, units_at, stacked=True)).float().mean(1))
            else:
                columns.append(torch.full_like(mean, float("nan")))
            for row, index in zip(torch.stack(columns, dim=1), members):
                rows[index] = row
        stats = torch.stack(rows)
        samples = [strided_sample(a) if a is not None else stats.new_empty(0) for a in self._acts]
        return torch.cat([stats, self._percentiles(samples)], dim=1)

    def clip(self, kind: str = "none", threshold: float = 1.0) -> None:
        """Clip all gradients (every step, sampled or not) and measure the global norm on sampled
        ones. Clip-by-norm scales by min(1, threshold / (‖g‖ + 1e-6)), as clip_grad_norm_ does.
        Clipping the user asked for is their cost; without it, the norm it measures is ours."""
        if kind == "none" and self.sampled and self.clock is not None:
            with self.timed():
                self._clip_grads(kind, threshold)
        else:
            self._clip_grads(kind, threshold)

    def _clip_grads(self, kind: str, threshold: float) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self._step_norm = None
        if not grads or (kind == "none" and not self.sampled):
            if self.sampled and not grads:
                zero = torch.zeros((), device=self.device)
                self._clip = (zero, zero, zero.bool())
            return
        total = self._total if self.sampled and self._total is not None else None
        if total is None and (kind == "norm" or self.norm_windowing):  # clipping's own, or the window's
            total = torch.linalg.vector_norm(tensor_norms(grads))
        # the window counts a norm known on every step, not one seen only on measured steps
        self._step_norm = total if kind == "norm" or self.norm_windowing else None
        if kind == "norm":
            coef = torch.clamp(threshold / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
            self._clip = (total, total * coef, total > threshold)
        elif kind == "value":
            largest = largest_magnitudes(grads).max() if self.sampled else None
            torch._foreach_clamp_min_(grads, -threshold)
            torch._foreach_clamp_max_(grads, threshold)
            if self.sampled:
                after = torch.linalg.vector_norm(tensor_norms(grads))
                self._clip = (total, after, largest > threshold)
        else:
            self._clip = (total, total, torch.zeros((), dtype=torch.bool, device=total.device))
        self._total = None

    def count(self, step: int, loss: torch.Tensor) -> None:
        """Every step, sampled or not: this step's loss and global gradient norm (before
        clipping) into the step window that the next measured record carries. Call after
        :meth:`clip`. The norm is clip-by-norm's own where it clipped, else one read of the
        gradients where :attr:`norm_windowing` pays for it, else left out of the window."""
        if not self.windowing:
            return
        norm = self._step_norm
        if norm is None and self.norm_windowing:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(tensor_norms(grads)) if grads else torch.zeros((), device=self.device)
        self._step_norm = None
        self._window.add(step, loss, norm)

    @_charged
    def before_step(self, optimizer) -> None:
        """Plan the update measurement (detail steps): read SGD's momentum buffers after the step,
        or keep a copy of the weights now (see :class:`vgtui.engine.UpdateMeter`)."""
        self._plan = None
        if self.sampled and self.detail:
            self._plan = self._meter.plan(self.layout, optimizer)

    @_charged
    def finish(self, step: int, loss: torch.Tensor, accuracy: torch.Tensor | None, optimizer=None,
               **meta) -> None:
        """Pack this step's measurements into one tensor and start its single device->host copy.

        Nothing here copies host data to the device (on CUDA a plain host->device copy waits for
        the whole queue): masks and learning rates stay on the host and are applied on unpacking.
        Core steps pack only the core columns; the detail columns ride on detail steps alone.
        """
        if not self.sampled:
            return
        n = len(self.layers)
        device = self.device
        nan, nans = self._nans(device)
        if self._clip is None:
            self.clip("none")
        # Forward finiteness on every sampled step: a mark per kept activation, non-finite exactly
        # when some entry is (see finite_marks: no sum of squares, which overflows too early).
        reached = [a is not None for a in self._acts]
        if device.type == "cpu" and self._forward_finite(loss):
            # On the CPU reading a value is free, so the forward check runs only when it can find
            # something: a non-finite activation that leaves the loss and every gradient finite
            # was squashed (sigmoid(inf), relu(-inf)) before the next layer saw it.
            act_mark = torch.zeros(n)
        elif any(reached):
            act_mark = spread(finite_marks([a for a in self._acts if a is not None]), reached)
        else:
            act_mark = nans
        core = [self._wgrad if self._wgrad is not None else nans,
                self._act_grad if self._act_grad is not None else nans,
                act_mark,
                self._act_grad_max if self._act_grad_max is not None else nans]
        detail = None
        plan = self._plan
        if self.detail:
            weight_norm = self.layout.per_layer(tensor_norms([p.detach() for p in self.params]))
            update = (UpdateMeter.norms(self.layout, plan, device) if plan is not None
                      else torch.full((n,), math.nan, device=device))
            stats = self._activation_stats(device)
            detail = [stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], weight_norm, update,
                      *stats[:, 4:].unbind(1)]
        acc = accuracy.detach() if accuracy is not None else nan
        total, after, acted = self._clip if self._clip is not None else (nan, nan, nan)
        zero = torch.zeros((), device=device)
        scalars = [loss.detach(), acc, total, after, acted, zero, nan]
        window = self._window.take()
        packed = pack(scalars, core, detail, self._hist if self.detail else None,
                      [series for _, series in self._series], window[0] if window is not None else None)
        host = HostSide(
            step=step, meta=meta, detail=self.detail, reached=np.array(reached, dtype=bool),
            got_grad=self._got_grad if self._got_grad is not None else np.zeros(n, dtype=bool),
            has_wgrad=self._has_wgrad if self._has_wgrad is not None else np.zeros(n, dtype=bool),
            hist=self._hist is not None and self.detail, update_known=plan is not None,
            lrs=plan.lrs if plan is not None else None,
            series=[(index, len(series)) for index, series in self._series],
            window=window[1] if window is not None else None,
        )
        self._acts = [None] * n
        self._plan = None
        self._wgrad = self._hist = self._act_grad = self._act_grad_max = None
        self._got_grad = self._has_wgrad = None
        self._series = []
        self._transfer.start(packed, host)

    def _nans(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A NaN scalar and a NaN per layer on ``device``, made once (read-only placeholders)."""
        if self._nan_cache is None or self._nan_cache[0].device != device:
            self._nan_cache = (torch.full((), math.nan, device=device),
                               torch.full((len(self.layers),), math.nan, device=device))
        return self._nan_cache

    def _forward_finite(self, loss: torch.Tensor) -> bool:
        """Loss and global gradient norm both finite (host tensors only: this reads values)."""
        total = self._clip[0] if self._clip is not None else None
        return math.isfinite(float(loss.detach())) and (total is None or math.isfinite(float(total)))

    @contextmanager
    def timed(self):
        """Charge the enclosed work to the overhead budget's clock (if any); nested uses count
        once. The probe's step methods charge themselves; a caller wraps what it does with the
        finished records (``with probe.timed(): ... probe.poll() ...``)."""
        if self.clock is None or self._timing:
            yield
            return
        self._timing = True
        self.clock.start()
        try:
            yield
        finally:
            self.clock.stop()
            self._timing = False

    @property
    def transfers(self) -> int:
        return self._transfer.count

    @property
    def pending(self) -> int:
        """Measured steps whose values have not been read back yet."""
        return self._transfer.pending

    def poll(self, wait: bool = False) -> list[StepRecord]:
        """Measurements whose transfer has completed (all of them if ``wait``), oldest first."""
        return [unpack(values, self.layout, host)[0] for host, values in self._transfer.poll(wait)]
