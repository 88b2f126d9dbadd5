"""The plain records that flow from the trainer to every consumer.

Records hold floats, strings and numpy arrays only: no tensors, no widgets. Per-layer values are
columns (one numpy array per metric, index = layer, input to output) so that consumers can slice
and plot them without building dicts per layer on every frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Per-layer metrics every StepRecord carries, in JSONL order. Each is a float array (n_layers,).
LAYER_METRICS = (
    "weight_grad_norm",  # ‖∂L/∂W‖ of the layer's weight, before clipping
    "act_grad_norm",  # ‖∂L/∂h‖ of the layer's output, back-propagated
    "act_mean",  # mean of the layer's activation
    "act_std",  # standard deviation of the layer's activation
    "saturated",  # fraction of activations near a sigmoid/tanh asymptote (nan if not saturating)
    "dead",  # fraction of units inactive for the whole batch (nan if not rectifying)
    "weight_norm",  # ‖W‖
    "update_ratio",  # ‖ΔW‖ / ‖W‖ of the optimiser step
)

#: Gradient histograms: log10 |∂L/∂W| on fixed bins; the lowest bin also holds exact zeros.
HIST_LOG10_MIN = -12.0
HIST_LOG10_MAX = 2.0
HIST_BINS = 28


def hist_edges() -> np.ndarray:
    return np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


@dataclass
class Verdict:
    """One finding of the diagnosis: what, how bad, why, and what to try."""

    kind: str  # vanishing | exploding | nonfinite | saturation | dead | plateau | healthy
    severity: str  # info | warning | critical
    summary: str
    explanation: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
            "explanation": self.explanation,
            "evidence": {k: _jsonable(v) for k, v in self.evidence.items()},
            "suggestions": list(self.suggestions),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Verdict":
        return cls(
            kind=data["kind"],
            severity=data.get("severity", "info"),
            summary=data.get("summary", ""),
            explanation=data.get("explanation", ""),
            evidence={k: _unjson(v) for k, v in data.get("evidence", {}).items()},
            suggestions=list(data.get("suggestions", [])),
        )


@dataclass
class RunHeader:
    """The first record of every run: what is being trained and how the layers are named."""

    preset: dict[str, Any]
    layers: list[str]
    layer_kinds: list[str]  # the activation after each layer ("sigmoid", ..., "linear")
    device: str
    run_id: int = 0
    hist_edges: np.ndarray = field(default_factory=hist_edges)
    params: int = 0
    source: str = "vgtui"


@dataclass
class StepRecord:
    """One sampled training step, measured."""

    step: int
    loss: float
    accuracy: float  # nan where the task has none
    grad_norm_total: float  # global ‖g‖ before clipping
    grad_norm_clipped: float  # global ‖g‖ after clipping (== total when not clipping)
    clipped: bool  # whether clipping changed the gradient this step
    layers: dict[str, np.ndarray]  # metric name -> (n_layers,) float array, see LAYER_METRICS
    hist: np.ndarray | None  # (n_layers, HIST_BINS) counts; None where not measured this step
    nonfinite: tuple[str, str] | None = None  # (layer name, "forward" | "backward"), first seen
    phase: str = "train"  # "train", or "pretrain:<layer>" during layer-wise pre-training
    run_id: int = 0
    time: float = 0.0  # seconds since the run started
    steps_per_sec: float = float("nan")
    sample_every: int = 1
    probe_overhead: float = float("nan")  # the probe's measured share of wall time (budget mode)
    verdicts: list[Verdict] = field(default_factory=list)
    #: True when the detail tier (activation stats, ‖W‖, update ratio, histograms) was measured;
    #: on other sampled steps those columns are NaN and ``hist`` is None.
    detail: bool = True

    def metric(self, name: str) -> np.ndarray:
        return self.layers[name]


@dataclass
class RunEvent:
    """A lifecycle change: started, paused, resumed, finished, stopped, or a note for the user."""

    kind: str  # started | paused | resumed | finished | stopped | notice
    message: str = ""
    step: int = 0
    run_id: int = 0


@dataclass
class RunError:
    """An exception inside the training thread, delivered instead of being printed or lost."""

    message: str
    traceback: str = ""
    step: int = 0
    run_id: int = 0


Record = RunHeader | StepRecord | RunEvent | RunError


def _jsonable(value: Any) -> Any:
    """Floats that JSON can carry: non-finite become the strings "nan", "inf", "-inf"."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _unjson(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    if isinstance(value, dict):
        return {k: _unjson(v) for k, v in value.items()}
    return value


def jsonable(value: Any) -> Any:
    return _jsonable(value)


def unjson(value: Any) -> Any:
    return _unjson(value)
