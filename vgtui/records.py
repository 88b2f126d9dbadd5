"""The plain records that flow from the trainer to every consumer.

Records hold floats, strings and numpy arrays only: no tensors, no widgets. Per-layer values are
columns (one numpy array per metric, index = layer, input to output) so that consumers can slice
and plot them without building dicts per layer on every frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    "act_p02",  # activation percentiles (see ACT_PERCENTILES), detail steps only
    "act_p16",
    "act_p50",
    "act_p84",
    "act_p98",
)

#: The activation percentiles measured on detail steps, as metrics ``act_pNN``: the median, a
#: band that holds ~68% of a normal distribution (p16-p84, mean ± 1 sd) and one that holds 96%
#: (p2-p98; Glorot & Bengio plot the 98th percentile of each layer's activations over training,
#: where a sigmoid layer pinned at 0 or 1 shows at once). Computed from at most
#: ACT_SAMPLE_ELEMENTS evenly strided entries of the layer's output, linear interpolation as
#: ``torch.quantile``/``numpy.percentile``.
ACT_PERCENTILES = (2, 16, 50, 84, 98)
ACT_PERCENTILE_METRICS = tuple(f"act_p{q:02d}" for q in ACT_PERCENTILES)
ACT_SAMPLE_ELEMENTS = 1024

#: Gradient histograms: log10 |∂L/∂W| on fixed bins; the lowest bin also holds exact zeros.
HIST_LOG10_MIN = -12.0
HIST_LOG10_MAX = 2.0
HIST_BINS = 28

#: ‖∂L/∂h_t‖ through time is downsampled to at most this many time steps per layer.
TIME_POINTS = 256


def hist_edges() -> np.ndarray:
    return np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


#: Most severe first: the order verdicts are listed and drawn in.
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class Verdict:
    """One finding of the diagnosis: what, how bad, why, and what to try."""

    kind: str  # vanishing | exploding | nonfinite | saturation | dead | plateau | spike | healthy
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
    #: Layers that share a parameter (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``): layer
    #: name -> the other layers holding the same tensor. A shared tensor is measured once.
    tied: dict[str, list[str]] = field(default_factory=dict)


class Ratio(NamedTuple):
    """A first-over-last ratio of a per-layer metric, and which layers it used (indices)."""

    value: float  # nan when fewer than two layers were measured, or the last one is 0
    first: int | None
    last: int | None


@dataclass(frozen=True)
class StepWindow:
    """Every optimiser step since the previous record (inclusive of this one), accumulated on the
    device without a host sync: what sampling alone would miss (a spike between samples).

    The loss is counted on every step. The global gradient norm only where it is cheap (CUDA, or
    computed anyway by clip-by-norm) or asked for (``window=True``): ``grad_norm_steps`` says over
    how many of the window's steps it was seen, and the ``grad_norm_*`` values are None where it
    was seen on none (not measured, which is not non-finite)."""

    steps: int  # how many optimiser steps this window covers
    first_step: int
    loss_min: float
    loss_max: float
    loss_mean: float
    loss_last: float
    loss_max_step: int  # the step of the largest loss
    grad_norm_min: float | None
    grad_norm_max: float | None
    grad_norm_mean: float | None
    grad_norm_last: float | None
    grad_norm_max_step: int | None  # the step of the largest global gradient norm
    grad_norm_steps: int | None = None  # steps whose norm was seen; None: all of them if any norm is given

    def __post_init__(self):
        if self.grad_norm_steps is None:  # recordings from before the norm could be left out
            object.__setattr__(self, "grad_norm_steps", self.steps if self.grad_norm_max is not None else 0)


@dataclass
class StepRecord:
    """One sampled training step, measured.

    Not measured is not non-finite: a metric that was not measured for a layer (no activation
    gradient reached it, the detail tier did not run, the layer is not recurrent, ...) is NaN in
    ``layers`` *and* True in ``unmeasured[metric]``; a NaN with no such mark is a real NaN.
    """

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
    #: metric name -> (n_layers,) bool, True where that metric was not measured for that layer.
    #: A metric missing from the dict was measured for every layer (NaN there is a real NaN).
    unmeasured: dict[str, np.ndarray] = field(default_factory=dict)
    #: Recurrent layers only: layer name -> ‖∂L/∂h_t‖ for each time step t (ascending) of the
    #: measured batch, downsampled to at most TIME_POINTS points.
    time_act_grad_norm: dict[str, np.ndarray] = field(default_factory=dict)
    #: Every step since the previous record (loss and global norm min/max/mean/last), or None.
    window: StepWindow | None = None
    #: Held-out evaluation at this step (nan where none ran).
    heldout_loss: float = float("nan")
    heldout_accuracy: float = float("nan")

    def metric(self, name: str) -> np.ndarray:
        return self.layers[name]

    def measured(self, name: str) -> np.ndarray:
        """(n_layers,) bool: where ``name`` was measured (its value may still be non-finite)."""
        mask = self.unmeasured.get(name)
        if mask is None:
            return np.ones(len(self.layers[name]), dtype=bool)
        return ~mask

    def first_last_ratio(self, name: str = "act_grad_norm") -> Ratio:
        """``name`` of the first measured layer over that of the last measured one: the one rule
        for every "first/last" number vgtui shows (~1 healthy, << 1 vanishing, >> 1 exploding)."""
        at = np.flatnonzero(self.measured(name))
        if len(at) < 2:
            return Ratio(float("nan"), None, None)
        first, last = int(at[0]), int(at[-1])
        values = self.layers[name]
        den = float(values[last])
        num = float(values[first])
        if den == 0.0 or math.isnan(num) or math.isnan(den):
            return Ratio(float("nan"), first, last)
        return Ratio(num / den, first, last)


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
