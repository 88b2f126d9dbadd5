"""Watch your own model in your own training loop.

    watcher = vgtui.watch(model, record="run.jsonl", optimizer=opt, scaler=scaler)
    for i, (x, y) in enumerate(loader):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y) / accum
        scaler.scale(loss).backward()
        if (i + 1) % accum == 0:
            scaler.unscale_(opt)
            watcher.before_clip()                       # per-layer norms before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            watcher.step(opt, loss)                     # global norm after clipping, once per step
            scaler.step(opt); scaler.update(); opt.zero_grad()
    watcher.close()                                     # every hook removed, the file complete

The watcher measures through the same engine as vgtui's own trainer (:mod:`vgtui.engine`: the
same layers, columns, encodings, thresholds and update ratios); only the collecting differs.
What is measured, and when (the places where monitors usually go wrong):

* Layers are the modules that own trainable parameters, named by their module path (a parameter
  owned by the model itself by its parameter name), in forward order; a module never called as a
  module (``nn.MultiheadAttention.out_proj``) or not called yet keeps its registration place.
  ‖∂L/∂W‖, ‖W‖ and the update ratio cover every parameter the module owns (weights and biases,
  all gates and stacked layers of an RNN). A tied tensor (GPT-2's ``lm_head`` and ``wte``) is
  measured once, on the first layer holding it, and listed in ``RunHeader.tied``.
* ``‖∂L/∂W‖`` per layer and the global ``‖g‖`` are read from ``.grad`` at ``before_clip()`` (or at
  ``step()`` when there is none): after backward, so after DDP's all-reduce and after every
  micro-batch has accumulated, and after AMP unscaling (the watcher calls ``scaler.unscale_(opt)``
  itself when it was given the scaler and you have not). The global norm after clipping is read
  again at ``step()``; "clipped" means clipping shrank it.
* ``‖∂L/∂h‖`` comes from tensor hooks that fire once per micro-batch; the recorded norm is
  ``sqrt(Σ_k ‖∂L_k/∂h_k‖²)`` (with the AMP loss scale divided out). A layer no gradient reached
  is recorded as not measured, never as non-finite. Recurrent modules (``nn.RNN/LSTM/GRU``) and
  looped cells (``nn.RNNCell`` ...) also get ``‖∂L/∂h_t‖`` per time step (per call for cells; for a
  fused module the total gradient of every stacked layer, replayed on detail steps by
  :mod:`vgtui.recurrent`).
* Activation statistics are of what follows the layer: when an activation module (ReLU,
  LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid; in-place or not) is applied directly to a layer's
  output, its dead units or saturation are measured; pooled over every micro-batch of the step
  (forward passes with gradients disabled, e.g. validation, are ignored). They are measured on
  every ``detail_every``-th measured step, like ``‖W‖``, the update ratio and the histograms.
* Under DDP the activation sums are combined across ranks with one small reduce per sampled step,
  so rank 0 records the step of the combined global batch; other ranks compute their share and
  do nothing else.
* Under FSDP2 (``fully_shard``) every norm is summed from the ranks' local shards in the same one
  all_reduce per measured step (no weight or gradient is gathered); tensor parallelism is refused.
* Under ``torch.compile`` the hooks inside the compiled region do nothing (they would break the
  graph): per-layer activation statistics and ``‖∂L/∂h‖`` are recorded as not measured.

Cheap by default: hooks exist only on measured steps, a measured step ends in one device-to-host
transfer, and ``overhead_budget`` (2 % by default) widens the interval between measured steps when
measuring costs more. A monitor never takes training down: any fault inside the watcher (a hook,
the file, a full disk) is reported once (a warning, and an ``error`` line while the file can still
be written), measuring stops, and training goes on; :meth:`Watcher.close` never raises.
"""

from __future__ import annotations

import atexit
import json
import math
import queue
import threading
import time
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .channel import Channel
from .config import RECTIFYING
from .diagnosis import Diagnoser
from .distributed import counted_pieces, local_sq_norms, piece_sq_norms, reduce_sum, sharding_kind
from .engine import (CELLS, RECURRENT, HostSide, Layout, OverheadBudget, Percentiles, ProbeClock, UpdateMeter,
                     WindowMeter, activation_kind, alive_units, downsample_time, first_tensor, hook_optimizer_step,
                     measures_dead, out_of_place, pack, recomputing, saturated_mask, strided_sample, time_squares,
                     unit_dim, unpack, unwrap_optimizer)
from .jsonl import JsonlWriter, to_json
from .layers import LayerSpec
from .probe import DETAIL_EVERY, HostTransfer, LogHistograms, tensor_norms
from .records import ACT_PERCENTILES, RunError, RunEvent, RunHeader, StepRecord
from .recurrent import ThroughTime

__all__ = ["Watcher", "watch", "default_layers"]

LayersArg = None | Callable[[str, nn.Module], bool] | Sequence[str | nn.Module | LayerSpec]

#: The default share of training time measuring may take before the interval widens.
DEFAULT_BUDGET = 0.02


# -- which modules count as layers ------------------------------------------------------------------
def _unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """(the plain module, the DDP wrapper if any, whether torch.compile wrapped it)."""
    ddp = None
    compiled = False
    inner = model
    for _ in range(8):
        orig = getattr(inner, "_orig_mod", None)
        if isinstance(orig, nn.Module):  # torch.compile's OptimizedModule
            compiled = True
            inner = orig
            continue
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            ddp = inner
            inner = inner.module
            continue
        if isinstance(inner, nn.DataParallel):
            if len(inner.device_ids or []) > 1:  # replicas run the hooks on several threads at once
                raise ValueError("vgtui.watch does not support nn.DataParallel over several GPUs: "
                                 "use DistributedDataParallel (torchrun), which it supports")
            inner = inner.module
            continue
        break
    return inner, ddp, compiled


def _trainable_direct(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _clean(name: str) -> str:
    # A compiled submodule shows up as "<name>._orig_mod.<child>": name the user's module instead.
    return name.replace("._orig_mod", "").replace("_orig_mod.", "")


def _spec(name: str, module: nn.Module) -> LayerSpec:
    params = _trainable_direct(module)
    if not params:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) owns no trainable parameter: "
                         "pick modules that hold weights, or pass a vgtui.LayerSpec")
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.requires_grad):
        weight = params[0]
    time_dim = None
    kind = "linear"
    if isinstance(module, RECURRENT):
        time_dim = 1 if module.batch_first else 0
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        kind = "tanh" if module.nonlinearity == "tanh" else "relu"
    elif isinstance(module, (nn.LSTM, nn.LSTMCell)):
        kind = "lstm"  # gated: the diagnosis judges its growth through time differently
    elif isinstance(module, (nn.GRU, nn.GRUCell)):
        kind = "gru"
    return LayerSpec(_clean(name) or type(module).__name__, module, weight, act_kind=kind,
                     time_dim=time_dim, params=tuple(params))


def default_layers(model: nn.Module) -> list[LayerSpec]:
    """Every module that directly owns a trainable parameter (in ordinary models: the leaf
    Linear/Conv/Norm/Embedding/RNN modules), in registration order, plus one layer per trainable
    parameter owned by the model itself (named by the parameter); :func:`watch` re-sorts them into
    forward order on the first forward pass. A layer's ‖∂L/∂W‖ covers every parameter the module
    owns; ``h`` is the module's output."""
    inner, _, _ = _unwrap(model)
    specs = []
    for name, module in inner.named_modules():
        if module is inner:
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    specs.append(LayerSpec(pname, None, param, params=(param,)))
        elif _trainable_direct(module):
            specs.append(_spec(name, module))
    return specs


