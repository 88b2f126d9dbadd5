"""Watch your own model in your own training loop.

    watcher = vgtui.watch(model, record="run.jsonl", sample_every=10, optimizer=opt, scaler=scaler)
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

What is measured, and when (the places where monitors usually go wrong):

* ``‖∂L/∂W‖`` per layer and the global ``‖g‖`` are read from ``.grad`` at ``before_clip()`` (or at
  ``step()`` when there is none): after backward, so after DDP's all-reduce and after every
  micro-batch has accumulated, and after AMP unscaling (the watcher calls ``scaler.unscale_(opt)``
  itself when it was given the scaler and you have not). The global norm after clipping is read
  again at ``step()``; "clipped" means clipping shrank it.
* ``‖∂L/∂h‖`` (the back-propagated activation gradient) comes from tensor hooks that fire once per
  micro-batch. Micro-batches hold different examples, so the gradient of the summed loss with
  respect to the whole step's activations is the concatenation of the per-micro-batch gradients,
  and its norm is ``sqrt(Σ_k ‖∂L_k/∂h_k‖²)``: that is what is recorded (with the AMP loss scale
  divided out). With equal micro-batches and ``loss / accum`` this equals the norm a single pass
  over the combined batch would give (exactly so for models without batch statistics).
* Activation mean/std/saturation/dead units are pooled over every micro-batch of the step
  (forward passes with gradients disabled, e.g. validation, are ignored).
* Under DDP the activation sums are combined across ranks with one small reduce per sampled step
  (DDP's default gradient averaging assumed), so rank 0 records the step of the combined global
  batch. Other ranks compute their share on the device, join that reduce, and do nothing else:
  no device-to-host copy, no file, no waiting on rank 0's writing (which runs on a thread).
* Under ``torch.compile`` the hooks inside the compiled region do nothing (they would break the
  graph): weight gradients, global norms, weight norms and update sizes are measured; per-layer
  activation statistics and ``‖∂L/∂h‖`` are recorded as NaN ("not measured").

All arithmetic stays on the device; a sampled step ends in one device-to-host transfer (on CUDA a
non-blocking copy into pinned memory, read when it has arrived), and unsampled steps cost a flag
test per hook.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .layers import LayerSpec
from .channel import Channel
from .config import RECTIFYING
from .probe import SATURATION_MARGIN, HostTransfer, LogHistograms
from .records import (HIST_BINS, LAYER_METRICS, RunEvent, RunHeader,
                      StepRecord)

__all__ = ["Watcher", "watch", "default_layers"]

LayersArg = None | Callable[[str, nn.Module], bool] | Sequence[str | nn.Module | LayerSpec]


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


def _spec(name: str, module: nn.Module) -> LayerSpec:
    params = _trainable_direct(module)
    if not params:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) owns no trainable parameter: "
                         "pick modules that hold weights, or pass a vgtui.LayerSpec")
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.requires_grad):
        weight = params[0]
    # A compiled submodule shows up as "<name>._orig_mod.<child>": name the user's module instead.
    name = name.replace("._orig_mod", "").replace("_orig_mod.", "")
    return LayerSpec(name or type(module).__name__, module, weight)


def default_layers(model: nn.Module) -> list[LayerSpec]:
    """Every module that directly owns a trainable parameter (in ordinary models: the leaf
    Linear/Conv/Norm/Embedding modules), in registration order; :func:`watch` re-sorts them into
    forward order on the first forward pass. ``‖∂L/∂W‖`` is of ``module.weight`` (else its first
    trainable parameter); ``h`` is the module's output."""
    inner, _, _ = _unwrap(model)
    return [_spec(name, m) for name, m in inner.named_modules() if _trainable_direct(m)]


