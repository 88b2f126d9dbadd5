"""The one measuring engine behind both ways of training under vgtui: the trainer's
:class:`vgtui.probe.Probe` and the user's loop under :func:`vgtui.watch`.

They differ only in how they *collect* (the trainer: taps from vgtui's own models and one
``torch.autograd.grad`` call; ``watch``: hooks that exist on measured steps only, pooled over
micro-batches and ranks). Everything after collection is here and nowhere else: which parameters
make up a layer (:class:`Layout`), the activation thresholds, the update-ratio path
(:class:`UpdateMeter`), the one column layout packed into one tensor per measured step
(:func:`pack`) and the one unpacking into a :class:`~vgtui.records.StepRecord` (:func:`unpack`),
with one encoding for "not measured" (NaN *and* a mark in ``StepRecord.unmeasured``) apart from
non-finite (NaN or inf with no mark).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import RECTIFYING
from .layers import LayerSpec
from .records import (ACT_PERCENTILE_METRICS, ACT_PERCENTILES, ACT_SAMPLE_ELEMENTS, HIST_BINS, LAYER_METRICS,
                      TIME_POINTS, StepRecord, StepWindow)

#: A sigmoid unit within this distance of 0 or 1 (a tanh unit of -1 or 1) counts as saturated:
#: there sigma'(z) < 0.02 (tanh'(z) < 0.04), i.e. the gradient through it is cut 12-25x beyond the
#: already-small 0.25 peak of sigma'.
SATURATION_MARGIN = 0.02
SATURATING = ("sigmoid", "tanh")

#: Activation modules recognised when applied directly to a layer's output (kind names as in
#: presets and ``RunHeader.layer_kinds``).
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
}

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


#: Parameterless modules of other libraries recognised by their class name (``transformers``'
#: ``NewGELUActivation``, ``SiLUActivation``, ...), most specific first.
_ACTIVATION_NAMES = (("leakyrelu", "leaky_relu"), ("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"),
                     ("elu", "elu"), ("relu", "relu"), ("tanh", "tanh"), ("sigmoid", "sigmoid"))


def activation_kind(module: nn.Module) -> str | None:
    for cls, kind in ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return kind
    name = type(module).__name__.lower()
    if not name.endswith("activation") or any(True for _ in module.parameters()):
        return None
    return next((kind for key, kind in _ACTIVATION_NAMES if key in name), None)


def out_of_place(module: nn.Module) -> nn.Module:
    """The activation module as a function that never writes into its input (a shallow copy with
    ``inplace=False``): the engine applies it to a copy of h to measure what follows the layer."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module


