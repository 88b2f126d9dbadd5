"""What every integration shares: the torch optimiser inside a framework's wrapper, the run's
description in the header, the step's loss kept on the device, and a fault inside vgtui kept out
of the user's training."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..api import Watcher, watch
from ..engine import unwrap_optimizer  # noqa: F401 - the one definition, used by every integration


def watch_run(model, info: dict[str, Any], **options) -> Watcher:
    """:func:`vgtui.watch` whose run header also carries ``info`` (its ``run_info``: read when the
    header is written, at the first step, so the integration may fill it in until then)."""
    return watch(model, run_info=info, **options)


class StepSums:
    """The loss (and accuracy) of the micro-batches of one optimiser step, summed on the device:
    no host sync per micro-batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | None = None
        self.accuracy: torch.Tensor | None = None
        self.count = 0
        self.accuracy_count = 0

    def add(self, loss: torch.Tensor | float | None, accuracy: torch.Tensor | float | None = None) -> None:
        if loss is not None:
            value = _scalar(loss)
            self.loss = value if self.loss is None else self.loss + value
            self.count += 1
        if accuracy is not None:
            value = _scalar(accuracy)
            self.accuracy = value if self.accuracy is None else self.accuracy + value
            self.accuracy_count += 1

    def mean_loss(self):
        return None if self.loss is None else self.loss / self.count

    def mean_accuracy(self):
        return None if self.accuracy is None else self.accuracy / self.accuracy_count


def _scalar(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value if value.dim() == 0 else value.float().mean()).float()
    return torch.tensor(float(value))


class Guarded:
    """A monitor never takes training down: the first exception inside vgtui is reported once as
    a warning, measuring stops (``on_failure``), and the framework's loop goes on."""

    def __init__(self, where: str):
        self.where = where
        self.failed = False

    def call(self, fn: Callable, *args, **kwargs):
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - anything: the user's training must go on
            self.failed = True
            warnings.warn(f"vgtui ({self.where}): measuring stopped after {type(exc).__name__}: {exc}; "
                          "training continues", stacklevel=2)
            try:
                self.on_failure()
            except Exception:  # noqa: BLE001
                pass
            return None

    def on_failure(self) -> None:
        """Remove what the integration installed (overridden)."""
