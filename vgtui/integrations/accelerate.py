"""vgtui in a loop written with ``accelerate``.

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    watcher = vgtui.integrations.accelerate.watch(accelerator, model, optimizer, record="run.jsonl")
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # measured before and after
            watcher.step(optimizer, loss)  # every micro-batch, before optimizer.step()
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()

``accelerator.clip_grad_norm_`` is observed the way ``Watcher.before_clip`` observes a plain loop:
accelerate unscales the gradients first (fp16), and the per-layer ‖∂L/∂W‖ are read right after
that unscaling and before its clip; the global norm after clipping is read at ``step()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import Guarded, StepSums, unwrap_optimizer, watch_run

__all__ = ["AcceleratorWatcher", "watch"]


class ClipObserver:
    """Wraps one ``Accelerator``'s ``clip_grad_norm_`` (and the ``unscale_gradients`` it calls
    first) on the instance, so that the watcher reads the gradients unscaled and not yet clipped.

    ``before_clip`` runs at most once per optimiser step (HF's Trainer may ask accelerate for the
    norm twice); :meth:`new_step` re-arms it. ``info`` (the header's description) learns the clip
    threshold from the first call."""

    def __init__(self, accelerator, watcher, info: dict[str, Any], guard: Guarded):
        self.accelerator = accelerator
        self.watcher = watcher
        self.info = info
        self.guard = guard
        self.measured = False  # before_clip ran for the current step
        self.calls = 0  # clip_grad_norm_ calls seen
        self._in_clip = False
        self._saved = {name: accelerator.__dict__[name] for name in ("clip_grad_norm_", "unscale_gradients")
                       if name in accelerator.__dict__}
        clip, unscale = accelerator.clip_grad_norm_, accelerator.unscale_gradients

        def unscale_gradients(*args, **kwargs):
            result = unscale(*args, **kwargs)
            if self._in_clip:
                self.guard.call(self._before)
            return result

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self.guard.call(self._note, max_norm)
            self._in_clip = True
            try:
                total = clip(parameters, max_norm, *args, **kwargs)
            finally:
                self._in_clip = False
            if self.measured and kwargs.get("norm_type", args[0] if args else 2) == 2 and total is not None:
                self.guard.call(self.watcher.note_grad_norm, total)  # the step window's norm, computed anyway
            return total

        accelerator.unscale_gradients = unscale_gradients
        accelerator.clip_grad_norm_ = clip_grad_norm_

    def _note(self, max_norm) -> None:
        self.calls += 1
        threshold = float(max_norm)
        if "clip" not in self.info:  # the header is written at the first before_clip: decide now
            if threshold == float("inf"):  # HF asks for the norm this way when it does not clip
                self.info["clip"] = "none"
            else:
                self.info["clip"], self.info["clip_threshold"] = "norm", threshold

    def _before(self) -> None:
        if not self.measured:
            self.measured = True
            self.watcher.before_clip()

    def new_step(self) -> None:
        self.measured = False

    def restore(self) -> None:
        for name in ("clip_grad_norm_", "unscale_gradients"):
            if name in self._saved:
                setattr(self.accelerator, name, self._saved[name])
            else:
                self.accelerator.__dict__.pop(name, None)


class AcceleratorWatcher(Guarded):
    """A :class:`vgtui.Watcher` for an ``accelerate`` loop: takes the prepared model and optimiser
    as they are, observes ``accelerator.clip_grad_norm_``, and closes a measured step only where
    accelerate really steps (``accelerator.sync_gradients``)."""

    def __init__(self, accelerator, model, optimizer=None, **options):
        super().__init__("accelerate")
        self.accelerator = accelerator
        self.info: dict[str, Any] = {
            "integration": "accelerate",
            "gradient_accumulation_steps": int(getattr(accelerator, "gradient_accumulation_steps", 1)),
            "mixed_precision": str(getattr(accelerator, "mixed_precision", "no")),
            "grad_norm_measured": "before_clip",
        }
        scaler = getattr(accelerator, "scaler", None)
        options.setdefault("name", type(accelerator.unwrap_model(model)).__name__)
        self.watcher = watch_run(model, self.info, optimizer=unwrap_optimizer(optimizer),
                                 scaler=scaler, **options)
        self.clip = ClipObserver(accelerator, self.watcher, self.info, self)
        self.sums = StepSums()

    def step(self, optimizer=None, loss=None, *, accuracy=None) -> None:
        """Call after ``accelerator.backward`` (and clipping), before ``optimizer.step()``, on
        every micro-batch: the loss and accuracy given are averaged over the micro-batches of the
        step, and the step is measured where accelerate syncs the gradients."""
        self.call(self._step, optimizer, loss, accuracy)

    def _step(self, optimizer, loss, accuracy) -> None:
        self.sums.add(loss, accuracy)
        if not self.accelerator.sync_gradients:
            return
        if "clip" not in self.info:
            self.info["clip"] = "none"
        self.watcher.step(unwrap_optimizer(optimizer), self.sums.mean_loss(),
                          accuracy=self.sums.mean_accuracy())
        self.sums.reset()
        self.clip.new_step()

    def close(self) -> None:
        """Restore the accelerator, then close the watcher (every hook removed, file complete)."""
        self.clip.restore()
        self.watcher.close()

    def on_failure(self) -> None:
        self.close()

    # The rest reads through to the watcher.
    @property
    def latest(self):
        return self.watcher.latest

    @property
    def layer_names(self) -> list[str]:
        return self.watcher.layer_names

    @property
    def sample_every(self) -> int:
        return self.watcher.sample_every

    @sample_every.setter
    def sample_every(self, value: int) -> None:
        self.watcher.sample_every = int(value)

    def __enter__(self) -> "AcceleratorWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(accelerator, model, optimizer=None, *, record: str | Path | None = None, sample_every: int = 1,
          **options) -> AcceleratorWatcher:
    """Watch ``model`` (as ``accelerator.prepare`` returned it) in an ``accelerate`` loop.
    ``optimizer`` may be the prepared ``AcceleratedOptimizer``; ``options`` are those of
    :func:`vgtui.watch` (the accelerator's GradScaler is passed on by itself)."""
    return AcceleratorWatcher(accelerator, model, optimizer, record=record, sample_every=sample_every,
                              **options)
