"""vgtui for ``pytorch_lightning`` (Lightning's older package name, still released):
``Trainer(callbacks=[VgtuiCallback(record="run.jsonl")])``.

Per-layer ‖∂L/∂W‖ are read accumulated, unscaled and before Lightning's clipping; the global norm
after ``gradient_clip_val`` and whether it acted, the step's loss (mean over the accumulated
micro-batches) and the accuracy the module logs are recorded once per optimiser step. Where each
is read: :mod:`vgtui.integrations._lightning`. The implementation is the one of
:mod:`vgtui.integrations.lightning`; only the ``Callback`` base class differs, because each Trainer
accepts only callbacks of its own namespace.
"""

from __future__ import annotations

from pytorch_lightning import Callback

from ._lightning import LightningWatch

__all__ = ["VgtuiCallback"]


class VgtuiCallback(LightningWatch, Callback):
    """``VgtuiCallback(record=None, sample_every=1, *, accuracy=None, **watch_options)``:
    ``watch_options`` are those of :func:`vgtui.watch` (``layers``, ``channel``, ...)."""
