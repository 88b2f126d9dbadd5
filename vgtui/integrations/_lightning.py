"""The Lightning callback's implementation, shared by ``lightning.pytorch`` and ``pytorch_lightning``.

Lightning's Trainer checks ``isinstance(callback, <its own namespace>.Callback)``, so each
namespace gets its own class (:mod:`vgtui.integrations.lightning`,
:mod:`vgtui.integrations.pytorch_lightning`); both inherit this mixin, which imports neither.

Where each value is read, in Lightning's automatic optimisation (Lightning 2.x): for the last
micro-batch of an optimiser step, ``optimizer.step(closure)`` runs the closure (training_step,
``on_before_backward``, backward), then, under 16-bit AMP, ``scaler.unscale_``, then
``on_before_optimizer_step``, then ``LightningModule.configure_gradient_clipping`` (which clips
with ``gradient_clip_val``), then the update. So:

* ``on_before_backward``: each micro-batch's loss (Lightning passes ``loss / accumulate``;
  under fp16 AMP already multiplied by the loss scale, which is divided out here) and the accuracy
  the module logged in that training_step;
* ``on_before_optimizer_step``: ``Watcher.before_clip`` - accumulated, unscaled, not yet clipped;
* right after ``configure_gradient_clipping`` returns (the callback wraps that hook on the module
  instance for the length of the fit, keeping any override): ``Watcher.step`` - the global norm
  after clipping, whether clipping acted, the loss and accuracy, before the optimiser updates W.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

from ._common import Guarded, StepSums, unwrap_optimizer, watch_run

ACCURACY_NAMES = ("acc", "accuracy")


class LightningWatch(Guarded):
    """What both Lightning namespaces' ``VgtuiCallback`` do (see the module docstring).

    Args:
        record: a JSONL path for the recording (``vgtui replay`` / ``attach`` read it), or None.
        sample_every: measure at most every N-th optimiser step.
        accuracy: the metric the module logs with ``self.log(...)`` to record as accuracy
            (default: the first logged ``acc``/``accuracy``, optionally prefixed ``train_`` /
            ``train/`` or suffixed ``_step``).
        **watch_options: those of :func:`vgtui.watch` (``layers``, ``channel``, ``overhead_budget``, ...).
    """

    def __init__(self, record: str | Path | None = None, sample_every: int = 1, *,
                 accuracy: str | None = None, **watch_options):
        Guarded.__init__(self, "Lightning callback")
        self.watch_options = dict(watch_options, record=record, sample_every=sample_every)
        self.accuracy_key = accuracy
        self.watcher = None
        self.info: dict[str, Any] = {}
        self._sums = StepSums()
        self._pending = None  # the optimiser whose step before_clip opened
        self._module = None
        self._scaler = None
        self._accumulate = 1
        self._fallback_warned = False

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.call(self._start, trainer, pl_module)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.watcher is not None:
            self.call(self._add_micro_batch, trainer, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.watcher is not None:
            self.call(self._before_step, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.watcher is not None and self._pending is not None:
            self.call(self._late_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage) -> None:
        self.close()

    # -- the measurement -----------------------------------------------------------------------
    def _start(self, trainer, pl_module) -> None:
        if self.watcher is not None:
            return
        clip_val = trainer.gradient_clip_val
        algorithm = trainer.gradient_clip_algorithm  # None means Lightning's default, "norm"
        algorithm = str(getattr(algorithm, "value", algorithm) or "norm")
        self._accumulate = int(trainer.accumulate_grad_batches or 1)
        self.info = {
            "integration": "lightning",
            "module": type(pl_module).__name__,
            "precision": str(trainer.precision),
            "accumulate_grad_batches": self._accumulate,
            "grad_norm_measured": "before_clip",
            "gradient_clip_val": clip_val,
            "clip": "none",
        }
        if clip_val:
            self.info["gradient_clip_algorithm"] = self.info["clip"] = algorithm
            self.info["clip_threshold"] = float(clip_val)
        if type(pl_module).configure_gradient_clipping.__qualname__ != "LightningModule.configure_gradient_clipping":
            self.info["configure_gradient_clipping"] = f"{type(pl_module).__name__} (custom)"
        if not pl_module.automatic_optimization:
            # The module steps and clips itself: the gradients at on_before_optimizer_step are the
            # ones it applies, after any clipping of its own.
            self.info["grad_norm_measured"] = "at_optimizer_step"
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        options = dict(self.watch_options)
        options.setdefault("name", type(pl_module).__name__)
        # Lightning's DDP strategy hands callbacks the inner module: its activation sums are
        # combined over the wrapper's group, as for a DDP-wrapped model.
        wrapper = getattr(trainer.strategy, "model", None)
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and trainer.world_size > 1:
            options.setdefault("process_group", wrapper.process_group)
        self.watcher = watch_run(pl_module, self.info, scaler=self._scaler, **options)
        self._module = pl_module
        original = pl_module.configure_gradient_clipping

        @functools.wraps(original)  # Lightning's is_overridden looks through __wrapped__
        def configure_gradient_clipping(optimizer, *args, **kwargs):
            result = original(optimizer, *args, **kwargs)
            if self._pending is not None:
                self.call(self._close_step)
            return result

        pl_module.configure_gradient_clipping = configure_gradient_clipping

    def _add_micro_batch(self, trainer, loss) -> None:
        loss = loss.detach()
        if self._scaler is not None:  # Lightning scaled the loss before this hook (16-mixed)
            scale = getattr(self._scaler, "_scale", None)
            loss = loss / (scale if isinstance(scale, torch.Tensor) else self._scaler.get_scale())
        accuracy = self._logged_accuracy(trainer) if self.watcher.sampled else None
        self._sums.add(loss, accuracy)

    def _logged_accuracy(self, trainer):
        metrics = trainer.callback_metrics
        if self.accuracy_key is None:
            for name in metrics:
                bare = name.lower()
                for prefix in ("train_", "train/"):
                    bare = bare.removeprefix(prefix)
                if bare.removesuffix("_step") in ACCURACY_NAMES:
                    self.accuracy_key = name
                    break
            else:
                return None
        return metrics.get(self.accuracy_key)

    def _before_step(self, pl_module, optimizer) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if pl_module.automatic_optimization:
            self._pending = optimizer
            self.watcher.before_clip(optimizer)
        else:
            self._pending = optimizer
            self._close_step()

    def _close_step(self) -> None:
        optimizer, self._pending = self._pending, None
        sums = self._sums
        # Lightning backpropagates Σ_k loss_k / accumulate: times accumulate / count is the mean
        # over the micro-batches (the same number unless an epoch ended mid-window).
        loss = None if sums.loss is None else sums.loss * (self._accumulate / sums.count)
        if not self._module.automatic_optimization:
            loss = sums.mean_loss()
        self.watcher.step(optimizer, loss, accuracy=sums.mean_accuracy())
        sums.reset()

    def _late_step(self) -> None:
        """A strategy that never called ``configure_gradient_clipping`` (not Lightning's default
        path): the step is closed after the update, so its update size is not this step's."""
        if not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn("vgtui: Lightning did not call configure_gradient_clipping before the "
                          "optimizer step; steps are recorded after the update", stacklevel=2)
        self._close_step()

    def close(self) -> None:
        """Remove the wrapper from the module and close the watcher (idempotent)."""
        module, self._module = self._module, None
        if module is not None:
            module.__dict__.pop("configure_gradient_clipping", None)
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.close()

    def on_failure(self) -> None:
        self.close()
