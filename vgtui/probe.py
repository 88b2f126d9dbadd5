"""The gradient probe: hooks that measure every layer on sampled steps, at one transfer a step.

Everything is computed on the model's device as 0-d tensors, packed into one flat tensor, and
copied to the host once. On CUDA the copy goes into pinned memory without waiting, and the values
are read when a CUDA event says they have arrived (usually on the next step), so the training
loop never stalls on the monitor. Unsampled steps cost nothing but a flag test in each hook.

Order of measurement inside a step (it matters; see wandb#4369):
forward (activation stats) -> backward (‖∂L/∂h‖) -> weight-gradient norms and histograms,
before clipping -> clipping (global norm before and after) -> optimiser step -> update sizes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .build import LayerSpec
from .config import RECTIFYING, SATURATING
from .records import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN, LAYER_METRICS, StepRecord

#: A sigmoid unit within this distance of 0 or 1 (a tanh unit of -1 or 1) counts as saturated:
#: there sigma'(z) < 0.02 (tanh'(z) < 0.04), i.e. the gradient through it is cut 12-25x beyond the
#: already-small 0.25 peak of sigma'.
SATURATION_MARGIN = 0.02
#: Histograms are estimated from at most this many evenly strided entries per layer: enough for a
#: 28-bin shape, and it keeps the cost flat for 1000x1000 weight matrices.
HIST_MAX_ELEMENTS = 65_536

_COLUMNS = len(LAYER_METRICS) + 2  # + forward finite flag, backward finite flag
_SCALARS = 6  # loss, accuracy, grad_norm_total, grad_norm_clipped, clipped, loss finite


@dataclass
class _Pending:
    step: int
    meta: dict
    buffer: torch.Tensor
    event: object | None


class Probe:
    """Measures ``layers`` (input to output) of a model whose trainable parameters are ``params``.

    Use per training step::

        probe.begin(sampled)           # before forward
        ... forward, loss, loss.backward() ...
        probe.after_backward()         # weight-gradient norms + histograms, before clipping
        probe.clip(kind, threshold)    # clips (always) and measures the global norm
        probe.before_step(optimizer)
        optimizer.step()
        probe.finish(step, loss, accuracy, optimizer)  # packs and starts the one transfer
        for rec in probe.poll(): ...   # finished measurements, as StepRecords
    """

    def __init__(self, layers: list[LayerSpec], params: list[nn.Parameter], histograms: bool = True):
        self.layers = layers
        self.names = [layer.name for layer in layers]
        self.params = [p for p in params if p.requires_grad]
        self.histograms = histograms
        self.sampled = False
        self._handles: list = []
        self._act_stats: list[torch.Tensor | None] = [None] * len(layers)
        self._act_grad: list[torch.Tensor | None] = [None] * len(layers)
        self._wgrad: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None
        self._clip: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._pending: deque[_Pending] = deque()
        self._pinned: dict[int, list[torch.Tensor]] = {}
        self._hist_edges = torch.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)
        self.transfers = 0

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> "Probe":
        if self._handles:
            return self
        for index, layer in enumerate(self.layers):
            stats_module = layer.act_module or layer.output_module
            self._handles.append(stats_module.register_forward_hook(self._stats_hook(index, layer.act_kind)))
            self._handles.append(layer.output_module.register_forward_hook(self._grad_hook_installer(index)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stats_hook(self, index: int, kind: str):
        def hook(module, inputs, output):
            if not self.sampled or not isinstance(output, torch.Tensor):
                return
            with torch.no_grad():
                a = output.detach().float()
                std, mean = torch.std_mean(a) if a.numel() > 1 else (a.new_zeros(()), a.mean())
                nan = a.new_full((), float("nan"))
                if kind == "sigmoid":
                    saturated = ((a - 0.5).abs_() > 0.5 - SATURATION_MARGIN).float().mean()
                elif kind == "tanh":
                    saturated = (a.abs() > 1.0 - SATURATION_MARGIN).float().mean()
                else:
                    saturated = nan
                if kind in RECTIFYING and a.dim() >= 2:
                    # A unit is dead for this batch when it is inactive on every example.
                    units = a.transpose(0, 1).reshape(a.shape[1], -1)
                    dead = (units <= 0).all(dim=1).float().mean()
                else:
                    dead = nan
                self._act_stats[index] = torch.stack([mean, std, saturated, dead])

        return hook

    def _grad_hook_installer(self, index: int):
        def on_grad(grad: torch.Tensor) -> None:
            self._act_grad[index] = torch.linalg.vector_norm(grad.detach().float())

        def hook(module, inputs, output):
            if self.sampled and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(on_grad)

        return hook

    # -- the step ------------------------------------------------------------------------------
    def begin(self, sampled: bool) -> None:
        self.sampled = sampled
        if sampled:
            self._act_stats = [None] * len(self.layers)
            self._act_grad = [None] * len(self.layers)
            self._clip = None

    def _weight_grads(self) -> list[torch.Tensor]:
        return [layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
                for layer in self.layers]

    def after_backward(self) -> None:
        """Per-layer ‖∂L/∂W‖ and histograms of log10|∂L/∂W|, before anything rescales them."""
        if not self.sampled:
            return
        grads = self._weight_grads()
        self._wgrad = torch.stack(torch._foreach_norm(grads)).float()
        if self.histograms:
            rows = []
            for g in grads:
                flat = g.detach().reshape(-1)
                if flat.numel() > HIST_MAX_ELEMENTS:
                    flat = flat[:: math.ceil(flat.numel() / HIST_MAX_ELEMENTS)]
                logs = flat.float().abs().log10_().clamp_(HIST_LOG10_MIN, HIST_LOG10_MAX)
                rows.append(torch.histc(logs, HIST_BINS, HIST_LOG10_MIN, HIST_LOG10_MAX))
            self._hist = torch.stack(rows)

    def clip(self, kind: str = "none", threshold: float = 1.0) -> None:
        """Clip all gradients (every step, sampled or not) and measure the global norm on sampled ones."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        if kind == "norm":
            total = torch.nn.utils.clip_grad_norm_(self.params, threshold, foreach=True)
            if self.sampled:
                coef = torch.clamp(threshold / (total + 1e-6), max=1.0)
                self._clip = (total, total * coef, total > threshold)
            return
        if not self.sampled and kind == "none":
            return
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if kind == "value":
            largest = torch.stack(torch._foreach_norm(grads, ord=math.inf)).max()
            torch.nn.utils.clip_grad_value_(self.params, threshold, foreach=True)
            if self.sampled:
                after = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                self._clip = (total, after, largest > threshold)
            return
        self._clip = (total, total, torch.zeros((), dtype=torch.bool, device=total.device))

    def observe_clip(self, total_before: torch.Tensor, total_after: torch.Tensor, acted: torch.Tensor) -> None:
        """Record clipping done by someone else (a user's own ``clip_grad_norm_`` call)."""
        if self.sampled:
            self._clip = (total_before, total_after, acted)

    def _momentum_buffers(self, optimizer) -> tuple[list[torch.Tensor], list[float]] | None:
        """For SGD with momentum the step is exactly lr * buffer: read it instead of copying W."""
        if not isinstance(optimizer, torch.optim.SGD):
            return None
        buffers, lrs = [], []
        for layer in self.layers:
            group = self._group_of(optimizer, layer.weight)
            state = optimizer.state.get(layer.weight, {})
            buf = state.get("momentum_buffer")
            if group is None or group["momentum"] == 0 or group.get("nesterov") or buf is None:
                return None
            buffers.append(buf)
            lrs.append(float(group["lr"]))
        return buffers, lrs

    @staticmethod
    def _group_of(optimizer, param):
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return None

    def before_step(self, optimizer) -> None:
        """Snapshot the layer weights when the update cannot be read from the optimiser's state."""
        self._snapshot = None
        if not self.sampled:
            return
        if isinstance(optimizer, torch.optim.SGD) and self._momentum_buffers(optimizer) is not None:
            return  # momentum buffers exist already (from the second step on)
        self._snapshot = [layer.weight.detach().clone() for layer in self.layers]

    def finish(self, step: int, loss: torch.Tensor, accuracy: torch.Tensor | None, optimizer=None,
               **meta) -> None:
        """Pack this step's measurements into one tensor and start its single device->host copy."""
        if not self.sampled:
            return
        weights = [layer.weight.detach() for layer in self.layers]
        device = weights[0].device
        weight_norm = torch.stack(torch._foreach_norm(weights)).float()
        if self._snapshot is not None:
            update = torch.stack(torch._foreach_norm(torch._foreach_sub(weights, self._snapshot))).float()
        elif optimizer is not None and (mom := self._momentum_buffers(optimizer)) is not None:
            buffers, lrs = mom
            update = torch.stack(torch._foreach_norm(buffers)).float() * torch.tensor(lrs, device=device)
        else:
            update = torch.full((len(weights),), float("nan"), device=device)
        self._snapshot = None
        nan = torch.full((), float("nan"), device=device)
        stats = torch.stack([s if s is not None else nan.expand(4) for s in self._act_stats])
        act_grad = torch.stack([g if g is not None else nan for g in self._act_grad])
        wgrad = self._wgrad if self._wgrad is not None else torch.full_like(weight_norm, float("nan"))
        # A layer that produced no measurement (not reached this step) counts as finite.
        missing_stats = torch.tensor([s is None for s in self._act_stats], device=device)
        missing_grad = torch.tensor([g is None for g in self._act_grad], device=device)
        fwd_finite = torch.isfinite(stats[:, 0]) | missing_stats
        bwd_finite = (torch.isfinite(act_grad) | missing_grad) & torch.isfinite(wgrad)
        per_layer = torch.stack([
            wgrad, act_grad, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3],
            weight_norm, update / weight_norm.clamp_min(1e-30),
            fwd_finite.float(), bwd_finite.float(),
        ], dim=1)
        loss = loss.detach().float().reshape(())
        acc = accuracy.detach().float().reshape(()) if accuracy is not None else nan
        if self._clip is None:
            self.clip("none")
        total, after, acted = self._clip if self._clip is not None else (nan, nan, nan)
        scalars = torch.stack([loss, acc, total.float(), after.float(), acted.float(),
                               torch.isfinite(loss).float()])
        hist = self._hist if (self.histograms and self._hist is not None) else torch.zeros(
            len(weights), HIST_BINS, device=device)
        packed = torch.cat([scalars, per_layer.reshape(-1), hist.reshape(-1)])
        self._wgrad = self._hist = None
        if packed.is_cuda:
            host = self._pinned_buffer(packed.numel())
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append(_Pending(step, meta, host, event))
        else:
            self._pending.append(_Pending(step, meta, packed, None))
        self.transfers += 1

    def _pinned_buffer(self, numel: int) -> torch.Tensor:
        pool = self._pinned.setdefault(numel, [])
        in_use = {id(p.buffer) for p in self._pending}
        for buf in pool:
            if id(buf) not in in_use:
                return buf
        buf = torch.empty(numel, dtype=torch.float32, pin_memory=True)
        pool.append(buf)
        return buf

    def poll(self, wait: bool = False) -> list[StepRecord]:
        """Measurements whose transfer has completed (all of them if ``wait``), oldest first."""
        done = []
        while self._pending:
            head = self._pending[0]
            if head.event is not None and not wait and not head.event.query():
                break
            self._pending.popleft()
            if head.event is not None:
                head.event.synchronize()
            done.append(self._unpack(head))
        return done

    def _unpack(self, pending: _Pending) -> StepRecord:
        values = pending.buffer.numpy().astype(np.float64, copy=True)
        n = len(self.layers)
        loss, acc, total, after, acted, loss_finite = values[:_SCALARS]
        per_layer = values[_SCALARS : _SCALARS + n * _COLUMNS].reshape(n, _COLUMNS)
        hist = values[_SCALARS + n * _COLUMNS :].reshape(n, HIST_BINS)
        layers = {name: per_layer[:, i].copy() for i, name in enumerate(LAYER_METRICS)}
        nonfinite = None
        fwd_bad = np.flatnonzero(per_layer[:, len(LAYER_METRICS)] < 0.5)
        bwd_bad = np.flatnonzero(per_layer[:, len(LAYER_METRICS) + 1] < 0.5)
        if len(fwd_bad):
            nonfinite = (self.names[fwd_bad[0]], "forward")
        elif len(bwd_bad):
            nonfinite = (self.names[bwd_bad[-1]], "backward")  # output -> input: the last index first
        elif loss_finite < 0.5:
            nonfinite = ("loss", "forward")
        return StepRecord(
            step=pending.step,
            loss=float(loss),
            accuracy=float(acc),
            grad_norm_total=float(total),
            grad_norm_clipped=float(after),
            clipped=bool(acted > 0.5),
            layers=layers,
            hist=hist,
            nonfinite=nonfinite,
            **pending.meta,
        )