def _resolve_layers(inner: nn.Module, layers: LayersArg) -> tuple[list[LayerSpec], bool]:
    """The layer specs and whether to sort them into forward order."""
    if layers is None:
        specs = default_layers(inner)
        auto = True
    elif callable(layers) and not isinstance(layers, (list, tuple)):
        specs = [_spec(n, m) for n, m in inner.named_modules() if _trainable_direct(m) and layers(n, m)]
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


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. nn.MultiheadAttention, nn.LSTM: the main output
    return None


def _rank_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix or '.jsonl'}")


# -- the sink: diagnosis, file and channel, off the training thread --------------------------------
class _Sink(threading.Thread):
    """Diagnoses, writes and publishes records on its own thread, so that the training loop (and,
    under DDP, every rank waiting at the next collective) never waits on disk or on the diagnosis."""

    _STOP = object()

    def __init__(self, path: Path | None, channel: Channel | None, diagnose: bool):
        super().__init__(name="vgtui-sink", daemon=True)
        from .jsonl import JsonlWriter

        self.writer = JsonlWriter(path) if path is not None else None
        self.channel = channel
        self.diagnose = diagnose
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.latest: StepRecord | None = None
        self.written = 0
        self._diagnoser = None
        self._failed = False

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
                from .diagnosis import Diagnoser

                self._diagnoser = Diagnoser(record)
            except Exception as exc:  # the diagnosis is advice: never lose the measurements to it
                warnings.warn(f"vgtui: diagnosis disabled ({type(exc).__name__}: {exc})", stacklevel=1)
        if isinstance(record, StepRecord):
            if self._diagnoser is not None:
                try:
                    record.verdicts = self._diagnoser.update(record)
                except Exception as exc:
                    warnings.warn(f"vgtui: diagnosis disabled ({type(exc).__name__}: {exc})", stacklevel=1)
                    self._diagnoser = None
            self.latest = record
        if self.writer is not None and not self._failed:
            try:
                self.writer.write(record)
                self.written += 1
            except OSError as exc:
                self._failed = True
                warnings.warn(f"vgtui: stopped writing {self.writer.path}: {exc}", stacklevel=1)
        if self.channel is not None:
            self.channel.put(record)

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
            self.writer.close()


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
    """Device-side running sums for one optimiser step, per layer (registration index). Counts
    are known on the host (numel), so combining them costs no device work."""

    def __init__(self, n_layers: int):
        self.count: list[int] = [0] * n_layers  # activation elements seen
        self.mean: list[torch.Tensor | None] = [None] * n_layers
        self.m2: list[torch.Tensor | None] = [None] * n_layers  # Σ (x - mean)^2
        self.sat: list[torch.Tensor | None] = [None] * n_layers  # count of saturated elements
        self.alive: list[torch.Tensor | None] = [None] * n_layers  # per unit: examples where > 0
        self.grad_sq: list[torch.Tensor | None] = [None] * n_layers  # Σ_k ‖∂L_k/∂h_k‖²

    def add_stats(self, i: int, a: torch.Tensor, kind: str) -> None:
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
        if kind == "sigmoid":
            sat = ((a - 0.5).abs_() > 0.5 - SATURATION_MARGIN).sum(dtype=torch.float64)
        elif kind == "tanh":
            sat = (a.abs() > 1.0 - SATURATION_MARGIN).sum(dtype=torch.float64)
        else:
            sat = None
        if sat is not None:
            self.sat[i] = sat if self.sat[i] is None else self.sat[i] + sat
        if kind in RECTIFYING and a.dim() >= 2:
            units = a.transpose(0, 1).reshape(a.shape[1], -1)
            alive = (units > 0).any(dim=1).to(torch.float64)
            prev = self.alive[i]
            self.alive[i] = alive if prev is None or prev.shape != alive.shape else prev + alive

    def add_grad(self, i: int, grad: torch.Tensor) -> None:
        flat = grad.detach().reshape(-1).float()
        sq = torch.dot(flat, flat)  # ‖g‖², one BLAS pass
        self.grad_sq[i] = sq if self.grad_sq[i] is None else self.grad_sq[i].double() + sq.double()


