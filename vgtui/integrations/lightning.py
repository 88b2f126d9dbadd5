"""vgtui for ``lightning.pytorch``: ``Trainer(callbacks=[VgtuiCallback(record="run.jsonl")])``.

Per-layer ‖∂L/∂W‖ are read accumulated, unscaled and before Lightning's clipping; the global norm
after ``gradient_clip_val`` and whether it acted, the step's loss (mean over the accumulated
micro-batches) and the accuracy the module logs are recorded once per optimiser step. Where each
is read: :mod:`vgtui.integrations._lightning`. ``pytorch_lightning`` users import the same class
from :mod:`vgtui.integrations.pytorch_lightning`.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from ._lightning import LightningWatch

__all__ = ["VgtuiCallback"]


class VgtuiCallback(LightningWatch, Callback):
    """``VgtuiCallback(record=None, sample_every=1, *, accuracy=None, **watch_options)``:
    ``watch_options`` are those of :func:`vgtui.watch` (``layers``, ``channel``, ...)."""
