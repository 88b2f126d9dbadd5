"""vgtui for the Hugging Face ``transformers.Trainer``.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[VgtuiCallback(record="run.jsonl")])
    trainer.train()

The Trainer clips (``max_grad_norm``) *before* any callback hook of the step (it calls
``on_pre_optimizer_step`` after ``accelerator.clip_grad_norm_``), and it hands callbacks neither
itself, nor its accelerator, nor the loss. So the callback finds the Trainer that calls its
``on_train_begin`` (the first caller frame whose ``self`` is a ``transformers.Trainer``; pass
``trainer=`` or use :func:`watch` to name it yourself) and, for the length of ``train()``, wraps two
of that Trainer's objects on the instance:

* ``trainer.accelerator.clip_grad_norm_`` (through :class:`~vgtui.integrations.accelerate.ClipObserver`):
  the per-layer ‖∂L/∂W‖ and the global norm are read after accelerate has unscaled the gradients
  (fp16) and before it clips them, after every micro-batch has accumulated;
* ``trainer.training_step``: its return value, the loss the Trainer sums for its own ``loss``
  log, summed over the micro-batches of the step (the Trainer has already divided it by the
  accumulation steps, or normalised it by the step's token count): that sum is the recorded loss,
  the same number the Trainer logs with ``logging_steps=1``.

``on_pre_optimizer_step`` (clipped, not yet applied) then closes the step: the global norm after
clipping and whether clipping acted. Should a Trainer clip without going through
``accelerator.clip_grad_norm_`` (SageMaker MP, mixed device meshes), the gradients can only be read
after clipping: the header then says ``grad_norm_measured: "after_clip"`` and a warning says so.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ._common import Guarded, StepSums, unwrap_optimizer, watch_run
from .accelerate import ClipObserver

__all__ = ["VgtuiCallback", "watch"]


class VgtuiCallback(Guarded, TrainerCallback):
    """A ``transformers.TrainerCallback`` that records the run like :func:`vgtui.watch`.

    Args:
        record: a JSONL path for the recording (``vgtui replay`` / ``attach`` read it), or None.
        sample_every: measure at most every N-th optimiser step.
        trainer: the ``Trainer`` (default: found on the call stack at ``on_train_begin``).
        **watch_options: those of :func:`vgtui.watch` (``layers``, ``channel``, ...).
    """

    def __init__(self, record: str | Path | None = None, sample_every: int = 1, *, trainer=None,
                 **watch_options):
        Guarded.__init__(self, "transformers callback")
        self.watch_options = dict(watch_options, record=record, sample_every=sample_every)
        self.trainer = trainer
        self.watcher = None
        self.info: dict[str, Any] = {}
        self.clip: ClipObserver | None = None
        self._sums = StepSums()
        self._steps = 0
        self._saved_step = None

    # -- TrainerCallback hooks -----------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            self.trainer = _calling_trainer()
        self.call(self._start, args)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.watcher is not None:
            self.call(self._close_step, args, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # -- the measurement -----------------------------------------------------------------------
    def _start(self, args) -> None:
        if self.watcher is not None:
            return
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("no transformers.Trainer called on_train_begin: pass trainer=")
        import torch

        wrapped = trainer.model_wrapped
        model = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else trainer.model
        self.info = {
            "integration": "transformers",
            "module": type(trainer.model).__name__,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "max_grad_norm": float(args.max_grad_norm or 0.0),
            "grad_norm_measured": "before_clip",
        }
        options = dict(self.watch_options)
        options.setdefault("name", type(trainer.model).__name__)
        accelerator = trainer.accelerator
        self.watcher = watch_run(model, self.info, optimizer=unwrap_optimizer(trainer.optimizer),
                                 scaler=getattr(accelerator, "scaler", None), **options)
        self.clip = ClipObserver(accelerator, self.watcher, self.info, self)
        self._saved_step = trainer.__dict__.get("training_step")
        original = trainer.training_step
        sums = self._sums

        def training_step(*a, **kw):
            loss = original(*a, **kw)
            if not self.failed:
                self.call(sums.add, loss)
            return loss

        trainer.training_step = training_step

    def _close_step(self, args, optimizer) -> None:
        clips = (args.max_grad_norm or 0) > 0
        if clips and not self.clip.measured:
            if self._steps == 0:  # the header is not written yet: say what was measured
                self.info["grad_norm_measured"] = "after_clip"
                self.info["clip"], self.info["clip_threshold"] = "norm", float(args.max_grad_norm)
            if self._steps == 0 or self.info["grad_norm_measured"] == "before_clip":
                warnings.warn("vgtui: the Trainer clipped without accelerator.clip_grad_norm_: "
                              "gradient norms of this run are read after clipping", stacklevel=2)
                self.info["grad_norm_measured"] = "after_clip"
        if "clip" not in self.info:
            self.info["clip"] = "none"
        self.watcher.step(unwrap_optimizer(optimizer), self._sums.loss)
        self._sums.reset()
        self.clip.new_step()
        self._steps += 1

    def close(self) -> None:
        """Restore the Trainer and its accelerator, close the watcher (idempotent)."""
        if self.clip is not None:
            self.clip.restore()
            self.clip = None
        if self.trainer is not None and "training_step" in self.trainer.__dict__:
            if self._saved_step is not None:
                self.trainer.training_step = self._saved_step
            else:
                del self.trainer.training_step
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.close()

    def on_failure(self) -> None:
        self.close()


def _calling_trainer() -> Trainer | None:
    """The ``transformers.Trainer`` whose method is on the call stack (it calls on_train_begin
    from its training loop through its CallbackHandler)."""
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def watch(trainer: Trainer, record: str | Path | None = None, sample_every: int = 1,
          **watch_options) -> VgtuiCallback:
    """Add a :class:`VgtuiCallback` bound to ``trainer`` and return it."""
    callback = VgtuiCallback(record, sample_every, trainer=trainer, **watch_options)
    trainer.add_callback(callback)
    return callback