def first_tensor(output) -> torch.Tensor | None:
    """The main tensor of a module's output: itself, the first tensor of a tuple or list (LSTM:
    the sequence of h_t), the first tensor value of a dict (HF ``ModelOutput``); else None."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output[:2]:
            if isinstance(item, torch.Tensor):
                return item
        return None
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def recomputing() -> bool:
    """Inside backward: a forward run again by activation checkpointing. Its outputs only refill
    saved tensors (the gradient flows through the first forward's), so hooks must ignore it."""
    return torch._C._current_graph_task_id() != -1


# -- activation thresholds: the one definition of saturated and dead ------------------------------
def saturated_mask(a: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Where ``a`` (activations of ``kind``) sits within SATURATION_MARGIN of an asymptote."""
    if kind == "sigmoid":
        return (a - 0.5).abs() > 0.5 - SATURATION_MARGIN
    if kind == "tanh":
        return a.abs() > 1.0 - SATURATION_MARGIN
    return None


def alive_units(a: torch.Tensor, unit_dim: int = 1, stacked: bool = False) -> torch.Tensor:
    """Whether each unit (feature, channel, or hidden unit of a sequence: dimension ``unit_dim``
    of one activation) was active (> 0) on any example and position of the batch: (units,), or
    (members, units) for ``stacked`` activations of several layers of one shape."""
    if stacked:
        moved = a.movedim(unit_dim + 1 if unit_dim >= 0 else unit_dim, -1)
        return moved.reshape(a.shape[0], -1, moved.shape[-1]).amax(1) > 0
    moved = a.movedim(unit_dim, -1)
    return moved.reshape(-1, moved.shape[-1]).amax(0) > 0


def strided_sample(a: torch.Tensor) -> torch.Tensor:
    """At most ACT_SAMPLE_ELEMENTS evenly strided entries of ``a`` (flattened), as a float32
    copy: small whatever the layer's size, and unchanged by later in-place ops on ``a`` (a
    residual ``out += identity``, ``ReLU(inplace=True)``) before it is sorted at the step's end."""
    flat = a.detach().reshape(-1)
    return flat[::max(1, math.ceil(flat.numel() / ACT_SAMPLE_ELEMENTS))].to(torch.float32, copy=True)


class Percentiles:
    """ACT_PERCENTILES of several 1-D samples at once: one padded sort and two gathers on their
    device, interpolated linearly as ``torch.quantile`` does. The gather plan depends only on the
    sample lengths (known on the host) and is kept, so no host data is copied to the device on a
    measured step once the shapes settle. A sample with a NaN yields NaN at and above it."""

    PLANS = 8  # kept plans: alternating batch sizes (a last, shorter batch) reuse theirs

    def __init__(self):
        self._plans: dict = {}

    def __call__(self, samples: list[torch.Tensor]) -> torch.Tensor:
        """(len(samples), len(ACT_PERCENTILES)) float32; an empty sample gives a NaN row."""
        device = samples[0].device
        lengths = tuple(s.numel() for s in samples)
        plan = self._plans.get((device, lengths))
        if plan is None:
            q = np.array(ACT_PERCENTILES, dtype=np.float64) / 100.0
            pos = np.array([q * max(n - 1, 0) for n in lengths]).reshape(len(lengths), len(q))
            lo = np.floor(pos)
            hi = np.minimum(lo + 1, np.maximum(np.array(lengths)[:, None] - 1, 0))
            empty = torch.tensor([n == 0 for n in lengths], device=device)
            plan = (torch.from_numpy(lo.astype(np.int64)).to(device), torch.from_numpy(hi.astype(np.int64)).to(device),
                    torch.from_numpy((pos - lo).astype(np.float32)).to(device), empty)
            if len(self._plans) >= self.PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[(device, lengths)] = plan
        lo, hi, frac, empty = plan
        padded = torch.nn.utils.rnn.pad_sequence([s.reshape(-1).float() for s in samples], batch_first=True,
                                                 padding_value=math.inf)
        if padded.shape[1] == 0:
            padded = torch.full((len(samples), 1), math.inf, device=device)
        ordered = padded.sort(dim=1).values
        below, above = ordered.gather(1, lo), ordered.gather(1, hi)
        # below + frac·(above - below), but exactly ``below`` where frac is 0 (so inf stays inf)
        values = torch.where(frac == 0, below, torch.lerp(below, above, frac))
        return values.masked_fill_(empty[:, None], math.nan)


def measures_dead(kind: str, shape: tuple) -> bool:
    return kind in RECTIFYING and len(shape) >= 2


def unit_dim(spec: LayerSpec) -> int:
    """Which dimension of h holds the units: channels/features (1), the last one for sequences."""
    return -1 if spec.time_dim is not None else 1


# -- layers and their parameters ----------------------------------------------------------------
def spec_params(spec: LayerSpec) -> list[nn.Parameter]:
    """The parameters a layer covers: ``spec.params`` when given, else every trainable parameter
    of its output module (recursively), else its weight."""
    if spec.params is not None:
        return [p for p in spec.params if p.requires_grad]
    if spec.output_module is not None:
        params = [p for p in spec.output_module.parameters() if p.requires_grad]
        if any(p is spec.weight for p in params) or spec.weight is None:
            return params
    return [spec.weight] if spec.weight is not None and spec.weight.requires_grad else []


class Layout:
    """Layers in order, and which trainable parameters each covers.

    A parameter belongs to the first layer that claims it; a later layer that holds the same
    tensor (tied weights) is recorded in :attr:`tied` and its weight metrics are not measured, so
    a shared tensor is measured once. ‖∂L/∂W‖, ‖W‖ and ‖ΔW‖ of a layer are norms over all of its
    parameters (weights and biases, every gate and every stacked layer of an RNN) taken as one
    vector: the root of the sum of their squared norms.
    """

    def __init__(self, specs: list[LayerSpec], params: list[nn.Parameter]):
        self.specs = specs
        self.names = [spec.name for spec in specs]
        self.kinds = [spec.act_kind for spec in specs]
        n = len(specs)
        owner: dict[int, int] = {}
        self.layer_params: list[list[nn.Parameter]] = []
        holders: dict[int, list[int]] = {}
        for index, spec in enumerate(specs):
            mine = []
            for p in spec_params(spec):
                holders.setdefault(id(p), [])
                if index not in holders[id(p)]:
                    holders[id(p)].append(index)
                if id(p) not in owner:
                    owner[id(p)] = index
                    mine.append(p)
            self.layer_params.append(mine)
        #: layer name -> the other layers holding one of its tensors (both ways round)
        self.tied: dict[str, list[str]] = {}
        for layers in holders.values():
            for i in layers:
                for j in layers:
                    others = self.tied.setdefault(self.names[i], []) if j != i else None
                    if others is not None and self.names[j] not in others:
                        others.append(self.names[j])
        seen: set[int] = set()
        self.params = []  # every trainable parameter, once: layers' first, in layer order
        for mine in self.layer_params:
            for p in mine:
                seen.add(id(p))
                self.params.append(p)
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.owner = [owner.get(id(p), n) for p in self.params]  # n: in no layer
        self.has_params = np.array([bool(mine) for mine in self.layer_params])
        self._segments: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def per_layer(self, norms: torch.Tensor, positions: tuple[int, ...] | None = None) -> torch.Tensor:
        """Per-layer norms from the norms of ``self.params`` (or of those at ``positions``): the
        root of each layer's sum of squares, in one index_add on the device (0 where a layer had
        none of them)."""
        owners = tuple(self.owner) if positions is None else tuple(self.owner[k] for k in positions)
        key = (owners, str(norms.device))
        index = self._segments.get(key)
        if index is None:
            index = self._segments[key] = torch.tensor(owners, device=norms.device)
        n = len(self.specs)
        sums = torch.zeros(n + 1, device=norms.device, dtype=torch.float32)
        sums.index_add_(0, index, norms.float().square())
        return sums[:n].sqrt()

    def per_layer_sq(self, squares: torch.Tensor, positions: tuple[int, ...] | None = None) -> torch.Tensor:
        """(n + 1,) float64: each layer's sum of the squared norms ``squares`` of ``self.params``
        (or of those at ``positions``), and last the parameters in no layer. Sums of squares add
        across the shards of a sharded model (the square root is taken after the reduce)."""
        owners = tuple(self.owner) if positions is None else tuple(self.owner[k] for k in positions)
        key = (owners, str(squares.device))
        index = self._segments.get(key)
        if index is None:
            index = self._segments[key] = torch.tensor(owners, device=squares.device)
        sums = torch.zeros(len(self.specs) + 1, device=squares.device, dtype=torch.float64)
        return sums.index_add_(0, index, squares.double())


# -- optimizers as users hold them --------------------------------------------------------------
def unwrap_optimizer(optimizer):
    """The torch optimizer inside the wrappers users are handed: accelerate's
    ``AcceleratedOptimizer`` (``.optimizer``), Lightning's ``LightningOptimizer``
    (``._optimizer``), and any wrapper exposing the wrapped one as ``.optimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def hook_optimizer_step(optimizer, callback):
    """Register ``callback`` to run after each ``optimizer.step()``; None when the optimizer does
    not support step hooks (then the engine reads the update at the next step instead)."""
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    try:
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: callback())
    except Exception:  # a subclass that skipped Optimizer.__init__: no hook tables
        return None


@dataclass
class UpdatePlan:
    kind: str  # "momentum" (‖ΔW‖ = lr·‖buffer‖) or "snapshot" (‖W_after - W_before‖)
    tensors: list[torch.Tensor]
    positions: tuple[int, ...]  # which of layout.params the tensors belong to
    lrs: np.ndarray | None = None  # per layer, momentum only


class UpdateMeter:
    """‖ΔW‖ of each layer over one optimiser step, the one way both paths measure it.

    Plain SGD with momentum steps each parameter by exactly lr·buffer: the buffers are read after
    the step and nothing is copied. Anything else is measured as the difference from a copy taken
    before the step, so a parameter the optimizer skipped (no gradient this step,
    ``zero_grad(set_to_none=True)``, an AMP-skipped step) moved 0, never a stale momentum value.
    """

    def plan(self, layout: Layout, optimizer, can_wait_for_step: bool = True) -> UpdatePlan:
        inner = unwrap_optimizer(optimizer) if optimizer is not None else None
        if can_wait_for_step and isinstance(inner, torch.optim.SGD):
            plan = self._momentum(layout, inner)
            if plan is not None:
                return plan
        positions = tuple(k for k, owner in enumerate(layout.owner) if owner < len(layout))
        return UpdatePlan("snapshot", [layout.params[k].detach().clone() for k in positions], positions)

    def _momentum(self, layout: Layout, optimizer) -> UpdatePlan | None:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        buffers, positions = [], []
        lrs = np.zeros(len(layout))
        for k, (param, owner) in enumerate(zip(layout.params, layout.owner)):
            if owner >= len(layout) or param.grad is None:
                continue  # skipped by SGD this step: it moves 0
            group = groups.get(id(param))
            buf = optimizer.state.get(param, {}).get("momentum_buffer") if group is not None else None
            if (group is None or not group.get("momentum") or group.get("nesterov")
                    or group.get("maximize") or buf is None or not isinstance(group["lr"], (int, float))):
                return None
            lr = float(group["lr"])
            if lrs[owner] not in (0.0, lr):
                return None  # one layer under several learning rates: measure it directly
            lrs[owner] = lr
            buffers.append(buf)
            positions.append(k)
        return UpdatePlan("momentum", buffers, tuple(positions), lrs)

    @staticmethod
    def norms(layout: Layout, plan: UpdatePlan, device) -> torch.Tensor:
        """Per-layer ‖ΔW‖ (momentum plans: ‖buffer‖, to be multiplied by ``plan.lrs`` on the host)."""
        if not plan.positions:
            return torch.zeros(len(layout), device=device)
        if plan.kind == "snapshot":
            now = [layout.params[k].detach() for k in plan.positions]
            diffs = torch._foreach_sub(now, plan.tensors)
            norms = torch.stack(torch._foreach_norm(diffs)).float()
        else:
            norms = torch.stack(torch._foreach_norm(plan.tensors)).float()
        return layout.per_layer(norms, plan.positions)


# -- through time ---------------------------------------------------------------------------------
_TIME_INDEX: dict[tuple, torch.Tensor] = {}


def time_points(length: int) -> int:
    return min(length, TIME_POINTS)


def downsample_time(values: torch.Tensor) -> torch.Tensor:
    """At most TIME_POINTS evenly spaced entries of a per-time-step vector, first and last kept."""
    length = values.shape[0]
    if length <= TIME_POINTS:
        return values
    key = (length, str(values.device))
    index = _TIME_INDEX.get(key)
    if index is None:
        picks = np.unique(np.round(np.linspace(0, length - 1, TIME_POINTS)).astype(np.int64))
        index = _TIME_INDEX[key] = torch.tensor(picks, device=values.device)
    return values[index]


def time_squares(grad: torch.Tensor, time_dim: int) -> torch.Tensor:
    """‖∂L/∂h_t‖² for each t of a sequence gradient whose time axis is ``time_dim``."""
    g = grad.detach().movedim(time_dim, 0)
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1).float(), dim=1).square()


# -- every step, between measured ones -----------------------------------------------------------
class WindowMeter:
    """Loss and global gradient norm of every optimiser step, accumulated between measured steps
    and carried by the next measured step's record as a :class:`~vgtui.records.StepWindow`: a
    spike between samples stays visible, with its step. On CUDA the sums stay on the device (a
    few scalar kernels a step, no host sync); on the CPU, where reading a value waits for nothing,
    they are Python floats (a torch call per scalar costs more there than the arithmetic).

    The loss comes with every step; the norm only where the caller has it (``norm=None``: not
    seen this step), so the window counts the steps whose norm it saw."""

    VALUES = 10  # (loss, norm) x (min, max, sum, last, step of the max)

    def __init__(self):
        self.steps = 0
        self.norm_steps = 0
        self.first_step = 0
        self._min = self._max = self._sum = self._last = self._at = None

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None = None) -> None:
        if not loss.is_cuda:
            self._add_host(step, float(loss.detach()), None if norm is None else float(norm.detach()))
        else:
            self._add_device(step, loss, norm)
        self.steps += 1
        self.norm_steps += norm is not None

    def _add_host(self, step: int, loss: float, norm: float | None) -> None:
        if self.steps == 0:
            self.first_step = step
            self._min, self._max, self._sum, self._last, self._at = [loss, None], [loss, None], [loss, 0.0], \
                [loss, None], [step, None]
        else:
            self._fold(0, step, loss)
        if norm is None:
            return
        if self.norm_steps == 0:
            self._min[1] = self._max[1] = self._last[1] = norm
            self._sum[1], self._at[1] = norm, step
        else:
            self._fold(1, step, norm)

    def _fold(self, k: int, step: int, v: float) -> None:
        if v > self._max[k]:  # as torch.where(value > max): False for NaN either side
            self._at[k] = step
        self._min[k] = v if math.isnan(v) or v < self._min[k] else self._min[k]
        self._max[k] = v if math.isnan(v) or v > self._max[k] else self._max[k]
        self._sum[k] += v
        self._last[k] = v

    def _add_device(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        loss = loss.detach().float().reshape(())
        # (loss, norm) in one vector; without a norm the loss stands in and its slot is kept as it was
        value = torch.stack([loss, norm.detach().float().reshape(()) if norm is not None else loss])
        if self.steps == 0:
            self.first_step = step
            self._min, self._max, self._sum, self._last = value, value, value.double(), value
            self._at = torch.full((2,), float(step), device=value.device)
            return
        at = torch.where(value > self._max, float(step), self._at)
        low = torch.minimum(self._min, value)
        high = torch.maximum(self._max, value)  # NaN propagates: a NaN step shows
        total = self._sum + value
        last = value
        if norm is None or self.norm_steps == 0:  # rare: only where the norm comes on some steps
            loss_only = torch.arange(2, device=value.device) == 0  # made there: no host->device copy
            if norm is None:  # the norm's slot stays
                keep = (self._at, self._min, self._max, self._sum, self._last)
            else:  # the first norm seen starts its slot
                keep = (torch.full_like(self._at, float(step)), value, value, value.double(), value)
            at, low, high, total, last = (torch.where(loss_only, new, old) for new, old in
                                          zip((at, low, high, total, last), keep))
        self._at, self._min, self._max, self._sum, self._last = at, low, high, total, last

    def take(self):
        """The window's values (a device tensor, or a numpy array on the CPU) and (steps, first
        step, steps whose norm was seen); the next window starts empty."""
        if not self.steps:
            return None
        meta = (self.steps, self.first_step, self.norm_steps)
        if isinstance(self._min, list):
            nan = math.nan
            values = np.array([*self._min, *self._max, *self._sum, *self._last, *self._at], dtype=np.float64)
            if not self.norm_steps:
                values[1::2] = nan
        else:
            values = torch.cat([self._min, self._max, self._sum.float(), self._last, self._at])
        self.__init__()
        return values, meta


def window_record(values: np.ndarray, meta: tuple[int, ...]) -> StepWindow:
    steps, first_step = meta[0], meta[1]
    norm_steps = meta[2] if len(meta) > 2 else steps
    lo, hi, total, last, at = values[0:2], values[2:4], values[4:6], values[6:8], values[8:10]
    norm = norm_steps > 0
    return StepWindow(steps=steps, first_step=first_step,
                      loss_min=float(lo[0]), loss_max=float(hi[0]), loss_mean=float(total[0]) / steps,
                      loss_last=float(last[0]), loss_max_step=int(at[0]),
                      grad_norm_min=float(lo[1]) if norm else None, grad_norm_max=float(hi[1]) if norm else None,
                      grad_norm_mean=float(total[1]) / norm_steps if norm else None,
                      grad_norm_last=float(last[1]) if norm else None,
                      grad_norm_max_step=int(at[1]) if norm else None, grad_norm_steps=norm_steps)


# -- the one packing ------------------------------------------------------------------------------
#: loss, accuracy, global ‖g‖ before and after clipping, clipped, AMP-skipped, AMP loss scale.
SCALARS = 7
#: Per layer on every measured step: ‖∂L/∂W‖, ‖∂L/∂h‖, a forward mark and a backward mark (each
#: finite exactly when every entry of h, of ∂L/∂h, is).
CORE_COLUMNS = 4
#: Per layer on detail steps also: mean, std, saturated, dead, ‖W‖, ‖ΔW‖, then the activation
#: percentiles (ACT_PERCENTILES, low to high).
DETAIL_COLUMNS = 6 + len(ACT_PERCENTILES)


@dataclass
class HostSide:
    """What a measured step knows on the host, kept beside its packed values until they land."""

    step: int
    meta: dict
    detail: bool
    reached: np.ndarray  # (n,) bool: the layer produced an activation this step
    got_grad: np.ndarray  # (n,) bool: ∂L/∂h reached it
    has_wgrad: np.ndarray  # (n,) bool: a gradient reached at least one of its parameters
    hist: bool = False
    update_known: bool = True
    lrs: np.ndarray | None = None  # momentum plans: ‖ΔW‖ = lr · ‖buffer‖
    series: list[tuple[int | str, int]] = field(default_factory=list)  # (layer index or series name, points)
    loss_given: bool = True
    window: tuple[int, int, int] | None = None  # (steps, first step, norm steps) of the packed StepWindow


def pack(scalars: list[torch.Tensor], core: list[torch.Tensor], detail: list[torch.Tensor] | None,
         hist: torch.Tensor | None, series: list[torch.Tensor], window: torch.Tensor | None = None):
    """One flat vector per measured step: scalars, the (n, columns) per-layer block, histograms,
    through-time norms, the step window. CPU: a numpy array read in place (nothing to transfer); CUDA: one tensor
    for one device->host copy."""
    columns = core + (detail or [])
    if not columns[0].is_cuda:
        parts = [np.array([float(v) for v in scalars]),
                 np.stack([c.numpy() for c in columns], axis=1).reshape(-1)]
        if hist is not None:
            parts.append(hist.numpy().reshape(-1))
        parts += [s.float().numpy() for s in series]
        if window is not None:
            parts.append(window if isinstance(window, np.ndarray) else window.numpy())
        return np.concatenate(parts, dtype=np.float64)
    parts = [torch.stack([v.float().reshape(()) for v in scalars]),
             torch.stack([c.float() for c in columns], dim=1).reshape(-1)]
    if hist is not None:
        parts.append(hist.reshape(-1).float())
    parts += [s.float() for s in series]
    if window is not None:
        parts.append(window.float())
    return torch.cat(parts)


def unpack(values: np.ndarray, layout: Layout, host: HostSide) -> tuple[StepRecord, dict]:
    """The StepRecord of one measured step, and the scalars only the watcher reads (``skipped``,
    ``loss_scale``). Not measured: NaN plus a mark in ``unmeasured``; non-finite: no mark."""
    n = len(layout)
    loss, acc, total, after, acted, skipped, loss_scale = values[:SCALARS]
    columns = CORE_COLUMNS + (DETAIL_COLUMNS if host.detail else 0)
    per_layer = values[SCALARS: SCALARS + n * columns].reshape(n, columns)
    offset = SCALARS + n * columns
    hist = None
    if host.hist:
        hist = values[offset: offset + n * HIST_BINS].reshape(n, HIST_BINS).copy()
        offset += n * HIST_BINS
    wgrad, act_grad, act_mark, grad_mark = (per_layer[:, k].copy() for k in range(CORE_COLUMNS))
    nan = np.full(n, np.nan)
    if host.detail:
        mean, std, saturated, dead, weight_norm, update, *percentiles = (
            per_layer[:, k].copy() for k in range(CORE_COLUMNS, columns))
        if host.lrs is not None:
            update = update * host.lrs
        update = update / np.maximum(weight_norm, 1e-30)
    else:
        mean, std, saturated, dead, weight_norm, update, *percentiles = (nan.copy() for _ in range(DETAIL_COLUMNS))
    reached = np.asarray(host.reached, dtype=bool)
    got_grad = np.asarray(host.got_grad, dtype=bool)
    has_wgrad = np.asarray(host.has_wgrad, dtype=bool) & layout.has_params
    kinds = layout.kinds
    not_detail = np.full(n, not host.detail)
    sat_kind = np.array([k in SATURATING for k in kinds], dtype=bool)
    dead_kind = np.array([k in RECTIFYING for k in kinds], dtype=bool)
    # a dead fraction needs units: a reached rectifying layer whose value came back NaN had none
    masks = {
        "weight_grad_norm": ~has_wgrad,
        "act_grad_norm": ~got_grad,
        "act_mean": ~reached | not_detail,
        "act_std": ~reached | not_detail,
        "saturated": ~(reached & sat_kind) | not_detail,
        "dead": ~(reached & dead_kind) | not_detail | (np.isnan(dead) & ~np.isnan(mean)),
        "weight_norm": ~layout.has_params | not_detail,
        "update_ratio": ~layout.has_params | not_detail | (not host.update_known),
    }
    layers = {"weight_grad_norm": wgrad, "act_grad_norm": act_grad, "act_mean": mean, "act_std": std,
              "saturated": saturated, "dead": dead, "weight_norm": weight_norm, "update_ratio": update}
    for metric, column in zip(ACT_PERCENTILE_METRICS, percentiles):
        masks[metric] = masks["act_mean"]
        layers[metric] = column
    unmeasured = {}
    for metric in LAYER_METRICS:
        mask = masks[metric]
        layers[metric][mask] = np.nan
        if mask.any():
            unmeasured[metric] = mask.copy()
    # Where non-finite values began: forward input -> output first, then backward output -> input.
    # An infinite ∂L/∂h norm alone may be float32 overflow of finite entries: the marks decide.
    fwd_bad = np.flatnonzero(reached & ~np.isfinite(act_mark))
    bwd_bad = np.flatnonzero((got_grad & ~np.isfinite(grad_mark)) | (has_wgrad & np.isnan(wgrad)))
    nonfinite = None
    if len(fwd_bad):
        nonfinite = (layout.names[fwd_bad[0]], "forward")
    elif len(bwd_bad):
        nonfinite = (layout.names[bwd_bad[-1]], "backward")
    elif host.loss_given and not math.isfinite(loss):
        nonfinite = ("loss", "forward")
    if skipped > 0 and nonfinite is not None and nonfinite[1] == "backward":
        nonfinite = None  # GradScaler's calibration, not a diverging network (the watcher says so)
    series = {}
    for index, points in host.series:
        series[layout.names[index] if isinstance(index, int) else index] = values[offset: offset + points].copy()
        offset += points
    window = None
    if host.window is not None:
        window = window_record(values[offset: offset + WindowMeter.VALUES], host.window)
    record = StepRecord(
        step=host.step, loss=float(loss), accuracy=float(acc), grad_norm_total=float(total),
        grad_norm_clipped=float(after), clipped=bool(acted > 0.5), layers=layers, hist=hist,
        nonfinite=nonfinite, detail=host.detail, unmeasured=unmeasured, time_act_grad_norm=series,
        window=window, **host.meta,
    )
    return record, {"skipped": float(skipped), "loss_scale": float(loss_scale)}


# -- the overhead budget, shared by the trainer and watch() ---------------------------------------
class OverheadBudget:
    """Keeps the probe's share of wall time under ``budget`` by widening the sampling interval
    (and narrowing it back, never below the user's ``floor``) once per window of a second.

    The share is the probe's own measured time (see :class:`ProbeClock`) over the window's wall
    time. What measuring adds inside forward and backward (taps, hooks, ``autograd.grad`` handing
    back ∂L/∂h) is only partly timed, so the share reads low (docs/BENCHMARKS.md).
    """

    WINDOW_SECONDS = 1.0
    TARGET = 0.7  # aim below the budget so that noise does not flip the interval back and forth
    MAX_INTERVAL = 10_000

    def __init__(self, budget: float, floor: int):
        self.budget = budget
        self.floor = floor
        self.share = float("nan")
        self._start = time.perf_counter()
        self._probe_at_start = 0.0
        self._steps = 0

    def update(self, interval: int, probe_seconds: float) -> int:
        """Called once per step; returns the interval to use from now on."""
        self._steps += 1
        now = time.perf_counter()
        elapsed = now - self._start
        # A window spans a second and three sampled steps, so that it sees the probe's real cost;
        # on slow steps (seconds each) one whole interval once ten seconds have passed.
        enough = self._steps >= 3 * interval or (elapsed >= 10 * self.WINDOW_SECONDS and self._steps >= interval)
        if elapsed < self.WINDOW_SECONDS or not enough:
            return interval
        self.share = (probe_seconds - self._probe_at_start) / elapsed
        self._start, self._probe_at_start, self._steps = now, probe_seconds, 0
        goal = self.TARGET * self.budget
        if self.share > self.budget:
            interval = math.ceil(interval * self.share / goal)
        elif self.share < 0.4 * self.budget and interval > self.floor:
            interval = max(self.floor, interval // 2, math.floor(interval * self.share / goal))
        return max(self.floor, min(interval, self.MAX_INTERVAL))


class ProbeClock:
    """Seconds the probe added to training, for the overhead budget.

    CPU: host time inside the probe's calls. CUDA: the time between CUDA events recorded around
    those calls, i.e. the probe's kernels plus any time the GPU sat idle waiting for the probe's
    host work, read once the events have completed (never waited for). Host time would be wrong
    there: a call that finds the launch queue full waits for the GPU to drain training's own
    kernels, and was charged 11 % for it on an H100 in a run whose probe cost was under 2 %.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._open: object = None
        self._pending: deque = deque()

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self._open is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._open, end))
        else:
            self._seconds += time.perf_counter() - self._open
        self._open = None

    def add(self, seconds: float) -> None:
        """Host seconds measured elsewhere (the watcher's hooks, on the CPU)."""
        self._seconds += seconds

    def seconds(self) -> float:
        """Probe seconds measured so far (on CUDA: those whose events have completed)."""
        while self._pending and self._pending[0][1].query():
            begin, end = self._pending.popleft()
            self._seconds += begin.elapsed_time(end) / 1000.0
        return self._seconds