def _resolve_layers(inner: nn.Module, layers: LayersArg) -> tuple[list[LayerSpec], bool]:
    """The layer specs and whether to sort them into forward order."""
    if layers is None:
        specs = default_layers(inner)
        auto = True
    elif callable(layers) and not isinstance(layers, (list, tuple)):
        specs = [_spec(n, m) for n, m in inner.named_modules()
                 if m is not inner and _trainable_direct(m) and layers(n, m)]
        auto = True
    else:
        names = {id(m): n for n, m in inner.named_modules()}
        specs = []
        for item in layers:
            if isinstance(item, LayerSpec):
                specs.append(item)
            elif isinstance(item, str):
                try:
                    module = inner.get_submodule(item)
                except AttributeError as exc:
                    raise ValueError(f"layers: no module named {item!r} in {type(inner).__name__}") from exc
                specs.append(_spec(item, module))
            elif isinstance(item, nn.Module):
                if id(item) not in names:
                    raise ValueError(f"layers: {type(item).__name__} is not a submodule of the model")
                specs.append(_spec(names[id(item)], item))
            else:
                raise TypeError(f"layers: expected module names, modules or LayerSpecs, got {item!r}")
        auto = False
    if not specs:
        raise ValueError("no layers to watch: the model has no module with trainable parameters")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"layers: {spec.name!r} given twice")
        seen.add(spec.name)
    return specs, auto


def _rank_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix or '.jsonl'}")


def _forward_order(seen: list[int], count: int) -> list[int]:
    """Layers first called in ``seen`` order; each one never called (not yet, or never as a
    module, or inside a compiled region) right after its registration predecessor, so that it
    keeps its place among its neighbours instead of trailing after the output layer."""
    order = list(seen)
    placed = set(seen)
    for index in range(count):
        if index in placed:
            continue
        at = order.index(index - 1) + 1 if index > 0 else 0
        order.insert(at, index)
        placed.add(index)
    return order


