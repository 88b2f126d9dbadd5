"""vgtui inside the trainers people use.

Each integration lives in its own module and imports its framework only when imported itself:

* :mod:`vgtui.integrations.lightning` / :mod:`vgtui.integrations.pytorch_lightning`:
  ``VgtuiCallback`` for ``lightning.pytorch.Trainer`` / ``pytorch_lightning.Trainer``.
* :mod:`vgtui.integrations.hf`: ``VgtuiCallback`` for ``transformers.Trainer``.
* :mod:`vgtui.integrations.accelerate`: :func:`~vgtui.integrations.accelerate.watch` for a loop
  written with ``accelerate.Accelerator``.

All of them measure through :func:`vgtui.watch` and write the same recording (``vgtui replay`` /
``vgtui attach`` read it). The run header's ``preset`` says which integration recorded it and
where the per-layer gradients were read (``grad_norm_measured``: ``"before_clip"`` or
``"after_clip"``).
"""