class Watcher:
    """Measures a model inside the user's loop; create it with :func:`watch`.

    Per optimiser step: (optionally) :meth:`before_clip` after unscaling and before clipping, or
    :meth:`clip_grad_norm_` to let the watcher clip; then :meth:`step` once, before
    ``optimizer.step()``. :meth:`close` (or leaving a ``with`` block) removes every hook, waits for
    the last measurement and closes the file.
    """

    def __init__(self, model: nn.Module, *, layers: LayersArg = None, sample_every: int = 1,
                 record: str | Path | None = None, channel: Channel | None = None, optimizer=None,
                 scaler=None, diagnose: bool = True, histograms: bool = True, per_rank: bool = False,
                 start_step: int = 0, run_id: int = 0, name: str | None = None):
        if int(sample_every) < 1:
            raise ValueError(f"sample_every must be at least 1, got {sample_every}")
        self.model = model
        self.inner, self.ddp, self.compiled = _unwrap(model)
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
        # Distributed: who writes, and whether activation sums must be combined across ranks.
        self.rank, self.world_size, self._group = 0, 1, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._group = getattr(self.ddp, "process_group", None) if self.ddp is not None else None
            self.rank = torch.distributed.get_rank(self._group)
            self.world_size = torch.distributed.get_world_size(self._group)
        self.writes = per_rank or self.rank == 0
        self._reduce = self.ddp is not None and self.world_size > 1 and not per_rank
        self._measures = self.writes or self._reduce  # rank != 0 outside DDP: nothing to do
        path = None
        if record is not None and self.writes:
            path = Path(record)
            if per_rank and self.world_size > 1:
                path = _rank_path(path, self.rank)
        self.record_path = path
        self._sink = _Sink(path, channel, diagnose) if self.writes else None
        # Hooks and per-step state.
        self._handles: list = []
        self._opt_handles: dict[int, Any] = {}
        self._seen: list[int] = []  # registration indices in first-forward order
        self._seen_set: set[int] = set()
        self._started = False
        self._closed = False
        self._order: list[int] = list(range(len(self.specs)))
        self._units: list[int | None] = [None] * len(self.specs)
        self._acc = _Accumulator(len(self.specs))
        self._transfer = HostTransfer()
        self._hist = LogHistograms()
        self._pre_clip: tuple | None = None  # (‖∂L/∂W‖ per layer, histograms, global ‖g‖)
        self._post_clip: torch.Tensor | None = None
        self._pending: dict | None = None
        self._no_loss: set[int] = set()  # steps whose loss was not given: NaN there is no alarm
        self._clip_info: tuple[str, float | None] | None = None  # known once the user clips
        self.sampled = self._is_sampled(self.step_index)
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._rate = float("nan")
        self.steps = 0
        self._attach()
        self._exit_hook = _exit_hook(self)
        atexit.register(self._exit_hook)

    # -- public ------------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [self.specs[i].name for i in self._order]

    @property
    def latest(self) -> StepRecord | None:
        """The last measured step that reached the sink (rank 0, or every rank in per-rank mode)."""
        return self._sink.latest if self._sink is not None else None

    @property
    def transfers(self) -> int:
        """Device-to-host transfers so far: one per sampled step on a writing rank, else zero."""
        return self._transfer.count

    def before_clip(self, optimizer=None) -> None:
        """Measure per-layer ``‖∂L/∂W‖``, histograms and the global norm now: call it after
        ``scaler.unscale_(opt)`` and before your own ``clip_grad_norm_``."""
        self._check_open()
        if self._clip_info is None:
            self._clip_info = ("norm", None)  # the usual clip_grad_norm_; its threshold is the user's
        self._start()
        self._unscale(optimizer if optimizer is not None else self.optimizer)  # sampled or not
        if self.sampled and self.writes:
            self._pre_clip = self._read_gradients()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, *, optimizer=None,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the model's parameters, measured before and after
        (unscaling first when the watcher knows the GradScaler). Returns the total norm, like torch."""
        self._clip_info = ("norm", float(max_norm))
        self.before_clip(optimizer)
        total = torch.nn.utils.clip_grad_norm_(self.params, max_norm, norm_type,
                                               error_if_nonfinite=error_if_nonfinite)
        if self.sampled and self.writes and norm_type == 2.0 and self._pre_clip is not None:
            # torch scales every gradient by min(1, max_norm / (total + 1e-6)): the norm after it
            self._post_clip = self._pre_clip[2] * torch.clamp(max_norm / (self._pre_clip[2] + 1e-6), max=1.0)
        return total

    def step(self, optimizer=None, loss: torch.Tensor | float | None = None, *,
             accuracy: torch.Tensor | float | None = None) -> None:
        """Close the measurement of this optimiser step. Call once per optimiser step, after the
        last micro-batch's backward (and your clipping), before ``optimizer.step()``.
        ``loss`` is recorded as given (under DDP: averaged over ranks)."""
        self._check_open()
        if self.optimizer is None:
            self.optimizer = optimizer  # the default from now on (and the header's lr)
        optimizer = optimizer if optimizer is not None else self.optimizer
        self._start()
        self._finalize_pending(stepped=False)
        if optimizer is not None and self.writes:
            self._hook_optimizer(optimizer)
        self._unscale(optimizer)  # sampled or not, so that every step behaves the same
        if self.sampled and self._measures:
            self._measure(optimizer, loss, accuracy)
        self._pre_clip = self._post_clip = None
        self.step_index += 1
        self.steps += 1
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        self._last = now
        self._rate = 1.0 / dt if math.isnan(self._rate) else 0.9 * self._rate + 0.1 / dt
        self.sampled = self._is_sampled(self.step_index)
        self._emit_ready(wait=False)

    def close(self) -> None:
        """Remove every hook, record the last step, flush and close the file. Idempotent."""
        if self._closed:
            return
        try:
            if self._sink is not None:
                self._start()  # a run of zero steps is still a valid recording (header, events)
            if self._started:
                self._finalize_pending(stepped=False)
                self._emit_ready(wait=True)
                if self._sink is not None:
                    self._sink.put(RunEvent("finished", f"{self.steps} steps", self.step_index, self.run_id))
        finally:
            self._closed = True
            self.detach()
            if self._sink is not None:
                self._sink.close()
            atexit.unregister(self._exit_hook)

    def detach(self) -> None:
        """Remove every hook this watcher installed (forward hooks and optimiser step hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for handle in self._opt_handles.values():
            handle.remove()
        self._opt_handles.clear()

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hooks -------------------------------------------------------------------------------------
    def _attach(self) -> None:
        if not self._measures:
            return  # a non-writing rank outside DDP: nothing of it is recorded
        for index, spec in enumerate(self.specs):
            stats_module = spec.act_module or spec.output_module
            self._handles.append(stats_module.register_forward_hook(self._stats_hook(index, spec.act_kind)))
            self._handles.append(spec.output_module.register_forward_hook(self._grad_hook(index)))

    def _stats_hook(self, index: int, kind: str):
        def hook(module, inputs, output):
            if torch.compiler.is_compiling():
                return  # inside a compiled graph: measuring would break it (see the module doc)
            if not self.sampled or self._closed or not torch.is_grad_enabled():
                return
            out = _first_tensor(output)
            if out is None or out.numel() == 0:
                return
            with torch.no_grad():
                a = out.detach().float()
                if a.dim() >= 2:
                    self._units[index] = a.shape[1]
                self._acc.add_stats(index, a, kind)

        return hook

    def _grad_hook(self, index: int):
        def on_grad(grad: torch.Tensor) -> None:
            if not self._closed:  # self._acc is looked up now: it is replaced at every step()
                self._acc.add_grad(index, grad)

        def hook(module, inputs, output):
            if torch.compiler.is_compiling():
                return
            if not self._started and index not in self._seen_set:
                self._seen_set.add(index)
                self._seen.append(index)
            if not self.sampled or self._closed:
                return
            out = _first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(on_grad)

        return hook

    def _hook_optimizer(self, optimizer) -> None:
        key = id(optimizer)
        if key in self._opt_handles or not hasattr(optimizer, "register_step_post_hook"):
            return
        ref = weakref.ref(self)

        def after_step(opt, args, kwargs):
            watcher = ref()
            if watcher is not None and not watcher._closed:
                watcher._finalize_pending(stepped=True)

        self._opt_handles[key] = optimizer.register_step_post_hook(after_step)

    # -- the step ----------------------------------------------------------------------------------
    def _is_sampled(self, step: int) -> bool:
        return step % self.sample_every == 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Watcher is closed")

    def _start(self) -> None:
        """On the first step: fix the layer order (forward order) and write the header."""
        if self._started:
            return
        self._started = True
        if self._auto_order:
            seen = set(self._seen)
            self._order = list(self._seen) + [i for i in range(len(self.specs)) if i not in seen]
        layers = [self.specs[i] for i in self._order]
        if self._sink is None:
            return
        device = self.params[0].device if self.params else torch.device("cpu")
        header = RunHeader(
            preset=self._preset(),
            layers=[spec.name for spec in layers],
            layer_kinds=[spec.act_kind for spec in layers],
            device=str(device),
            run_id=self.run_id,
            params=sum(p.numel() for p in self.params),
            source="api",
        )
        self._sink.start()
        self._sink.put(header)
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        self._sink.put(RunEvent("started", f"watching {self.name}{where}: {len(layers)} layers",
                                self.step_index, self.run_id))

    def _preset(self) -> dict:
        """What the header can say about the user's run (the TUI and the diagnosis read it)."""
        preset = {
            "name": self.name,
            "description": f"{self.name}, watched in its own training loop (vgtui.watch)",
            "source": "vgtui.watch",
            "task": "custom",
            "sample_every": self.sample_every,
            "clip": self._clip_info[0] if self._clip_info else "none",
            "world_size": self.world_size,
            "rank": self.rank if self.per_rank else 0,
            "per_rank": self.per_rank,
            "compiled": self.compiled,
        }
        if self._clip_info and self._clip_info[1] is not None:
            preset["clip_threshold"] = self._clip_info[1]
        if self.optimizer is not None:
            preset["optimizer"] = type(self.optimizer).__name__
            lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
            if isinstance(lr, (int, float)):
                preset["lr"] = float(lr)
        return preset

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

    def _measure(self, optimizer, loss, accuracy) -> None:
        """Everything of a sampled step that must be read before the optimiser changes it."""
        acc, self._acc = self._acc, _Accumulator(len(self.specs))
        device = self._device()
        loss_t = _scalar(loss, device)
        accuracy_t = _scalar(accuracy, device)
        stats, act_grad, loss_t, accuracy_t = self._combine(acc, device, loss_t, accuracy_t)
        if not self.writes:
            return
        if self._pre_clip is None:  # nobody clipped in between: these are the gradients applied
            wgrad, hist, total = self._read_gradients()
            clip = (total, total, torch.zeros((), dtype=torch.bool, device=device))
        else:
            wgrad, hist, total = self._pre_clip
            if self._post_clip is not None:  # our own clip: its result is known without a pass
                after = self._post_clip
            else:
                grads = self._grads()
                after = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                         if grads else torch.zeros((), device=device))
            clip = (total, after, after < total * (1.0 - 1e-6))
        found_inf = self._found_inf(optimizer)
        self._pending = {
            "step": self.step_index, "stats": stats, "act_grad": act_grad, "wgrad": wgrad,
            "hist": hist, "clip": clip, "loss": loss_t, "accuracy": accuracy_t,
            "skipped": found_inf if found_inf is not None else torch.zeros((), device=device),
            "loss_scale": self.scaler._scale.detach().clone() if self._inv_scale() is not None else None,
            "update": self._update_plan(optimizer), "meta": self._meta(),
        }
        if loss is None:
            self._no_loss.add(self.step_index)

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _weights(self) -> list[torch.Tensor]:
        return [self.specs[i].weight for i in self._order]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def _read_gradients(self):
        """Per-layer ‖∂L/∂W‖ (float32, probe order), histograms, and the global norm, on the
        device, from one norm pass over all gradients (the layers' weights are among them)."""
        weights = self._weights()
        grads = [w.grad.detach() if w.grad is not None else torch.zeros_like(w) for w in weights]
        params = [p for p in self.params if p.grad is not None]
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        where = {id(p): k for k, p in enumerate(params)}
        missing = [k for k, w in enumerate(weights) if id(w) not in where]
        extra = dict(zip(missing, torch._foreach_norm([grads[k] for k in missing]))) if missing else {}
        wgrad = torch.stack([norms[where[id(w)]] if id(w) in where else extra[k]
                             for k, w in enumerate(weights)]).float()
        total = (torch.linalg.vector_norm(torch.stack(norms).float()) if params
                 else torch.zeros((), device=self._device()))
        hist = self._hist(grads) if self.histograms else None
        return wgrad, hist, total

    def _update_plan(self, optimizer):
        """How to measure ‖ΔW‖ after the optimiser step: SGD with momentum steps by exactly
        lr·buffer (read the buffers then, no copy of W); otherwise snapshot W now."""
        weights = self._weights()
        if isinstance(optimizer, torch.optim.SGD):
            buffers, lrs = [], []
            for w in weights:
                group = next((g for g in optimizer.param_groups if any(p is w for p in g["params"])), None)
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if group is None or not group["momentum"] or group.get("nesterov") or buf is None:
                    break
                buffers.append(buf)
                lrs.append(group["lr"])  # the lr of this step, read before a scheduler changes it
            else:
                return ("momentum", buffers, lrs)
        return ("snapshot", [w.detach().clone() for w in weights])

    def _combine(self, acc: _Accumulator, device, loss_t, accuracy_t):
        """(n, 4) [mean, std, saturated, dead] and (n,) ‖∂L/∂h‖ in probe order (NaN where the layer
        produced nothing), pooled over the step's micro-batches and, under DDP, over ranks."""
        n = len(self.specs)
        inv = self._inv_scale()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        count: list = list(acc.count)
        gsq = list(acc.grad_sq)
        alive = []
        for i in range(n):
            if acc.alive[i] is not None:
                alive.append(acc.alive[i])
            elif self.specs[i].act_kind in RECTIFYING and self._units[i]:
                alive.append(torch.zeros(self._units[i], dtype=torch.float64, device=device))
            else:
                alive.append(None)
        means, m2s, sat = list(acc.mean), list(acc.m2), list(acc.sat)
        scale = 1.0
        if self._reduce:
            # Sums that add across ranks: count, Σx, Σx², saturated count, ‖∂L/∂h‖², units alive.
            fill = [torch.full((), float(c), dtype=torch.float64, device=device) for c in count]
            s1 = [m.double() * c if m is not None else zero for m, c in zip(means, count)]
            s2 = [q.double() + m.double().square() * c if m is not None else zero
                  for m, q, c in zip(means, m2s, count)]
            parts = [torch.stack(fill), torch.stack(s1), torch.stack(s2),
                     torch.stack([x.double() if x is not None else zero for x in sat]),
                     torch.stack([g.double() if g is not None else zero for g in gsq]),
                     torch.stack([loss_t.double(), accuracy_t.double()])]
            parts += [a for a in alive if a is not None]
            flat = torch.cat([p.reshape(-1) for p in parts])
            dst = 0 if self._group is None else torch.distributed.get_global_rank(self._group, 0)
            torch.distributed.reduce(flat, dst=dst, group=self._group)
            if not self.writes:
                return None, None, None, None
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
        stats, grads = [], []
        for i in self._order:
            if acc.count[i] == 0:  # not reached on this rank (so, presumably, on any)
                stats.append(nan.expand(4))
            else:
                c = count[i]
                var = m2s[i].clamp_min(0) / ((c - 1).clamp_min(1) if isinstance(c, torch.Tensor) else max(c - 1, 1))
                kind = self.specs[i].act_kind
                saturated = (sat[i] / c).float() if kind in ("sigmoid", "tanh") and sat[i] is not None else nan
                dead = (alive[i] == 0).float().mean() if alive[i] is not None and alive[i].numel() else nan
                stats.append(torch.stack([means[i].float(), var.sqrt().float(), saturated, dead]))
            if gsq[i] is None:
                grads.append(nan)
            else:
                norm = gsq[i].sqrt()
                if inv is not None:
                    norm = norm * inv  # the loss scale S the backward ran with
                grads.append((norm * scale).float())
        # Masks from device constants (torch.tensor(list, device=cuda) would be a blocking copy).
        yes, no = torch.ones((), dtype=torch.bool, device=device), torch.zeros((), dtype=torch.bool, device=device)
        reached = torch.stack([yes if acc.count[i] else no for i in self._order])
        got_grad = torch.stack([yes if acc.grad_sq[i] is not None else no for i in self._order])
        return (torch.stack(stats), reached), (torch.stack(grads), got_grad), loss_t, accuracy_t

    def _meta(self) -> dict:
        return {"phase": "train", "run_id": self.run_id, "time": time.perf_counter() - self._t0,
                "steps_per_sec": self._rate, "sample_every": self.sample_every}

    def _finalize_pending(self, stepped: bool) -> None:
        """Pack the measured step (now that the optimiser has updated W) into one tensor and start
        its single device-to-host copy. Same columns and checks as :class:`vgtui.probe.Probe`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        weights = [w.detach() for w in self._weights()]
        device = weights[0].device
        weight_norm = torch.stack(torch._foreach_norm(weights)).float()
        plan = pending["update"]
        if plan[0] == "snapshot":
            update = torch.stack(torch._foreach_norm(torch._foreach_sub(weights, plan[1]))).float()
        elif stepped:  # the optimiser's step hook fired: its buffers are this step's
            # lr as a kernel scalar (a float) or a device tensor: no host-to-device copy.
            norms = torch._foreach_norm(plan[1])
            update = torch.stack([n.float() * lr for n, lr in zip(norms, plan[2])])
        else:  # a skipped (AMP) or foreign step: the buffers say nothing about this step
            update = torch.full_like(weight_norm, float("nan"))
        stats, reached = pending["stats"]
        act_grad, got_grad = pending["act_grad"]
        wgrad = pending["wgrad"]
        fwd_finite = torch.isfinite(stats[:, 0]) | ~reached  # nothing measured counts as finite
        bwd_finite = (torch.isfinite(act_grad) | ~got_grad) & torch.isfinite(wgrad)
        per_layer = torch.stack([
            wgrad, act_grad, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3],
            weight_norm, update / weight_norm.clamp_min(1e-30), fwd_finite.float(), bwd_finite.float(),
        ], dim=1)
        total, after, acted = pending["clip"]
        loss = pending["loss"]
        scale = pending["loss_scale"]
        scalars = torch.stack([loss, pending["accuracy"], total.float(), after.float(), acted.float(),
                               torch.isfinite(loss).float(), pending["skipped"].float(),
                               scale.float() if scale is not None else torch.full_like(loss, float("nan"))])
        hist = pending["hist"] if pending["hist"] is not None else torch.zeros(
            len(weights), HIST_BINS, device=device)
        packed = torch.cat([scalars, per_layer.reshape(-1), hist.reshape(-1)])
        self._transfer.start(packed, (pending["step"], pending["meta"]))

    def _emit_ready(self, wait: bool) -> None:
        if self._sink is None:
            return
        for (step, meta), values in self._transfer.poll(wait=wait):
            record = self._unpack(step, meta, values)
            if record.step in self._no_loss:
                self._no_loss.discard(record.step)
                if record.nonfinite == ("loss", "forward"):
                    record.nonfinite = None
            skipped, scale = values[_SCALARS - 2], values[_SCALARS - 1]
            if skipped > 0 and record.nonfinite is not None and record.nonfinite[1] == "backward":
                # fp16 loss scaling overflowed: GradScaler skips this step and lowers the scale.
                # That is its normal calibration, not a diverging network: say so, raise no alarm.
                record.nonfinite = None
                self._sink.put(RunEvent("notice", f"step {step}: the AMP GradScaler skipped the update "
                                        f"(inf/NaN gradients at loss scale {scale:g}) and lowers the scale",
                                        step, self.run_id))
            self._sink.put(record)

    def _unpack(self, step: int, meta: dict, values: np.ndarray) -> StepRecord:
        names = self.layer_names
        n = len(names)
        loss, acc, total, after, acted, loss_finite = values[:6]
        per_layer = values[_SCALARS:_SCALARS + n * _COLUMNS].reshape(n, _COLUMNS)
        hist = values[_SCALARS + n * _COLUMNS:].reshape(n, HIST_BINS)
        fwd_bad = np.flatnonzero(per_layer[:, len(LAYER_METRICS)] < 0.5)
        bwd_bad = np.flatnonzero(per_layer[:, len(LAYER_METRICS) + 1] < 0.5)
        nonfinite = None
        if len(fwd_bad):
            nonfinite = (names[fwd_bad[0]], "forward")
        elif len(bwd_bad):
            nonfinite = (names[bwd_bad[-1]], "backward")  # output -> input: the last index first
        elif loss_finite < 0.5:
            nonfinite = ("loss", "forward")
        return StepRecord(
            step=step, loss=float(loss), accuracy=float(acc), grad_norm_total=float(total),
            grad_norm_clipped=float(after), clipped=bool(acted > 0.5),
            layers={name: per_layer[:, i].copy() for i, name in enumerate(LAYER_METRICS)},
            hist=hist, nonfinite=nonfinite, **meta,
        )


_COLUMNS = len(LAYER_METRICS) + 2  # + forward finite flag, backward finite flag
#: loss, accuracy, grad_norm_total, grad_norm_clipped, clipped, loss finite, AMP skipped, loss scale
_SCALARS = 8
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
          record: str | Path | None = None, channel: Channel | None = None, optimizer=None,
          scaler=None, diagnose: bool = True, histograms: bool = True, per_rank: bool = False,
          start_step: int = 0, run_id: int = 0, name: str | None = None) -> Watcher:
    """Attach vgtui to ``model`` (a plain module, a DDP-wrapped one, or a ``torch.compile``d one).

    layers:       None (every module that directly owns trainable parameters, in forward order),
                  a predicate ``(name, module) -> bool`` over those, or a list of module names,
                  modules or :class:`vgtui.LayerSpec` (kept in the given order).
    sample_every: measure every N-th optimiser step (the first is always measured).
    record:       a JSONL path (the format of ``vgtui run --record``: ``vgtui replay/attach`` read it).
    channel:      a :class:`vgtui.channel.Channel` that receives the same records in-process.
    optimizer:    the default for :meth:`Watcher.step`; its step hook finalises the update size.
    scaler:       a ``torch.amp.GradScaler``: gradients are read unscaled and activation
                  gradients have the loss scale divided out.
    diagnose:     attach the diagnosis's verdicts to each record.
    per_rank:     under torchrun every rank writes its own file (``run.rank<N>.jsonl``) with its
                  local activation statistics; default: rank 0 records the global step.
    """
    return Watcher(model, layers=layers, sample_every=sample_every, record=record, channel=channel,
                   optimizer=optimizer, scaler=scaler, diagnose=diagnose, histograms=histograms,
                   per_rank=per_rank, start_step=start_step, run_id=run_id, name=name)