# -- the sink: diagnosis, file and channel, off the training thread --------------------------------
class _StreamWriter:
    """JSONL lines to a file object the caller opened (and will close)."""

    def __init__(self, stream):
        self.stream = stream
        self.path = getattr(stream, "name", "<stream>")
        self._layers: dict[int, list[str]] = {}

    def write(self, record) -> None:
        if isinstance(record, RunHeader):
            self._layers[record.run_id] = list(record.layers)
        names = self._layers.get(getattr(record, "run_id", 0))
        self.stream.write(json.dumps(to_json(record, names), separators=(",", ":"), allow_nan=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class _Sink(threading.Thread):
    """Diagnoses, writes and publishes records on its own thread, so that the training loop (and,
    under DDP, every rank waiting at the next collective) never waits on disk or on the diagnosis.
    A failing file (a full disk) stops the writing, once, with a warning; the channel goes on."""

    _STOP = object()

    def __init__(self, record, channel: Channel | None, diagnose: bool):
        super().__init__(name="vgtui-sink", daemon=True)
        if record is None:
            self.writer = None
        elif hasattr(record, "write"):
            self.writer = _StreamWriter(record)
        else:
            self.writer = JsonlWriter(record)
        self.channel = channel
        self.diagnose = diagnose
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.latest: StepRecord | None = None
        self.written = 0
        self._diagnoser = None
        self.failed = False

    def put(self, record) -> None:
        self.queue.put(record)

    def run(self) -> None:
        while True:
            record = self.queue.get()
            if record is self._STOP:
                break
            self._handle(record)

    def _handle(self, record) -> None:
        if isinstance(record, RunHeader) and self.diagnose:
            try:
                self._diagnoser = Diagnoser(record)
            except Exception as exc:  # the diagnosis is advice: never lose the measurements to it
                warnings.warn(f"vgtui: diagnosis disabled ({type(exc).__name__}: {exc})", stacklevel=1)
        if isinstance(record, StepRecord):
            if self._diagnoser is not None:
                try:
                    record = self._diagnoser.diagnose(record)
                except Exception as exc:
                    warnings.warn(f"vgtui: diagnosis disabled ({type(exc).__name__}: {exc})", stacklevel=1)
                    self._diagnoser = None
            self.latest = record
        if self.writer is not None and not self.failed:
            try:
                self.writer.write(record)
                self.written += 1
            except Exception as exc:
                self._writer_failed(exc, record)
        if self.channel is not None:
            self.channel.put(record)

    def _writer_failed(self, exc: Exception, record) -> None:
        self.failed = True
        message = f"vgtui: stopped recording to {self.writer.path}: {type(exc).__name__}: {exc}; training goes on"
        warnings.warn(message, stacklevel=1)
        if self.channel is not None:
            self.channel.put(RunError(message, step=getattr(record, "step", 0),
                                      run_id=getattr(record, "run_id", 0)))

    def close(self) -> None:
        if self.is_alive():
            self.queue.put(self._STOP)
            self.join()
        else:  # never started (or already stopped): handle what is queued here
            while True:
                try:
                    record = self.queue.get_nowait()
                except queue.Empty:
                    break
                if record is not self._STOP:
                    self._handle(record)
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                if not self.failed:
                    self._writer_failed(exc, None)


# -- per-layer accumulation over the micro-batches of one optimiser step ---------------------------
def _mean_m2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Σ(x - mean)² of a float32 tensor, on its device. CUDA: one fused Welford pass;
    CPU: the exact two-pass form with a BLAS dot (var_mean is ~35x slower there, measured)."""
    if a.is_cuda:
        var, mean = torch.var_mean(a, correction=0)
        return mean, var * a.numel()
    flat = a.reshape(-1)
    mean = flat.mean()
    centred = flat - mean
    return mean, torch.dot(centred, centred)


class _Accumulator:
    """Device-side running sums for one optimiser step, per layer. Counts are known on the host
    (numel), so combining them costs no device work."""

    def __init__(self, n_layers: int):
        self.count: list[int] = [0] * n_layers  # activation elements seen
        self.mean: list[torch.Tensor | None] = [None] * n_layers
        self.m2: list[torch.Tensor | None] = [None] * n_layers  # Σ (x - mean)^2
        self.sat: list[torch.Tensor | None] = [None] * n_layers  # count of saturated elements
        self.alive: list[torch.Tensor | None] = [None] * n_layers  # per unit: micro-batches where > 0
        self.grad_sq: list[torch.Tensor | None] = [None] * n_layers  # Σ_k ‖∂L_k/∂h_k‖²
        self.grad_bad: list[torch.Tensor | None] = [None] * n_layers  # finite iff every entry was
        self.time_sq: list[torch.Tensor | None] = [None] * n_layers  # Σ_k ‖∂L_k/∂h_t‖² per t
        self.calls: list[dict[int, torch.Tensor] | None] = [None] * n_layers  # cells: per call
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # strided, per micro-batch

    def permute(self, order: list[int]) -> None:
        for name in ("count", "mean", "m2", "sat", "alive", "grad_sq", "grad_bad", "time_sq", "calls", "samples"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in order])

    def take_stats(self, i: int, other: "_Accumulator") -> None:
        """Layer ``i``'s activation statistics from ``other`` in place of this one's."""
        for name in ("count", "mean", "m2", "sat", "alive", "samples"):
            getattr(self, name)[i] = getattr(other, name)[i]

    def add_stats(self, i: int, a: torch.Tensor, kind: str, units_at: int) -> None:
        n = a.numel()
        mean, m2 = _mean_m2(a)
        na = self.count[i]
        if na == 0:
            self.mean[i], self.m2[i] = mean, m2
        else:  # Chan et al.: combine (count, mean, M2) of two samples exactly, in float64
            total = na + n
            delta = mean.double() - self.mean[i].double()
            self.mean[i] = self.mean[i].double() + delta * (n / total)
            self.m2[i] = self.m2[i].double() + m2.double() + delta.square() * (na * n / total)
        self.count[i] = na + n
        self.samples[i].append(strided_sample(a))
        saturated = saturated_mask(a, kind)
        if saturated is not None:
            sat = saturated.sum(dtype=torch.float64)
            self.sat[i] = sat if self.sat[i] is None else self.sat[i] + sat
        if measures_dead(kind, tuple(a.shape)):
            alive = alive_units(a, units_at).to(torch.float64)
            prev = self.alive[i]
            self.alive[i] = alive if prev is None or prev.shape != alive.shape else prev + alive

    def add_grad(self, i: int, grad: torch.Tensor, time_dim: int | None, call: int | None) -> None:
        flat = grad.detach().reshape(-1).float()
        sq = torch.dot(flat, flat)  # ‖g‖², one BLAS pass
        self.grad_sq[i] = sq if self.grad_sq[i] is None else self.grad_sq[i].double() + sq.double()
        if time_dim is not None and grad.dim() > time_dim:
            per_t = time_squares(grad, time_dim)
            prev = self.time_sq[i]
            self.time_sq[i] = per_t if prev is None or prev.shape != per_t.shape else prev + per_t
        if call is not None:
            calls = self.calls[i] if self.calls[i] is not None else {}
            calls[call] = calls[call] + sq if call in calls else sq
            self.calls[i] = calls


class Watcher:
    """Measures a model inside the user's loop; create it with :func:`watch`.

    Per optimiser step: (optionally) :meth:`before_clip` after unscaling and before clipping, or
    :meth:`clip_grad_norm_` to let the watcher clip; then :meth:`step` once, before
    ``optimizer.step()``. :meth:`close` (or leaving a ``with`` block) removes every hook, waits for
    the last measurement and closes the file. None of these raise for a fault inside vgtui.
    """

    def __init__(self, model: nn.Module, *, layers: LayersArg = None, sample_every: int = 1,
                 record: str | Path | Any | None = None, channel: Channel | None = None, optimizer=None,
                 scaler=None, diagnose: bool = True, histograms: bool = True, per_rank: bool = False,
                 start_step: int = 0, run_id: int = 0, name: str | None = None,
                 detail_every: int = DETAIL_EVERY, overhead_budget: float | None = DEFAULT_BUDGET,
                 window: bool | None = None, run_info: dict | None = None, process_group=None):
        if int(sample_every) < 1:
            raise ValueError(f"sample_every must be at least 1, got {sample_every}")
        self.model = model
        self.inner, self.ddp, self.compiled = _unwrap(model)
        self.sharding = sharding_kind(self.inner)
        if self.sharding == "tensor_parallel":
            raise ValueError("vgtui.watch does not support tensor parallelism (DTensor parameters sharded "
                             "outside FSDP2's fully_shard): its activations are split by feature, so "
                             "per-layer norms would be wrong; FSDP2 (fully_shard) and DDP are supported")
        self.run_info = run_info  # read when the header is written: the caller may fill it until then
        self.specs, self._auto_order = _resolve_layers(self.inner, layers)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]
        self.sample_every = int(sample_every)
        self.optimizer = optimizer
        self.scaler = scaler
        self.histograms = histograms
        self.per_rank = per_rank
        self.run_id = run_id
        self.name = name or type(self.inner).__name__
        self.step_index = int(start_step)
        self.detail_every = max(1, int(detail_every))
        # Distributed: who writes, and whether activation sums must be combined across ranks.
        self.rank, self.world_size, self._group = 0, 1, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._group = getattr(self.ddp, "process_group", None) if self.ddp is not None else None
            if process_group is not None:
                self._group = process_group
            self.rank = torch.distributed.get_rank(self._group)
            self.world_size = torch.distributed.get_world_size(self._group)
        #: FSDP2: weights and gradients are sharded, so their norms too are sums over ranks; they
        #: join the activation sums in one all_reduce when the measured step is finalised.
        self._sharded = self.sharding != "none"
        if self._sharded and per_rank:
            raise ValueError("vgtui.watch: per_rank=True cannot be used with FSDP2 (each rank holds only "
                             "shards of the weights); rank 0 records the whole model")
        if self._sharded and window:
            raise ValueError("vgtui.watch: window=True cannot be used with FSDP2 (the global norm of every "
                             "step would need an all_reduce on every step)")
        self.writes = per_rank or self.rank == 0
        data_parallel = self.ddp is not None or process_group is not None or self._sharded
        self._reduce = data_parallel and self.world_size > 1 and not per_rank
        self._measures = self.writes or self._reduce  # rank != 0 outside DDP: nothing to do
        target = None
        if record is not None and self.writes:
            if hasattr(record, "write"):
                target = record
            else:
                target = Path(record)
                if per_rank and self.world_size > 1:
                    target = _rank_path(target, self.rank)
        self.record_path = target if isinstance(target, Path) else None
        self._sink = _Sink(target, channel, diagnose) if self.writes else None
        n = len(self.specs)
        self._cells = {i for i, spec in enumerate(self.specs) if isinstance(spec.output_module, CELLS)}
        self._act_fn: list[nn.Module | None] = [None] * n  # a detected activation, applied to h
        self._detected: dict[int, nn.Module] = {}
        # First step only: each layer's output (weakly) to recognise an activation applied to it,
        # and the statistics of that activation's output beside those of h (kept if it is one).
        self._first_outputs: dict[int, tuple[int, weakref.ref, int]] = {}
        self._acc_act = _Accumulator(n)
        self._handles: list = []
        self._opt_handles: dict[int, Any] = {}
        self._seen: list[int] = []  # registration indices in first-forward order
        self._seen_set: set[int] = set()
        self._calls = [0] * n
        self._started = False
        self._closed = False
        self._failed = False
        self.layout: Layout | None = None
        self._units: list[int | None] = [None] * n
        self._acc = _Accumulator(n)
        # total ‖∂L/∂h_t‖ of fused nn.RNN/LSTM/GRU layers, replayed on detail steps (vgtui/recurrent.py)
        self._through_time = ThroughTime(lambda: self.sampled and self.detail and self.writes, self._fail)
        self._transfer = HostTransfer()
        self._hist = LogHistograms()
        self._percentiles = Percentiles()
        self._meter = UpdateMeter()
        self._window = WindowMeter()
        #: every step's loss into StepRecord.window (a few float operations a step); off with
        #: ``window=False``, and under FSDP2 (its measured steps reduce over ranks, the window would not)
        self.windowing = window is not False and not self._sharded
        #: ... and its global norm: one read of every gradient per step, so by default only on CUDA
        #: (a fused kernel); elsewhere where clipping returns it anyway (:meth:`clip_grad_norm_`,
        #: :meth:`note_grad_norm`), or with ``window=True``
        self.norm_windowing = self.windowing and (window is True or self._device().type == "cuda")
        self._step_norm: torch.Tensor | None = None  # this step's global norm before clipping
        self._norm_noted = False  # clip_grad_norm_ returned this step's norm (note_grad_norm)
        self._pre_clip: tuple | None = None  # (‖∂L/∂W‖ per layer, histograms, global ‖g‖, has grad)
        self._post_clip: torch.Tensor | None = None
        self._pending: dict | None = None
        self._clip_info: tuple[str, float | None] | None = None  # known once the user clips
        self._sampled_count = 0
        self._last_sampled: int | None = None
        self.sampled = True  # the first step is always measured: it fixes the layer order
        self.detail = True
        self._clock = ProbeClock(self.params[0].device if self.params else torch.device("cpu"))
        # Under DDP every rank must measure the same steps (they join one reduce per measured
        # step), and each rank's clock differs: there the interval stays ``sample_every``.
        adapt = overhead_budget and not self._reduce
        self._budget = OverheadBudget(overhead_budget, self.sample_every) if adapt else None
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._rate = float("nan")
        self.steps = 0
        if self._measures:
            self._install()
        self._exit_hook = _exit_hook(self)
        atexit.register(self._exit_hook)

    # -- public ------------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def latest(self) -> StepRecord | None:
        """The last measured step that reached the sink (rank 0, or every rank in per-rank mode)."""
        return self._sink.latest if self._sink is not None else None

    @property
    def transfers(self) -> int:
        """Device-to-host transfers so far: one per sampled step on a writing rank, else zero."""
        return self._transfer.count

    @property
    def overhead(self) -> float:
        """The measured share of wall time spent measuring (NaN until a budget window closed)."""
        return self._budget.share if self._budget is not None else float("nan")

    def before_clip(self, optimizer=None) -> None:
        """Measure per-layer ``‖∂L/∂W‖``, histograms and the global norm now, before your clipping
        rescales them: call it after ``scaler.unscale_(opt)`` and before ``clip_grad_norm_``.

        Args:
            optimizer: the step's optimizer (or a wrapper of one); default: the watcher's.
        """
        self._before_clip(optimizer, norm_follows=False)

    def note_grad_norm(self, total_norm: torch.Tensor | float) -> None:
        """This step's global gradient norm before clipping, as ``clip_grad_norm_`` returned it
        (over the watched parameters, 2-norm): the step window counts it without reading the
        gradients again. Call it between ``before_clip`` and :meth:`step`; a measured step keeps
        its own reading."""
        if self._failed or not self.windowing:
            return
        self._norm_noted = True
        if self.sampled:
            return
        try:
            self._step_norm = total_norm.detach() if isinstance(total_norm, torch.Tensor) else \
                torch.full((), float(total_norm), device=self._device())
        except Exception as exc:
            self._fail(exc, "note_grad_norm")

    def _before_clip(self, optimizer, norm_follows: bool) -> None:
        self._check_open()
        if self._clip_info is None:
            self._clip_info = ("norm", None)  # the usual clip_grad_norm_; its threshold is the user's
        self._unscale(optimizer if optimizer is not None else self.optimizer)  # sampled or not
        if self._failed:
            return
        try:
            self._start()
            if (self.writes or self._sharded) and self.sampled:
                self._clock.start()
                self._pre_clip = self._read_gradients()
                self._clock.stop()
                if not self._sharded:
                    self._step_norm = self._pre_clip[2]
            elif self.writes and self.norm_windowing and not norm_follows:  # the window's norm, before clipping
                self._step_norm = self._global_norm()
        except Exception as exc:
            self._fail(exc, "before_clip")

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, *, optimizer=None,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the model's parameters, measured before and after
        (unscaling first when the watcher knows the GradScaler), so the record knows both norms.

        Args:
            max_norm, norm_type, error_if_nonfinite: as in ``torch.nn.utils.clip_grad_norm_``.
            optimizer: the step's optimizer (or a wrapper of one); default: the watcher's.

        Returns:
            The total norm before clipping, like torch.
        """
        self._clip_info = ("norm", float(max_norm))
        self._before_clip(optimizer, norm_follows=norm_type == 2.0)
        total = torch.nn.utils.clip_grad_norm_(self.params, max_norm, norm_type,
                                               error_if_nonfinite=error_if_nonfinite)
        if norm_type == 2.0:
            self.note_grad_norm(total)  # the window's norm of this step, computed by torch anyway
        if self.sampled and self._sharded and norm_type == 2.0 and self._pre_clip is not None:
            self._post_clip = float(max_norm)  # the norm after it follows once the total is reduced
        elif self.sampled and self.writes and norm_type == 2.0 and self._pre_clip is not None:
            # torch scales every gradient by min(1, max_norm / (total + 1e-6)): the norm after it
            self._post_clip = self._pre_clip[2] * torch.clamp(max_norm / (self._pre_clip[2] + 1e-6), max=1.0)
        return total

    def step(self, optimizer=None, loss: torch.Tensor | float | None = None, *,
             accuracy: torch.Tensor | float | None = None) -> None:
        """Close the measurement of this optimiser step: once per optimiser step, after the last
        micro-batch's backward (and your clipping), before ``optimizer.step()`` (the update size
        is read when the optimizer's step hook fires).

        Args:
            optimizer: the optimizer about to step; a wrapper (accelerate's, Lightning's) is fine:
                the torch optimizer inside is used. Default: the one given to :func:`watch`.
            loss: the step's loss, recorded as given (a device tensor costs no sync; under DDP
                it is averaged over ranks). None: the record's loss is not measured.
            accuracy: the step's accuracy, if any, recorded like ``loss``.
        """
        self._check_open()
        if self.optimizer is None:
            self.optimizer = optimizer  # the default from now on (and the header's lr)
        optimizer = optimizer if optimizer is not None else self.optimizer
        self._unscale(optimizer)  # sampled or not, so that every step behaves the same
        if not self._failed:
            try:
                self._step(optimizer, loss, accuracy)
            except Exception as exc:
                self._fail(exc, "step")
        self.step_index += 1
        self.steps += 1
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        self._last = now
        self._rate = 1.0 / dt if math.isnan(self._rate) else 0.9 * self._rate + 0.1 / dt

    def close(self) -> None:
        """Remove every hook, record the last step, flush and close the file. Idempotent; never
        raises (a fault is reported as a warning)."""
        if self._closed:
            return
        try:
            if not self._failed:
                if self._sink is not None:
                    self._start()  # a run of zero steps is still a valid recording (header, events)
                if self._started:
                    self._finalize_pending(stepped=False)
                    self._emit_ready(wait=True)
            if self._started and self._sink is not None:
                self._sink.put(RunEvent("finished", f"{self.steps} steps", self.step_index, self.run_id))
        except Exception as exc:
            self._fail(exc, "close")
        finally:
            self._closed = True
            try:
                self.detach()
                if self._sink is not None:
                    self._sink.close()
            except Exception as exc:  # pragma: no cover - the last line of defence
                warnings.warn(f"vgtui: closing the watcher failed ({type(exc).__name__}: {exc})", stacklevel=2)
            atexit.unregister(self._exit_hook)

    def detach(self) -> None:
        """Remove every hook this watcher installed (forward hooks and optimiser step hooks)."""
        self._remove()
        for handle in self._opt_handles.values():
            if handle is not None:
                handle.remove()
        self._opt_handles.clear()

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------------------
    def _fail(self, exc: BaseException, where: str) -> None:
        """A fault inside vgtui: say so once, record it while the file still can, stop measuring;
        the training loop goes on."""
        if self._failed:
            return
        self._failed = True
        self._pending = None
        message = (f"vgtui: measuring stopped after an error in {where} ({type(exc).__name__}: {exc}); "
                   "training goes on")
        warnings.warn(message, stacklevel=3)
        try:
            self._remove()
            if self._sink is not None:
                if not self._started:
                    self._started = True
                    self._sink.start()
                self._sink.put(RunError(message, "".join(traceback.format_exception(exc)),
                                        step=self.step_index, run_id=self.run_id))
        except Exception:
            pass

    # -- hooks -------------------------------------------------------------------------------------
    def _install(self) -> None:
        """Forward hooks for a measured step (and, before the first step is closed, those that
        find the forward order and the activations following each layer)."""
        if self._handles or self._failed or not self._measures:
            return
        for index, spec in enumerate(self.specs):
            if spec.output_module is None:
                continue
            self._handles.append(spec.output_module.register_forward_hook(self._output_hook(index)))
            if spec.act_module is not None and not spec.act_is_output:
                self._handles.append(spec.act_module.register_forward_hook(self._act_hook(index)))
        self._handles += self._through_time.install(self.specs)
        if self._cells:
            self._handles.append(self.inner.register_forward_pre_hook(self._new_forward))
        if not self._started and self._auto_order:
            for module in self.inner.modules():
                if activation_kind(module) is not None:
                    self._handles.append(module.register_forward_pre_hook(self._detect_hook(module)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _new_forward(self, module, inputs) -> None:
        self._calls = [0] * len(self.specs)

    def _detect_hook(self, act: nn.Module):
        kind = activation_kind(act)
        fn = out_of_place(act)

        def hook(module, inputs):
            if torch.compiler.is_compiling() or self._failed or recomputing() or not torch.is_grad_enabled():
                return
            try:
                x = inputs[0] if inputs else None
                entry = self._first_outputs.get(id(x))
                if entry is None or entry[1]() is not x or x._version != entry[2]:
                    return  # not a layer's output, or changed in place since (a residual sum)
                index = entry[0]
                if self._detected.setdefault(index, act) is act and self.detail:
                    with torch.no_grad():
                        a = fn(x.detach())
                        self._note_units(index, a)
                        self._acc_act.add_stats(index, a.float(), kind, unit_dim(self.specs[index]))
            except Exception as exc:
                self._fail(exc, "a forward hook")

        return hook

    def _act_hook(self, index: int):
        spec = self.specs[index]

        def hook(module, inputs, output):
            if (torch.compiler.is_compiling() or not (self.sampled and self.detail)
                    or not torch.is_grad_enabled() or recomputing()):
                return
            began = time.perf_counter()
            try:
                out = first_tensor(output)
                if out is not None and out.numel():
                    with torch.no_grad():
                        self._note_units(index, out)
                        self._acc.add_stats(index, out.detach().float(), spec.act_kind, unit_dim(spec))
            except Exception as exc:
                self._fail(exc, "a forward hook")
            self._charge(began)

        return hook

    def _output_hook(self, index: int):
        spec = self.specs[index]
        own_stats = spec.act_module is None or spec.act_is_output
        time_dim = spec.time_dim
        cell = index in self._cells

        def hook(module, inputs, output):
            if torch.compiler.is_compiling() or self._failed or recomputing():
                return
            began = time.perf_counter()
            try:
                if not self._started and index not in self._seen_set:
                    self._seen_set.add(index)
                    self._seen.append(index)
                if not self.sampled or not torch.is_grad_enabled():
                    return
                out = first_tensor(output)
                if out is None:
                    return
                if not self._started:
                    self._first_outputs[id(out)] = (index, weakref.ref(out), out._version)
                if own_stats and self.detail and out.numel() and out.is_floating_point():
                    with torch.no_grad():
                        fn = self._act_fn[index]
                        a = fn(out.detach()) if fn is not None else out.detach()
                        self._note_units(index, a)
                        self._acc.add_stats(index, a.float(), self.specs[index].act_kind, unit_dim(self.specs[index]))
                if out.requires_grad:
                    call = None
                    if cell:
                        call = self._calls[index]
                        self._calls[index] += 1
                    out.register_hook(self._grad_hook(index, time_dim, call))
            except Exception as exc:
                self._fail(exc, "a forward hook")
            finally:
                self._charge(began)

        return hook

    def _grad_hook(self, index: int, time_dim: int | None, call: int | None):
        def on_grad(grad: torch.Tensor) -> None:
            if self._closed or self._failed:
                return
            began = time.perf_counter()
            try:  # self._acc is looked up now: it is replaced at every step()
                self._acc.add_grad(index, grad, time_dim, call)
            except Exception as exc:
                self._fail(exc, "a gradient hook")
            self._charge(began)

        return on_grad

    def _note_units(self, index: int, a: torch.Tensor) -> None:
        if a.dim() >= 2:
            self._units[index] = a.shape[unit_dim(self.specs[index])]

    def _charge(self, began: float) -> None:
        """Hook time counts against the overhead budget (host time: on the CPU it is the cost)."""
        if not self._clock.cuda:
            self._clock.add(time.perf_counter() - began)

    def _hook_optimizer(self, optimizer) -> bool:
        """Finalise the update size right after ``optimizer.step()``; False where the optimizer
        offers no step hook (then it is read at the next :meth:`step`)."""
        inner = unwrap_optimizer(optimizer)
        key = id(inner)
        if key not in self._opt_handles:
            ref = weakref.ref(self)

            def after_step() -> None:
                watcher = ref()
                if watcher is not None and not watcher._closed and not watcher._failed:
                    try:
                        watcher._finalize_pending(stepped=True)
                    except Exception as exc:
                        watcher._fail(exc, "the optimizer step hook")

            self._opt_handles[key] = hook_optimizer_step(inner, after_step)
        return self._opt_handles[key] is not None

    # -- the step ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Watcher is closed")

    def _start(self) -> None:
        """On the first step: fix the layer order (forward order), recognise the activations that
        follow layers, and write the header."""
        if self._started:
            return
        self._started = True
        n = len(self.specs)
        order = _forward_order(self._seen, n) if self._auto_order else list(range(n))
        for index, act in self._detected.items():
            spec = self.specs[index]
            if spec.act_kind == "linear" and spec.act_module is None:
                spec.act_kind = activation_kind(act)
                self._act_fn[index] = out_of_place(act)
                self._acc.take_stats(index, self._acc_act)  # the first step's, after the activation
        self._acc_act = _Accumulator(0)
        self._first_outputs = {}
        self.specs = [self.specs[i] for i in order]
        self._act_fn = [self._act_fn[i] for i in order]
        self._units = [self._units[i] for i in order]
        self._cells = {order.index(i) for i in self._cells}
        self._calls = [self._calls[i] for i in order]
        self._acc.permute(order)
        self.layout = Layout(self.specs, self.params)
        self._remove()  # hooks again with the new indices, and no more detection hooks
        if self.sampled:
            self._install()
        if self._sink is None:
            return
        device = self.params[0].device if self.params else torch.device("cpu")
        header = RunHeader(
            preset=self._preset(),
            layers=list(self.layout.names),
            layer_kinds=list(self.layout.kinds),
            device=str(device),
            run_id=self.run_id,
            params=sum(p.numel() for p in self.params),
            source="api",
            tied={k: list(v) for k, v in self.layout.tied.items()},
        )
        self._sink.start()
        self._sink.put(header)
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        self._sink.put(RunEvent("started", f"watching {self.name}{where}: {n} layers",
                                self.step_index, self.run_id))

    def _preset(self) -> dict:
        """What the header can say about the user's run (the TUI and the diagnosis read it)."""
        preset = {
            "name": self.name,
            "description": f"{self.name}, watched in its own training loop (vgtui.watch)",
            "source": "vgtui.watch",
            "task": "custom",
            "sample_every": self.sample_every,
            "detail_every": self.detail_every,
            "clip": self._clip_info[0] if self._clip_info else "none",
            "world_size": self.world_size,
            "rank": self.rank if self.per_rank else 0,
            "per_rank": self.per_rank,
            "compiled": self.compiled,
        }
        if self._clip_info and self._clip_info[1] is not None:
            preset["clip_threshold"] = self._clip_info[1]
        if self.sharding != "none":
            preset["sharding"] = self.sharding
        if self.optimizer is not None:
            inner = unwrap_optimizer(self.optimizer)
            preset["optimizer"] = type(inner).__name__
            groups = getattr(inner, "param_groups", None) or []
            lr = groups[0].get("lr") if groups else None
            if isinstance(lr, (int, float)):
                preset["lr"] = float(lr)
        if self.run_info:
            preset.update(self.run_info)
            if preset.get("clip") == "none":
                preset.pop("clip_threshold", None)
        return preset

    def _step(self, optimizer, loss, accuracy) -> None:
        self._start()
        measuring = self.sampled and self._measures
        if measuring:
            self._clock.start()
        self._finalize_pending(stepped=False)
        hooked = self._hook_optimizer(optimizer) if optimizer is not None and (self.writes or self._sharded) else False
        if measuring:
            self._measure(optimizer, loss, accuracy, hooked)
        elif self.writes and self.windowing and loss is not None:  # every step counts in the next record's window
            norm = self._step_norm
            if norm is None and self.norm_windowing:
                norm = self._global_norm()
            self._window.add(self.step_index, _scalar(loss, self._device()), norm)
        self._step_norm = None
        self._norm_noted = False
        self._pre_clip = self._post_clip = None
        self._emit_ready(wait=False)
        if measuring:
            self._clock.stop()
        if self._budget is not None:
            self.sample_every = self._budget.update(self.sample_every, self._clock.seconds())
        self._schedule(self.step_index + 1)

    def _schedule(self, next_step: int) -> None:
        """Whether the next step is measured; hooks exist on measured steps only."""
        if self.sampled:
            self._last_sampled = next_step - 1
        self.sampled = next_step - self._last_sampled >= self.sample_every
        if self.sampled:
            self.detail = self._sampled_count % self.detail_every == 0
            self._install()
        else:
            self._remove()

    def _unscale(self, optimizer) -> None:
        """Unscale the gradients now if a GradScaler is known and has not unscaled them yet."""
        scaler = self.scaler
        if scaler is None or optimizer is None or not scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        states = getattr(scaler, "_per_optimizer_states", None)
        state = states.get(id(optimizer)) if isinstance(states, dict) else None
        if state is None or state.get("stage") is OptState.READY:
            scaler.unscale_(optimizer)

    def _inv_scale(self) -> torch.Tensor | None:
        """1/S for the loss scale S the backward ran with (activation gradients carry it), read
        now, before ``scaler.update()`` changes S in place."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return None
        return scaler._scale.double().reciprocal()

    def _found_inf(self, optimizer) -> torch.Tensor | None:
        """GradScaler's "non-finite gradients: this step is skipped" flag (a device tensor)."""
        scaler = self.scaler
        if scaler is None or optimizer is None or not scaler.is_enabled():
            return None
        states = getattr(scaler, "_per_optimizer_states", None)
        state = states.get(id(optimizer)) if isinstance(states, dict) else None
        found = state.get("found_inf_per_device") if state else None
        if not found:
            return None
        return sum(v.float().to(self._device()) for v in found.values())

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _global_norm(self) -> torch.Tensor:
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        return torch.linalg.vector_norm(tensor_norms(grads)) if grads else torch.zeros((), device=self._device())

    def _read_gradients(self):
        """Per-layer ‖∂L/∂W‖ (over each layer's parameters), histograms, the global norm, and
        which layers a gradient reached: one norm pass over all gradients, on the device."""
        layout = self.layout
        grads = [p.grad for p in layout.params]
        present = tuple(k for k, g in enumerate(grads) if g is not None)
        device = self._device()
        has = np.zeros(len(layout), dtype=bool)
        for k in present:
            if layout.owner[k] < len(layout):
                has[layout.owner[k]] = True
        if self._sharded:
            return self._read_sharded_gradients(grads), has
        if present:
            norms = tensor_norms([grads[k].detach() for k in present])
            total = torch.linalg.vector_norm(norms)
            wgrad = layout.per_layer(norms, present)
        else:
            total = torch.zeros((), device=device)
            wgrad = torch.full((len(layout),), float("nan"), device=device)
        hist = None
        if self.histograms and self.detail:
            weights = [spec.weight for spec in self.specs]
            hist = self._hist([w.grad.detach() if w.grad is not None else torch.zeros_like(w) for w in weights])
        return wgrad, hist, total, has

    def _read_sharded_gradients(self, grads):
        """FSDP2: this rank's share of each layer's squared ‖∂L/∂W‖ ((n + 1,), last: parameters in
        no layer) and of the histograms' counts, summed over ranks when the step is finalised."""
        layout = self.layout
        wgrad_sq = layout.per_layer_sq(local_sq_norms(grads))
        hist = None
        if self.histograms and self.detail:
            weights = [spec.weight for spec in self.specs]
            pieces, counted = counted_pieces([w.grad if w.grad is not None else torch.zeros_like(w) for w in weights])
            hist = self._hist(pieces)
            if not all(counted):  # a replicated piece: its counts come from one rank
                hist = hist * torch.tensor(counted, dtype=hist.dtype, device=hist.device).unsqueeze(1)
        return wgrad_sq, hist

    def _measure(self, optimizer, loss, accuracy, hooked: bool) -> None:
        """Everything of a sampled step that must be read before the optimiser changes it."""
        acc, self._acc = self._acc, _Accumulator(len(self.specs))
        self._sampled_count += 1
        device = self._device()
        loss_t = _scalar(loss, device)
        accuracy_t = _scalar(accuracy, device)
        if self._sharded:
            self._measure_sharded(acc, optimizer, loss, loss_t, accuracy_t, hooked)
            return
        combined = self._combine(acc, device, loss_t, accuracy_t)
        if not self.writes:
            return
        stats, act_grad, grad_mark, reached, got_grad, series, loss_t, accuracy_t = combined
        if self._pre_clip is None:  # nobody clipped in between: these are the gradients applied
            wgrad, hist, total, has = self._read_gradients()
            clip = (total, total, torch.zeros((), dtype=torch.bool, device=device))
        else:
            wgrad, hist, total, has = self._pre_clip
            if self._post_clip is not None:  # our own clip: its result is known without a pass
                after = self._post_clip
            else:
                grads = [p.grad for p in self.params if p.grad is not None]
                after = torch.linalg.vector_norm(tensor_norms(grads)) if grads else torch.zeros((), device=device)
            clip = (total, after, after < total * (1.0 - 1e-6))
        window = None
        if self.windowing:
            if loss is not None:  # a norm seen on measured steps alone is the record's own, not the window's
                known = self.norm_windowing or self._norm_noted
                self._window.add(self.step_index, _scalar(loss, device), total if known else None)
            window = self._window.take()
        found_inf = self._found_inf(optimizer)
        plan = self._meter.plan(self.layout, optimizer, can_wait_for_step=hooked) if self.detail else None
        self._pending = {
            "host": HostSide(step=self.step_index, meta=self._meta(), detail=self.detail, reached=reached,
                             got_grad=got_grad, has_wgrad=has, hist=hist is not None,
                             series=[(i, len(s)) for i, s in series], loss_given=loss is not None,
                             window=window[1] if window is not None else None),
            "stats": stats, "act_grad": act_grad, "grad_mark": grad_mark, "wgrad": wgrad, "hist": hist,
            "clip": clip, "loss": loss_t, "accuracy": accuracy_t, "series": [s for _, s in series],
            "skipped": found_inf if found_inf is not None else torch.zeros((), device=device),
            "loss_scale": self.scaler._scale.detach().clone() if self._inv_scale() is not None else None,
            "plan": plan, "window": window[0] if window is not None else None,
        }

    def _measure_sharded(self, acc, optimizer, loss, loss_t, accuracy_t, hooked: bool) -> None:
        """FSDP2: this rank's local sums of the step (gradient norms before and after clipping,
        histogram counts, activation sums), kept on the device until :meth:`_reduce_sharded` adds
        the weight norms and update sizes and sums them all over ranks in one all_reduce."""
        device = self._device()
        sums, has = self._pre_clip if self._pre_clip is not None else self._read_gradients()
        after_sq, own_clip = None, None
        if self._pre_clip is not None:
            if isinstance(self._post_clip, float):  # our own clip_grad_norm_: its result follows from the total
                own_clip = self._post_clip
            else:
                after_sq = local_sq_norms([p.grad for p in self.params]).sum().reshape(1)
        plan, counted = None, None
        if self.detail:
            plan = self._meter.plan(self.layout, optimizer, can_wait_for_step=hooked)
            if plan.kind == "snapshot":  # keep the local pieces of the copy, not DTensors
                plan.tensors, counted = counted_pieces(plan.tensors)
        found_inf = self._found_inf(optimizer)
        self._pending = {
            "sharded": True, "step": self.step_index, "meta": self._meta(), "acc": acc, "act": self._act_sums(acc, device, loss_t, accuracy_t),
            "wgrad_sq": sums[0], "hist": sums[1], "has": has, "clipped_by_user": self._pre_clip is not None,
            "after_sq": after_sq, "own_clip": own_clip, "plan": plan, "counted": counted, "detail": self.detail,
            "loss": loss_t, "accuracy": accuracy_t, "loss_given": loss is not None,
            "skipped": found_inf if found_inf is not None else torch.zeros((), device=device),
            "loss_scale": self.scaler._scale.detach().clone() if self._inv_scale() is not None else None,
        }

    def _reduce_sharded(self, pending: dict, stepped: bool) -> dict | None:
        """FSDP2, once the optimiser has stepped: ‖W‖ and ‖ΔW‖ from the local shards, then ONE
        all_reduce of every sum of the step (no gather of any weight or gradient). Returns the
        measured step as :meth:`_finalize_pending` packs it (rank 0), None on the other ranks."""
        layout = self.layout
        n = len(layout)
        device = self._device()
        detail = pending["detail"]
        parts = [pending["wgrad_sq"], pending["after_sq"] if pending["after_sq"] is not None
                 else torch.zeros(1, dtype=torch.float64, device=device)]
        if pending["hist"] is not None:
            parts.append(pending["hist"])
        plan = pending["plan"]
        known = plan is not None and (plan.kind == "snapshot" or stepped)
        if detail:
            parts.append(layout.per_layer_sq(local_sq_norms(layout.params)))
            update_sq = torch.zeros(n + 1, dtype=torch.float64, device=device)
            if known and plan.positions:
                if plan.kind == "snapshot":
                    now, _ = counted_pieces([layout.params[k] for k in plan.positions])
                    squares = piece_sq_norms(torch._foreach_sub(now, plan.tensors), pending["counted"])
                else:  # lr · momentum buffer (the buffers are sharded like their parameters)
                    squares = local_sq_norms(plan.tensors)
                update_sq = layout.per_layer_sq(squares, plan.positions)
            parts.append(update_sq)
        parts.append(pending["act"])
        reduced = reduce_sum(parts, group=self._group)  # the one collective of the measured step
        if not self.writes:
            return None
        wgrad_sq, after_sq = reduced[0], reduced[1]
        rest = reduced[2:]
        hist = rest.pop(0).float() if pending["hist"] is not None else None
        total = wgrad_sq.sum().sqrt().float()
        if not pending["clipped_by_user"]:
            clip = (total, total, torch.zeros((), dtype=torch.bool, device=device))
        else:
            if pending["own_clip"] is not None:
                after = total * torch.clamp(pending["own_clip"] / (total + 1e-6), max=1.0)
            else:
                after = after_sq.sum().sqrt().float()
            clip = (total, after, after < total * (1.0 - 1e-6))
        combined = self._combine(pending["acc"], device, pending["loss"], pending["accuracy"], reduced=rest[-1])
        stats, act_grad, grad_mark, reached, got_grad, series, loss_t, accuracy_t = combined
        host = HostSide(step=pending["step"], meta=pending["meta"], detail=detail,
                        reached=reached, got_grad=got_grad, has_wgrad=pending["has"], hist=hist is not None,
                        series=[(i, len(s)) for i, s in series], loss_given=pending["loss_given"])
        out = {"host": host, "stats": stats, "act_grad": act_grad, "grad_mark": grad_mark,
               "wgrad": wgrad_sq[:n].sqrt().float(), "hist": hist, "clip": clip, "loss": loss_t,
               "accuracy": accuracy_t, "series": [s for _, s in series], "skipped": pending["skipped"],
               "loss_scale": pending["loss_scale"], "plan": plan, "window": None}
        if detail:
            out["weight_norm"] = rest[0][:n].sqrt().float()
            out["update"] = rest[1][:n].sqrt().float() if known else torch.full((n,), float("nan"), device=device)
        return out

    def _alive(self, acc: _Accumulator, device) -> list[torch.Tensor | None]:
        alive = []
        for i in range(len(self.specs)):
            if acc.alive[i] is not None:
                alive.append(acc.alive[i])
            elif self.specs[i].act_kind in RECTIFYING and self._units[i] and acc.count[i] == 0:
                alive.append(torch.zeros(self._units[i], dtype=torch.float64, device=device))
            else:
                alive.append(None)
        return alive

    def _act_sums(self, acc: _Accumulator, device, loss_t, accuracy_t) -> torch.Tensor:
        """The activation sums that add across ranks, in one float64 vector: count, Σx, Σx²,
        saturated count, ‖∂L/∂h‖², loss and accuracy, units alive."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        means, m2s, count = acc.mean, acc.m2, acc.count
        fill = [torch.full((), float(c), dtype=torch.float64, device=device) for c in count]
        s1 = [m.double() * c if m is not None else zero for m, c in zip(means, count)]
        s2 = [q.double() + m.double().square() * c if m is not None else zero
              for m, q, c in zip(means, m2s, count)]
        parts = [torch.stack(fill), torch.stack(s1), torch.stack(s2),
                 torch.stack([x.double() if x is not None else zero for x in acc.sat]),
                 torch.stack([g.double() if g is not None else zero for g in acc.grad_sq]),
                 torch.stack([loss_t.double(), accuracy_t.double()])]
        parts += [a for a in self._alive(acc, device) if a is not None]
        return torch.cat([p.reshape(-1) for p in parts])

    def _combine(self, acc: _Accumulator, device, loss_t, accuracy_t, reduced: torch.Tensor | None = None):
        """Per layer (layout order), pooled over the step's micro-batches and, under DDP, over
        ranks: (n, 4 + len(ACT_PERCENTILES)) [mean, std, saturated, dead, percentiles], ‖∂L/∂h‖, its finite mark, host masks of the
        layers reached and given a gradient, the through-time norms, loss and accuracy.
        ``reduced``: the sums of :meth:`_act_sums` already summed over ranks (FSDP2, where they
        travel with the weight norms)."""
        n = len(self.specs)
        inv = self._inv_scale()
        count: list = list(acc.count)
        gsq = list(acc.grad_sq)
        alive = self._alive(acc, device)
        means, m2s, sat = list(acc.mean), list(acc.m2), list(acc.sat)
        scale = 1.0
        if self._reduce:
            if reduced is None:
                flat = self._act_sums(acc, device, loss_t, accuracy_t)
                dst = 0 if self._group is None else torch.distributed.get_global_rank(self._group, 0)
                torch.distributed.reduce(flat, dst=dst, group=self._group)
                if not self.writes:
                    return None
            else:
                flat = reduced
            count = list(flat[0:n])
            means = [flat[n + i] / flat[i] for i in range(n)]
            m2s = [flat[2 * n + i] - flat[n + i] * means[i] for i in range(n)]
            sat = [flat[3 * n + i] for i in range(n)]
            gsq = [flat[4 * n + i] if acc.grad_sq[i] is not None else None for i in range(n)]
            loss_t = (flat[5 * n] / self.world_size).float()
            accuracy_t = (flat[5 * n + 1] / self.world_size).float()
            offset = 5 * n + 2
            for i, a in enumerate(alive):
                if a is not None:
                    alive[i] = flat[offset:offset + a.numel()]
                    offset += a.numel()
            scale = 1.0 / self.world_size  # DDP averages: ∂(mean of rank losses)/∂h_r = ∂L_r/∂h_r / R
        nan = torch.full((), float("nan"), device=device)
        stats, grads, series = [], [], []
        grad_scale = None
        if inv is not None or scale != 1.0:
            grad_scale = inv * scale if inv is not None else scale
        for i in range(n):
            if acc.count[i] == 0:  # not reached on this rank (so, presumably, on any)
                stats.append(nan.expand(4))
            else:
                c = count[i]
                var = m2s[i].clamp_min(0) / ((c - 1).clamp_min(1) if isinstance(c, torch.Tensor) else max(c - 1, 1))
                saturated = (sat[i] / c).float() if sat[i] is not None else nan
                dead = (alive[i] == 0).float().mean() if alive[i] is not None and alive[i].numel() else nan
                stats.append(torch.stack([means[i].float(), var.sqrt().float(), saturated, dead]))
            if gsq[i] is None:
                grads.append(nan)
            else:
                norm = gsq[i].sqrt()
                grads.append((norm * grad_scale if grad_scale is not None else norm).float())
            per_t = acc.time_sq[i]
            if per_t is None and acc.calls[i]:
                per_t = torch.stack([acc.calls[i][t].float() for t in sorted(acc.calls[i])])
            if per_t is not None and not isinstance(self.specs[i].output_module, RECURRENT):
                # (a fused module's output gradient is only the direct path: its series come below)
                norms = per_t.sqrt()
                if grad_scale is not None:
                    norms = norms * grad_scale
                series.append((i, downsample_time(norms.float())))
        timed, notices = self._through_time.series(grad_scale)  # fused recurrent layers, named keys
        series += timed
        for notice in notices if self._sink is not None else ():
            self._sink.put(RunEvent("notice", notice, self.step_index, self.run_id))
        act_grad = torch.stack(grads)
        # Percentiles of the strided samples of every micro-batch of the step, pooled (this rank's
        # only: they do not add across ranks), all layers in one sort.
        if any(acc.samples):
            percentiles = self._percentiles([torch.cat(parts) if parts else nan.new_empty(0) for parts in acc.samples])
        else:
            percentiles = nan.expand(n, len(ACT_PERCENTILES))
        reached = np.array([c > 0 for c in acc.count], dtype=bool)
        got_grad = np.array([g is not None for g in acc.grad_sq], dtype=bool)
        return (torch.cat([torch.stack(stats), percentiles], dim=1), act_grad, act_grad, reached, got_grad, series,
                loss_t, accuracy_t)

    def _meta(self) -> dict:
        return {"phase": "train", "run_id": self.run_id, "time": time.perf_counter() - self._t0,
                "steps_per_sec": self._rate, "sample_every": self.sample_every,
                "probe_overhead": self.overhead}

    def _finalize_pending(self, stepped: bool) -> None:
        """Pack the measured step (now that the optimiser has updated W) into one tensor and start
        its single device-to-host copy: :func:`vgtui.engine.pack`, as the trainer does."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.get("sharded"):
            pending = self._reduce_sharded(pending, stepped)
            if pending is None:  # not the recording rank: it only joined the reduce
                return
        layout = self.layout
        device = self._device()
        host: HostSide = pending["host"]
        detail = None
        if host.detail:
            plan = pending["plan"]
            known = plan is not None and (plan.kind == "snapshot" or stepped)
            if "weight_norm" in pending:  # FSDP2: summed over the shards already
                weight_norm, update = pending["weight_norm"], pending["update"]
            else:
                weight_norm = layout.per_layer(tensor_norms([p.detach() for p in layout.params]))
                update = (UpdateMeter.norms(layout, plan, device) if known
                          else torch.full((len(layout),), float("nan"), device=device))
            host.update_known = known
            host.lrs = plan.lrs if known and plan.kind == "momentum" else None
            stats = pending["stats"]
            detail = [stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], weight_norm, update,
                      *stats[:, 4:].unbind(1)]
        act_mark = torch.where(torch.isfinite(pending["stats"][:, 0]), 0.0, float("nan")) if host.detail \
            else torch.zeros(len(layout), device=device)
        total, after, acted = pending["clip"]
        loss = pending["loss"]
        scale = pending["loss_scale"]
        scalars = [loss, pending["accuracy"], total, after, acted, pending["skipped"],
                   scale if scale is not None else torch.full((), float("nan"), device=device)]
        core = [pending["wgrad"], pending["act_grad"], act_mark, pending["grad_mark"]]
        packed = pack(scalars, core, detail, pending["hist"], pending["series"], pending["window"])
        self._transfer.start(packed, host)

    def _emit_ready(self, wait: bool) -> None:
        if self._sink is None:
            return
        for host, values in self._transfer.poll(wait=wait):
            record, extra = unpack(values, self.layout, host)
            if extra["skipped"] > 0:
                # fp16 loss scaling overflowed: GradScaler skips this step and lowers the scale.
                # That is its normal calibration, not a diverging network: say so, raise no alarm.
                self._sink.put(RunEvent("notice", f"step {record.step}: the AMP GradScaler skipped the update "
                                        f"(inf/NaN gradients at loss scale {extra['loss_scale']:g}) and lowers "
                                        "the scale", record.step, self.run_id))
            self._sink.put(record)


def _scalar(value, device) -> torch.Tensor:
    if value is None:
        return torch.full((), float("nan"), device=device)
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value if value.dim() == 0 else value.float().mean()).float().to(device)
    return torch.full((), float(value), device=device)  # a fill kernel, not a host-to-device copy


def _exit_hook(watcher: Watcher):
    """At interpreter exit, close a watcher the user forgot (keeps the file's last records)."""
    ref = weakref.ref(watcher)

    def close_at_exit() -> None:
        w = ref()
        if w is not None:
            try:
                w.close()
            except Exception:
                pass

    return close_at_exit


def watch(model: nn.Module, *, layers: LayersArg = None, sample_every: int = 1,
          record: str | Path | Any | None = None, channel: Channel | None = None, optimizer=None,
          scaler=None, diagnose: bool = True, histograms: bool = True, per_rank: bool = False,
          start_step: int = 0, run_id: int = 0, name: str | None = None,
          detail_every: int = DETAIL_EVERY, overhead_budget: float | None = DEFAULT_BUDGET,
          window: bool | None = None, run_info: dict | None = None, process_group=None) -> Watcher:
    """Attach vgtui to ``model`` (a plain module, a DDP-wrapped one, or a ``torch.compile``d one).

    Returns a :class:`Watcher`: call :meth:`Watcher.step` once per optimiser step (and
    :meth:`Watcher.before_clip` before your clipping), then :meth:`Watcher.close`.

    Args:
        layers:       None (every module that directly owns trainable parameters, in forward order),
                      a predicate ``(name, module) -> bool`` over those, or a list of module names,
                      modules or :class:`vgtui.LayerSpec` (kept in the given order).
        sample_every: measure at most every N-th optimiser step (the first is always measured).
        overhead_budget: the share of training time measuring may take (default 0.02): when it
                      costs more, the interval between measured steps widens (never below
                      ``sample_every``). None: exactly every ``sample_every`` steps (so too under
                      DDP, where every rank must measure the same steps).
        detail_every: activation statistics, ‖W‖, update ratios and histograms on every N-th measured
                      step (the gradient norms on all of them).
        record:       a JSONL path (the format of ``vgtui run --record``: ``vgtui replay/attach`` read
                      it), or an open text file object.
        channel:      a :class:`vgtui.channel.Channel` that receives the same records in-process.
        optimizer:    the default for :meth:`Watcher.step` (a torch optimizer or a wrapper of one).
        scaler:       a ``torch.amp.GradScaler``: gradients are read unscaled and activation
                      gradients have the loss scale divided out.
        window:       every step's loss and global gradient norm (min/max/mean/last) in the next
                      record's ``window``. None (default): the loss always; the norm on CUDA and
                      wherever ``clip_grad_norm_`` returns it, else left out (``grad_norm_*`` None).
                      True: the norm on every step too (one read of every gradient a step). False: off.
        diagnose:     attach the diagnosis's verdicts to each record.
        per_rank:     under torchrun every rank writes its own file (``run.rank<N>.jsonl``) with its
                      local activation statistics; default: rank 0 records the global step.
        run_info:     keys merged into the header's ``preset`` (a framework integration's description
                      of the run: its clip setting, precision, ...); read when the header is written at
                      the first step, so it may be filled in until then.
        process_group: reduce the activation sums over this group's ranks, as under DDP, for a module
                      trained data-parallel but not passed DDP-wrapped (Lightning's DDP strategy hands
                      callbacks the inner module); gradients must be averaged over the group.

    Returns:
        The :class:`Watcher`, already attached (its hooks exist only on measured steps).

    FSDP2 (``fully_shard``) models are measured from their local shards (see docs/API.md); tensor
    parallelism is refused with a ValueError.
    """
    return Watcher(model, layers=layers, sample_every=sample_every, record=record, channel=channel,
                   optimizer=optimizer, scaler=scaler, diagnose=diagnose, histograms=histograms,
                   per_rank=per_rank, start_step=start_step, run_id=run_id, name=name,
                   detail_every=detail_every, overhead_budget=overhead_budget, window=window,
                   run_info=run_info, process_group=process_group)
