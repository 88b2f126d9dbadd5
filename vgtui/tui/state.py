"""What the screen knows about one run: bounded histories fed from records. No Textual here.

The state is fed batches of records (from a channel, a file, or a replay cursor) and keeps the
newest ``maxlen`` step records. Widgets read columns out of it; a ``version`` counter tells them
whether anything changed since they last drew.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

import numpy as np

from ..records import RunError, RunEvent, RunHeader, StepRecord
from . import rows as rowplan

HISTORY = 1000


class RunState:
    def __init__(self, maxlen: int = HISTORY):
        self.maxlen = maxlen
        self.reset()

    def reset(self) -> None:
        self.header: RunHeader | None = None
        self.run_id: int | None = None
        self.steps: deque[StepRecord] = deque(maxlen=self.maxlen)
        self.last: StepRecord | None = None
        # The detail tier (activation stats, update ratios, histograms) arrives on every Nth
        # measured step only: its views read these, never a NaN-filled core-only record.
        self.detail_steps: deque[StepRecord] = deque(maxlen=self.maxlen)
        self.last_detail: StepRecord | None = None
        self.errors: list[RunError] = []
        self.notices: list[str] = []
        self.paused = False
        self.finished: str | None = None  # "finished" | "stopped" once the run ended
        self.nonfinite: tuple[int, str, str] | None = None  # (step, layer, forward|backward), first seen
        self.nonfinite_records = 0
        self.version = 0
        self._cache: dict = {}
        self._plans: dict = {}  # (by_block, expanded) -> rows; names change only with the header

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, records: Iterable) -> bool:
        changed = False
        for record in records:
            changed |= self._feed_one(record)
        if changed:
            self.version += 1
            self._cache.clear()
        return changed

    def _feed_one(self, record) -> bool:
        if isinstance(record, RunHeader):
            maxlen = self.maxlen
            self.reset()
            self.maxlen = maxlen
            self.header = record
            self.run_id = record.run_id
            self._plans = {}
            return True
        run_id = getattr(record, "run_id", None)
        if self.run_id is not None and run_id is not None and run_id != self.run_id:
            return False  # a straggler of a run that was replaced
        if isinstance(record, StepRecord):
            if self.header is None:
                return False
            self.steps.append(record)
            self.last = record
            if record.detail and record.hist is not None:
                self.detail_steps.append(record)
                self.last_detail = record
            if record.nonfinite is not None:
                self.nonfinite_records += 1
                if self.nonfinite is None:
                    self.nonfinite = (record.step, record.nonfinite[0], record.nonfinite[1])
            return True
        if isinstance(record, RunEvent):
            if record.kind == "paused":
                self.paused = True
            elif record.kind == "resumed":
                self.paused = False
            elif record.kind in ("finished", "stopped"):
                self.finished = record.kind
            elif record.kind == "notice" and record.message:
                self.notices.append(record.message)
            return True
        if isinstance(record, RunError):
            self.errors.append(record)
            return True
        return False

    # -- reading --------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.header.layers) if self.header else 0

    @property
    def layer_names(self) -> list[str]:
        return list(self.header.layers) if self.header else []

    @property
    def preset_name(self) -> str:
        return str(self.header.preset.get("name", "?")) if self.header else "?"

    def matrix(self, metric: str, last: int | None = None, detail: bool = False) -> np.ndarray:
        """(n_layers, T) values of ``metric`` over the newest ``last`` steps (oldest first);
        ``detail``: over the steps that measured the detail tier."""
        key = ("m", metric, last, detail)
        if key not in self._cache:
            steps = list(self.detail_steps if detail else self.steps)
            if last is not None:
                steps = steps[-last:] if last > 0 else []
            if not steps:
                self._cache[key] = np.zeros((self.n_layers, 0))
            else:
                self._cache[key] = np.stack([s.layers[metric] for s in steps], axis=1)
        return self._cache[key]

    def measured_matrix(self, metric: str, last: int | None = None, detail: bool = False) -> np.ndarray:
        """(n_layers, T) bool: True where ``metric`` was measured (see StepRecord.unmeasured)."""
        key = ("u", metric, last, detail)
        if key not in self._cache:
            steps = list(self.detail_steps if detail else self.steps)
            if last is not None:
                steps = steps[-last:] if last > 0 else []
            if not steps:
                self._cache[key] = np.ones((self.n_layers, 0), dtype=bool)
            else:
                self._cache[key] = np.stack([s.measured(metric) for s in steps], axis=1)
        return self._cache[key]

    # -- rows: layers or blocks ---------------------------------------------------------------
    def plan(self, by_block: bool, expanded: frozenset = frozenset()) -> list[rowplan.Row]:
        key = (by_block, expanded)
        if key not in self._plans:
            self._plans[key] = rowplan.plan(self.layer_names, by_block, expanded)
        return self._plans[key]

    @property
    def prefix(self) -> str:
        if "prefix" not in self._plans:
            self._plans["prefix"] = rowplan.common_prefix(self.layer_names)
        return self._plans["prefix"]

    def row_matrix(self, metric: str, rows: list[rowplan.Row], last: int | None = None,
                   detail: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(R, T) values of ``metric`` per row (blocks aggregated) and (R, T) measured marks."""
        key = ("r", metric, id(rows), last, detail)
        if key not in self._cache:
            values = self.matrix(metric, last, detail)
            measured = self.measured_matrix(metric, last, detail)
            self._cache[key] = (rowplan.aggregate(values, rows, metric, measured),
                                rowplan.aggregate_mask(measured, rows))
        return self._cache[key]

    def row_log_matrix(self, metric: str, rows: list[rowplan.Row], last: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        key = ("rl", metric, id(rows), last)
        if key not in self._cache:
            values, measured = self.row_matrix(metric, rows, last)
            with np.errstate(divide="ignore", invalid="ignore"):
                logged = np.where(np.isfinite(values), np.log10(np.abs(values)), np.nan)
            self._cache[key] = (logged, measured)
        return self._cache[key]

    @property
    def time_layers(self) -> list[str]:
        """Through-time series in the newest record, input first: a recurrent layer's own name, or
        ``<layer>.l<k>`` for the k-th stacked layer inside one fused module (``nn.LSTM`` with
        ``num_layers`` > 1 is one layer of the header)."""
        if self.last is None or not self.last.time_act_grad_norm:
            return []
        keys = self.last.time_act_grad_norm
        series = []
        for name in self.layer_names:
            if name in keys:
                series.append(name)
            stacked = [k for k in keys if k.startswith(name + ".l") and k[len(name) + 2:].isdigit()]
            series += sorted(stacked, key=lambda k: int(k[len(name) + 2:]))
        return series

    def time_layer(self, series: str) -> str:
        """The header layer a through-time series belongs to."""
        if series in self.layer_names:
            return series
        return series.rsplit(".l", 1)[0]

    def log_matrix(self, metric: str, last: int | None = None) -> np.ndarray:
        """log10 of :meth:`matrix`; zeros become -inf, non-finite values become nan."""
        key = ("l", metric, last)
        if key not in self._cache:
            values = self.matrix(metric, last)
            with np.errstate(divide="ignore", invalid="ignore"):
                logged = np.where(np.isfinite(values), np.log10(np.abs(values)), np.nan)
            self._cache[key] = logged
        return self._cache[key]

    def series(self, name: str, last: int | None = None) -> tuple[list[int], list[float]]:
        steps = list(self.steps)
        if last is not None:
            steps = steps[-last:]
        return [s.step for s in steps], [float(getattr(s, name)) for s in steps]


def log10_or_nan(value: float) -> float:
    if value is None or not math.isfinite(value):
        return float("nan")
    if value == 0:
        return float("-inf")
    return math.log10(abs(value))
