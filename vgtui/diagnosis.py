"""Diagnosis: turns the stream of StepRecords into a short list of verdicts.

Pure Python + numpy, no UI imports, cheap enough to run in the training thread on every sampled
step (a few dozen microseconds on a 30-layer record; see docs/DIAGNOSIS.md for the measurement).

What is measured, and why it is the right quantity
--------------------------------------------------
The quantity the literature uses for gradient flow is the back-propagated gradient of each layer's
output, ‖∂L/∂h‖ (Glorot & Bengio 2010, figs. 5 and 7; He et al. 2015, sec. 2.2). Weight gradients
‖∂L/∂W‖ can look flat across layers while ‖∂L/∂h‖ decays, so the rules below use ‖∂L/∂h‖. The
headline figure is the first/last ratio (``StepRecord.first_last_ratio``): ‖∂L/∂h‖ of the first
layer that was measured over that of the last one (normally the first hidden layer and the output
layer; a layer never called as a module has no ‖∂L/∂h‖ and is skipped, never read as NaN). Its
k-th root, k the layers between the two, is the per-layer factor, the geometric mean of the ratio
between consecutive layers: the number that back-propagation multiplies the gradient by, on
average, at each layer. A factor below 1 compounds with depth into vanishing, above 1 into
exploding. Where no ‖∂L/∂h‖ was measured at all (a compiled model) the rules say so instead of
calling the run healthy, and fall back to what is sound without it (see :func:`ratio_verdict`).

Recurrent layers add a second axis: ‖∂L/∂h_t‖ per time step (``StepRecord.time_act_grad_norm``),
fitted log-linearly to a per-step factor (:func:`fit_through_time`). Every record may carry a
``StepWindow`` (every optimiser step since the previous record), which the spike rule reads so that
a spike on a step that was not sampled is still caught and named.

Smoothing and hysteresis
------------------------
Every rule reads a smoothed value: the median of the last :data:`WINDOW` records (medians ignore
one odd batch). A verdict *enters* when the smoothed value crosses its enter threshold and *leaves*
only when it crosses a less extreme exit threshold, so a value sitting on the line does not make the
verdict flicker from step to step. Non-finite values are latched: once seen, the verdict stays for
the rest of the run and always names the first step, layer and direction.

Every threshold is a named constant below, with where it comes from. docs/DIAGNOSIS.md lists the
rules and the ratios measured on the built-in presets (produced by benchmarks/diagnosis_table.py).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from typing import NamedTuple

import numpy as np

from .records import SEVERITY_ORDER, TIME_POINTS, RunHeader, StepRecord, Verdict

# -- smoothing --------------------------------------------------------------------------------
#: Records in the smoothing window (median). Five is enough to ignore a single odd batch and short
#: enough to react within a few steps (the ``exploding`` preset overflows at step 4).
WINDOW = 5
#: Records needed before any verdict other than a non-finite one: a median of three values.
MIN_RECORDS = 3
#: Unit statistics (dead, saturated) and update ratios come only with the probe's detail tier
#: (every ``detail_every``-th sampled step, 10 by default): their window counts those records, so
#: three of them span ~30 steps at the default.
DETAIL_WINDOW = 3
#: A verdict, once shown, stays for at least this many records even if its value recovers at
#: once: a warning that blinks for one frame cannot be read.
HOLD = 10

# -- vanishing ----------------------------------------------------------------------------------
#: first/last ‖∂L/∂h‖ below this enters "vanishing": the first layer receives a gradient ten times
#: smaller than the output layer (one decade lost). Healthy stacks measured here sit within a
#: factor of ~3 of 1 (ReLU+He 1.4, sigmoid+BN 0.64, sigmoid+skip 0.6; He et al. 2015 derive a
#: ratio of 1 for ReLU+He); sigmoid with Glorot & Bengio's standard init loses 3-4 decades.
VANISH_ENTER = 0.1
#: ... and leaves above this (hysteresis: a factor of 2 away from the enter line).
VANISH_EXIT = 0.2
#: Below this (three decades) the verdict is critical: the first layer effectively does not learn.
VANISH_CRITICAL = 1e-3
#: Critical leaves above this.
VANISH_CRITICAL_EXIT = 2e-3
#: First-layer update size ‖ΔW‖/‖W‖ below this counts as "frozen". A healthy update ratio is
#: around 1e-3 per step (Karpathy, CS231n notes, "ratio of weights:updates"); 1e-5 is two decades
#: under it, i.e. a hundred times too slow to matter within a run.
UPDATE_FROZEN = 1e-5
#: ... when also this far below the last layer's update ratio (so it is the depth, not a small lr).
UPDATE_SPREAD = 1e-2

# -- exploding ----------------------------------------------------------------------------------
#: first/last ‖∂L/∂h‖ above this enters "exploding across layers". Not the mirror of
#: VANISH_ENTER: healthy networks drift upwards as they learn (the output layer's gradient shrinks
#: with the loss), measured up to 7 for 5x1000 ReLU+He and 16 for 30x256 ReLU+He once trained,
#: against 96 at step 0 for the ``exploding`` preset (N(0, 0.15^2) weights, ~1.8x per layer).
EXPLODE_ENTER = 50.0
EXPLODE_EXIT = 25.0
#: Above this (three decades) it is critical, like VANISH_CRITICAL.
EXPLODE_CRITICAL = 1e3
EXPLODE_CRITICAL_EXIT = 5e2
#: Global gradient norm (before clipping), smoothed, above this multiple of its lowest smoothed
#: value so far enters "exploding over steps". Two decades: healthy runs measured here grow their
#: gradient norm by at most ~10-20x while they leave the initial plateau.
STEP_GROWTH_ENTER = 100.0
STEP_GROWTH_EXIT = 30.0
#: Four decades of growth over the run is critical: overflow is a few steps away.
STEP_GROWTH_CRITICAL = 1e4
#: Records in the window over which clipping activity is counted.
CLIP_WINDOW = 20
#: Clipping that changes the gradient on more than this fraction of steps is "acting on most steps"
#: (the issue's wording): it is then not a safety net for rare spikes but what holds training
#: together (Pascanu et al. 2013 propose clipping for the rare spike).
CLIP_MOST = 0.5
CLIP_MOST_EXIT = 0.3

# -- without ‖∂L/∂h‖: the weight-gradient fallback -------------------------------------------------
#: When no layer's ‖∂L/∂h‖ was measured (a compiled model), first/last ‖∂L/∂W‖ below this enters
#: "vanishing" (a warning: weaker evidence). Three decades, not one: ‖∂L/∂W‖ = ‖∂L/∂h‖ times the
#: layer's input, so it is not the flow itself. Measured at steps 0-4 of the built-in presets,
#: healthy stacks range from 0.016 (sigmoid-residual) to 2.1 (relu-30-he) while the clearly
#: vanishing ones read 6e-5 (sigmoid-deep) to 5e-7 (autoencoder-sigmoid). ‖∂L/∂W‖ cannot show the
#: rest: relu-30-xavier (‖∂L/∂h‖ ratio 5e-5) reads 1.3, exploding (96) 0.5. So a ratio above the
#: line is "not judged", never "healthy", and ‖∂L/∂W‖ never enters "exploding".
WEIGHT_VANISH_ENTER = 1e-3
WEIGHT_VANISH_EXIT = 2e-3

# -- spikes -------------------------------------------------------------------------------------
#: Records in the trailing reference of the spike rule; Lightning's ``SpikeDetection`` uses a
#: running mean over ``window=10`` steps. Here the reference is the median (one earlier spike does
#: not raise it, and a lasting change of level stops counting as a spike after ~5 records).
SPIKE_WINDOW = 10
#: A value spikes when it exceeds its trailing reference by this multiple of the reference
#: (``value - ref >= SPIKE_RTOL * |ref|``, i.e. 3x): Lightning's default ``rtol=2.0``.
SPIKE_RTOL = 2.0
#: Earlier records needed before the rule judges: a full trailing window. The first steps of a
#: run move fast (sigmoid-residual's loss goes 3 -> 60 -> 3 in its first 40 steps, which is the
#: start of training, not a spike in it).
SPIKE_WARMUP = SPIKE_WINDOW
#: A loss rise smaller than this fraction of the run's starting loss is not a spike, however
#: large relative to the median (Lightning's ``atol``, scaled to the run): a converged
#: classifier's batch losses vary 10-30x around ~0.05 when it started at 2.3 (relu-he, elu, swish,
#: measured every step over 600 steps), and a jump from 0.13 to 0.4 has not undone much.
SPIKE_MIN_LOSS_RISE = 0.25
#: The global gradient norm is far noisier from batch to batch than the loss: measured every step
#: over 600 steps of each built-in preset, healthy runs reach 13x their trailing median (elu,
#: leaky-relu, relu-he; p99 up to 8x). Its spike line is therefore above a decade: 20x.
SPIKE_GRAD_RTOL = 19.0
#: A spike verdict stays this many records after the last spike, so it can be read.
SPIKE_HOLD = HOLD
#: Records before a measured spike in which a layer's ‖∂L/∂W‖ may have moved first.
SPIKE_LEAD = 3
#: Layers named in a spike verdict.
SPIKE_LAYERS = 3

# -- through time (recurrent layers) ---------------------------------------------------------------
#: "Inputs more than N steps back get less than this share of the gradient at the last step."
TIME_FLOOR = 1e-3
#: Measured, non-zero time steps needed to fit a per-step factor.
TIME_MIN_POINTS = 3
#: A gated cell (LSTM, GRU) that has learned a long-range dependency carries MORE gradient to the
#: steps that matter than to the last one: the ``lstm`` preset measures first/last 30-300x through
#: time while its held-out accuracy climbs past 90 %. Growth through time in a gated cell counts as
#: exploding only from four decades (a real explosion, ``rnn-exploding``, measures 5e6).
GATED_TIME_EXPLODE_ENTER = 1e4
GATED_TIME_EXPLODE_EXIT = 5e3
GATED_TIME_EXPLODE_CRITICAL = 1e6
GATED_TIME_EXPLODE_CRITICAL_EXIT = 5e5
#: Layer kinds of gated recurrent cells (``RunHeader.layer_kinds``).
GATED_KINDS = ("lstm", "gru")

# -- saturation ----------------------------------------------------------------------------------
#: Fraction of a sigmoid/tanh layer's units within the probe's SATURATION_MARGIN of an asymptote
#: (there sigma' < 0.02: the local gradient is cut 12x below its 0.25 peak). Glorot & Bengio 2010
#: (fig. 2) show the top sigmoid layer driven into saturation early in training; half the units of
#: one layer saturated means half its gradient paths are nearly cut.
SATURATION_ENTER = 0.5
SATURATION_EXIT = 0.35
#: Nearly every unit of a layer saturated: almost nothing passes back through it.
SATURATION_CRITICAL = 0.9
SATURATION_CRITICAL_EXIT = 0.8

# -- dead units ---------------------------------------------------------------------------------
#: Fraction of a rectifying layer's units that output 0 (ReLU) on every example of the batch.
#: ReLU+He at init measures 10% (5x1000) to 35% (the deepest of 30x256 layers) on these data, so
#: the line sits above that; "as much as 40% of your network can be dead" with a too-high learning
#: rate (Karpathy, CS231n) is the classic symptom; half a layer is clearly beyond healthy.
DEAD_ENTER = 0.5
DEAD_EXIT = 0.4
#: A layer with (almost) every unit dead passes (almost) no gradient to anything below it.
DEAD_CRITICAL = 0.95
DEAD_CRITICAL_EXIT = 0.9

# -- plateau ------------------------------------------------------------------------------------
#: Records compared for the plateau rule: median loss of the older half against the newer half.
PLATEAU_WINDOW = 60
#: Relative improvement below this over the window is "not improving" (1%).
PLATEAU_MIN_IMPROVEMENT = 0.01
#: ... and it leaves when the improvement is back above this (hysteresis).
PLATEAU_EXIT_IMPROVEMENT = 0.03
#: A loss already this far below where it started has converged rather than stalled: no plateau.
PLATEAU_CONVERGED_FRACTION = 0.25

#: The built-in presets each verdict points to (tests check that every name exists).
SUGGESTIONS: dict[str, list[str]] = {
    "vanishing_saturating": ["relu-he", "sigmoid-batchnorm", "sigmoid-residual"],
    "vanishing_autoencoder": ["autoencoder-relu", "autoencoder-sigmoid-pretrained"],
    "vanishing_relu": ["relu-he", "leaky-relu"],
    "vanishing_deep": ["relu-30-he"],
    "exploding": ["exploding-clipped", "relu-he"],
    "exploding_deep": ["relu-30-he"],
    "nonfinite": ["exploding-clipped", "relu-he"],
    "dead": ["relu-he", "leaky-relu", "elu"],
    "saturation": ["sigmoid-batchnorm", "relu-he", "sigmoid-xavier"],
    "plateau": ["relu-he"],
    "plateau_autoencoder": ["autoencoder-relu"],
    "spike": ["exploding-clipped"],
    # Through time: gated cells keep an additive path for the gradient (Hochreiter &
    # Schmidhuber 1997); clipping by norm tames the growing one (Pascanu et al. 2013).
    "vanishing_time": ["lstm", "gru", "rnn-orthogonal"],
    "exploding_time": ["rnn-clipped", "lstm", "gru"],
}
#: What a recurrent or convolutional run is pointed to instead (the header's preset names its
#: network): the MLP presets above do not fit those models. Keys missing here keep SUGGESTIONS.
_RECURRENT_VANISHING = ["lstm", "gru", "rnn-orthogonal"]
_RECURRENT_EXPLODING = ["rnn-clipped", "lstm", "gru"]
NETWORK_SUGGESTIONS: dict[str, dict[str, list[str]]] = {
    "rnn": {
        "vanishing_saturating": _RECURRENT_VANISHING,
        "vanishing_relu": _RECURRENT_VANISHING,
        "vanishing_deep": _RECURRENT_VANISHING,
        "exploding": _RECURRENT_EXPLODING,
        "exploding_deep": _RECURRENT_EXPLODING,
        "nonfinite": _RECURRENT_EXPLODING,
        "dead": ["lstm", "gru"],
        "saturation": _RECURRENT_VANISHING,
        "plateau": _RECURRENT_VANISHING,
        "spike": ["rnn-clipped"],
    },
    # Deep plain conv stacks degrade; residual blocks with batch norm keep the gradient's scale
    # (He et al. 2016). cnn-plain is the ReLU fix for cnn-sigmoid's saturation.
    "cnn": {
        "vanishing_saturating": ["cnn-residual", "cnn-plain"],
        "vanishing_relu": ["cnn-residual"],
        "vanishing_deep": ["cnn-residual"],
        "exploding": ["cnn-residual"],
        "exploding_deep": ["cnn-residual"],
        "nonfinite": ["cnn-residual"],
        "dead": ["cnn-residual"],
        "saturation": ["cnn-plain", "cnn-residual"],
        "plateau": ["cnn-residual"],
        "spike": ["cnn-residual"],
    },
}
#: Depth (layers measured, output included) from which the 30-layer presets are the better example.
DEEP_LAYERS = 12

KIND_ORDER = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "spike": 3, "dead": 4,
              "saturation": 5, "plateau": 6, "unjudged": 7, "healthy": 8}


def ratio_verdict(ratio: float | None, metric: str = "act_grad_norm") -> str | None:
    """What a first/last ratio says by itself, by the enter lines of the verdicts: "vanishing",
    "exploding", "healthy", or None when it cannot say (no ratio; or a ‖∂L/∂W‖ ratio above its
    line, which does not rule vanishing out). The one place the TUI and the text output read the
    thresholds from; the verdicts add smoothing and hysteresis on top.

    ``metric``: "act_grad_norm" (‖∂L/∂h‖ across layers, and through time: the same lines over a
    sequence) or "weight_grad_norm" (the fallback when no ‖∂L/∂h‖ was measured)."""
    if ratio is None or ratio != ratio:
        return None
    if metric == "weight_grad_norm":
        return "vanishing" if ratio < WEIGHT_VANISH_ENTER else None
    if ratio < VANISH_ENTER:
        return "vanishing"
    if ratio > EXPLODE_ENTER:
        return "exploding"
    return "healthy"


class TimeFit(NamedTuple):
    """A per-step factor fitted to ‖∂L/∂h_t‖ through time (see :func:`fit_through_time`)."""

    factor: float  # what the gradient is multiplied by per time step going back (< 1: vanishing)
    ratio: float  # fitted first-step / last-step ‖∂L/∂h_t‖ (0 when early steps get exactly 0)
    span: float  # time steps between the first and the last measured point
    steps_to_floor: float  # steps back beyond which less than TIME_FLOOR arrives (inf: never)
    zero_steps: float  # time steps at the start that receive exactly zero gradient
    points: int  # points the fit used


def fit_through_time(norms, stride: float = 1.0) -> TimeFit | None:
    """Fit log ‖∂L/∂h_t‖ = a + b·t by least squares over the measured, non-zero points (t
    ascending, ``stride`` time steps apart). Zeros and NaN (not measured) do not enter the fit; but
    exact zeros at the *start* mean the gradient never reached those steps (a vanilla RNN
    underflows to 0 over ~100 steps), so the ratio is then 0, whatever the fit says.
    None when there is nothing to judge (fewer than TIME_MIN_POINTS usable points, no zeros)."""
    g = np.asarray(norms, dtype=np.float64)
    if g.ndim != 1 or len(g) < 2:
        return None
    t = np.arange(len(g), dtype=np.float64) * stride
    finite = np.isfinite(g)
    positive = finite & (g > 0)
    if not positive.any():  # no gradient at any step (or none measured): nothing through time
        return None
    t_first, t_last = t[finite][0], t[finite][-1]
    span = float(t_last - t_first)
    before = finite & (g == 0) & (t < t[positive][0])
    zero_steps = float(t[before][-1] - t_first + stride) if before.any() else 0.0
    points = int(positive.sum())
    factor = float("nan")
    if points >= max(2, TIME_MIN_POINTS if not before.any() else 2):
        x, y = t[positive], np.log(g[positive])
        var = float(((x - x.mean()) ** 2).sum())
        if var > 0:
            slope = float(((x - x.mean()) * (y - y.mean())).sum() / var)
            factor = math.exp(-slope)
    if factor != factor and not before.any():
        return None
    if before.any():
        ratio = 0.0
        # the steps that get nothing are at most this far back from the last step
        reach = float(t_last - t[before][-1])
    else:
        ratio = factor ** span
        reach = math.inf
    if factor == factor and factor < 1.0:
        steps = math.log(TIME_FLOOR) / math.log(factor) if factor > 0 else 0.0
    else:
        steps = math.inf
    return TimeFit(factor, ratio, span, min(steps, reach), zero_steps, points)


def nonfinite_step(record: StepRecord) -> int | None:
    """The first step this record shows a non-finite value at: the measured step, or a step in
    its window (every step since the previous record) whose loss or global norm was not finite."""
    window = record.window
    steps = []
    if window is not None:
        if not math.isfinite(window.loss_max):
            steps.append(int(window.loss_max_step))
        if window.grad_norm_max is not None and not math.isfinite(window.grad_norm_max):  # None: not measured
            steps.append(int(window.grad_norm_max_step))
    if record.nonfinite is not None:
        steps.append(int(record.step))
    return min(steps) if steps else None


def _merge_through_time(across: list[Verdict], through_time: list[Verdict]) -> list[Verdict]:
    """One verdict per kind. A recurrent layer's ‖∂L/∂h‖ is its norm over every time step, so when
    the gradient explodes or vanishes through time the ratio across layers shows the same thing
    again (rnn-clipped read "exploding" twice). The through-time verdict says where; it keeps the
    across-layer one's clipping finding and, when clipping holds the run (a warning there), its
    severity."""
    by_kind = {v.kind: v for v in across}
    merged = []
    for verdict in through_time:
        other = by_kind.pop(verdict.kind, None)
        if other is not None:
            evidence = {**other.evidence, **verdict.evidence,
                        "across_layers_ratio": other.evidence.get("first_last_ratio")}
            summary, severity, explanation = verdict.summary, verdict.severity, verdict.explanation
            clipped = other.evidence.get("clipped_fraction", 0.0)
            if verdict.kind == "exploding" and other.evidence.get("clip", "none") != "none" and clipped:
                summary += f"; clipping acts on {clipped:.0%} of steps"
                explanation += (f" Clipping rescales {clipped:.0%} of steps: it keeps the run finite"
                                " (Pascanu et al. 2013), but the gradient through time is still that"
                                " large.")
                severity = other.severity
            verdict = dataclasses.replace(verdict, summary=summary, severity=severity, evidence=evidence,
                                          explanation=explanation)
        merged.append(verdict)
    return [v for v in across if v.kind in by_kind] + merged


def _builtin_preset_names() -> set[str]:
    try:
        from .config import builtin_names

        return set(builtin_names())
    except Exception:  # a diagnosis never fails because the preset catalogue cannot be read
        return set()


_BUILTINS: set[str] | None = None


def _suggest(header_preset: dict, names: list[str]) -> list[str]:
    """Built-in preset names, in order, without the preset being run and without duplicates."""
    global _BUILTINS
    if _BUILTINS is None:
        _BUILTINS = _builtin_preset_names()
    current = header_preset.get("name")
    out: list[str] = []
    for name in names:
        if name != current and name not in out and (not _BUILTINS or name in _BUILTINS):
            out.append(name)
    return out


class _Latch:
    """Enter/exit hysteresis on one smoothed value. ``high``: the verdict is about large values.

    Enters as soon as the value crosses ``enter``; leaves only once it is back past ``exit`` and
    the verdict has been shown for at least :data:`HOLD` updates.
    """

    def __init__(self, enter: float, exit: float, high: bool):
        self.enter, self.exit, self.high = enter, exit, high
        self.on = False
        self.age = 0

    def update(self, value: float) -> bool:
        if value != value:  # nan: no information, keep the state
            return self.on
        if self.on:
            self.age += 1
            inside = value > self.exit if self.high else value < self.exit
            self.on = inside or self.age < HOLD
        else:
            self.on = value > self.enter if self.high else value < self.enter
            self.age = 0
        return self.on


def _median(values) -> float:
    """Median of the non-nan values (plain Python: ~1 µs for a handful, numpy costs ~30 µs)."""
    kept = sorted(v for v in values if v == v)
    n = len(kept)
    if not n:
        return float("nan")
    mid = n // 2
    return float(kept[mid]) if n % 2 else 0.5 * (kept[mid - 1] + kept[mid])


class _Ring:
    """The last ``size`` rows of a per-layer column, preallocated; median per layer on demand."""

    def __init__(self, size: int, width: int):
        self.rows = np.full((size, width), np.nan)
        self.size = size
        self.count = 0
        self.width = width

    def push(self, row) -> None:
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (self.width,):  # a record of another shape: never mix them
            self.__init__(self.size, row.shape[0] if row.ndim == 1 else 0)
            if row.ndim != 1:
                return
        self.rows[self.count % self.size] = row
        self.count += 1

    def median(self) -> np.ndarray:
        """Per-layer median over the filled rows, ignoring nan (a layer nan in every row: nan)."""
        rows = self.rows[: min(self.count, self.size)]
        if not len(rows):
            return np.full(self.width, np.nan)
        ordered = np.sort(rows, axis=0)  # nan sort last
        if not np.isnan(ordered[-1]).any():  # the usual case: no nan anywhere
            k = len(rows)
            return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])
        valid = len(rows) - np.isnan(rows).sum(axis=0)
        lo = np.maximum((valid - 1) // 2, 0)
        hi = np.maximum(valid // 2, 0)
        cols = np.arange(self.width)
        return 0.5 * (ordered[lo, cols] + ordered[hi, cols])


def _values(record: StepRecord, metric: str) -> np.ndarray:
    """The metric's column, NaN where it was not measured (already so in well-formed records; the
    copy is made only when a mask says something was not measured)."""
    values = record.layers[metric]
    mask = record.unmeasured.get(metric)
    if mask is None or not mask.any():
        return values
    return np.where(mask, np.nan, values)


def _main_kind(kinds: list[str]) -> str:
    """The most common activation among the layers (ties: the first), "" if all are linear."""
    counts: dict[str, int] = {}
    for kind in kinds:
        if kind and kind != "linear":
            counts[kind] = counts.get(kind, 0) + 1
    return max(counts, key=counts.get) if counts else ""


def _argmax(values: np.ndarray) -> int:
    """Index of the largest non-nan value, -1 when all are nan."""
    filled = np.where(np.isnan(values), -np.inf, values)
    i = int(filled.argmax()) if len(filled) else -1
    return i if i >= 0 and filled[i] > -np.inf else -1


def _ratio(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0.0:
        return float("nan")
    return num / den


def _fmt(x: float) -> str:
    if x != x:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) < 1e-2 or abs(x) >= 1e6:
        return f"{x:.1e}"
    if abs(x) >= 1e3:
        return f"{x:,.0f}"
    return f"{x:.3g}"


class Diagnoser:
    """Consumes the StepRecords of one run, in order; ``update`` returns that record's verdicts."""

    def __init__(self, header: RunHeader):
        self.header = header
        self.preset = dict(header.preset or {})
        self.names = list(header.layers)
        self.kinds = list(header.layer_kinds)
        self.n = len(self.names)
        # A preset names its activation; a user's model (vgtui.watch) only has the layer kinds.
        self.activation = self.preset.get("activation") or _main_kind(self.kinds)
        self.task = self.preset.get("task", "classifier")
        self.network = self.preset.get("network", "mlp")
        self.clip = self.preset.get("clip", "none")
        self.first_nonfinite: dict | None = None
        self.nonfinite_records = 0
        self.last_step: int | None = None  # the step of the previous record, any phase
        self.last_finite_ratio = float("nan")
        self.phase: str | None = None
        # Only these layers' unit fractions are read: a ReLU unit that is off is dead (zero
        # gradient); LeakyReLU / ELU / SiLU units that stay negative still pass a gradient.
        self.relu_layers = np.array([i for i, k in enumerate(self.kinds) if k == "relu"], dtype=int)
        self.saturating_layers = np.array(
            [i for i, k in enumerate(self.kinds) if k in ("sigmoid", "tanh")], dtype=int)
        self._reset_phase()

    def _fixes(self, key: str) -> list[str]:
        """The presets verdict ``key`` points to, for this run's kind of network; after an
        explosion through time, the fixes against it come first (see ``time_burst``)."""
        fixes = NETWORK_SUGGESTIONS.get(self.network, {}).get(key, SUGGESTIONS[key])
        if self.time_burst is not None and key in ("vanishing_time", "saturation"):
            return self._fixes("exploding_time") + fixes
        return fixes

    # -- state ---------------------------------------------------------------------------------
    def _reset_phase(self) -> None:
        self.count = 0
        self.ratios: deque[float] = deque(maxlen=WINDOW)
        # Whether each record in the window measured ‖∂L/∂h‖ on two layers or more.
        self.act_measured: deque[bool] = deque(maxlen=WINDOW)
        self.ratio_layers: tuple[int, int] | None = None  # the newest measured first/last pair
        self.w_ratios: deque[float] = deque(maxlen=WINDOW)
        self.w_ratio_layers: tuple[int, int] | None = None
        self.act_grads = _Ring(WINDOW, self.n)
        self.upd_first: deque[float] = deque(maxlen=DETAIL_WINDOW)
        self.upd_last: deque[float] = deque(maxlen=DETAIL_WINDOW)
        self.dead = _Ring(DETAIL_WINDOW, len(self.relu_layers))
        self.saturated = _Ring(DETAIL_WINDOW, len(self.saturating_layers))
        self.gnorm: deque[float] = deque(maxlen=WINDOW)
        self.gnorm_floor = float("inf")
        self.growth_now = float("nan")
        self.clipped: deque[bool] = deque(maxlen=CLIP_WINDOW)
        self.losses: deque[float] = deque(maxlen=PLATEAU_WINDOW)
        self.first_loss = float("nan")
        self.vanish = _Latch(VANISH_ENTER, VANISH_EXIT, high=False)
        self.vanish_crit = _Latch(VANISH_CRITICAL, VANISH_CRITICAL_EXIT, high=False)
        self.w_vanish = _Latch(WEIGHT_VANISH_ENTER, WEIGHT_VANISH_EXIT, high=False)
        self.frozen = _Latch(UPDATE_FROZEN, 2 * UPDATE_FROZEN, high=False)
        self.explode = _Latch(EXPLODE_ENTER, EXPLODE_EXIT, high=True)
        self.explode_crit = _Latch(EXPLODE_CRITICAL, EXPLODE_CRITICAL_EXIT, high=True)
        self.growth = _Latch(STEP_GROWTH_ENTER, STEP_GROWTH_EXIT, high=True)
        self.clipping = _Latch(CLIP_MOST, CLIP_MOST_EXIT, high=True)
        self.sat = _Latch(SATURATION_ENTER, SATURATION_EXIT, high=True)
        self.sat_crit = _Latch(SATURATION_CRITICAL, SATURATION_CRITICAL_EXIT, high=True)
        self.dead_latch = _Latch(DEAD_ENTER, DEAD_EXIT, high=True)
        self.dead_crit = _Latch(DEAD_CRITICAL, DEAD_CRITICAL_EXIT, high=True)
        self._dead_med = self._sat_med = np.full(self.n, np.nan)
        self.plateau = _Latch(PLATEAU_MIN_IMPROVEMENT, PLATEAU_EXIT_IMPROVEMENT, high=False)
        # spikes: trailing references (medians of earlier records), ‖∂L/∂W‖ rows, recent spikes
        self.spike_ref = {"loss": deque(maxlen=SPIKE_WINDOW), "grad_norm": deque(maxlen=SPIKE_WINDOW)}
        self.wgrad_rows: deque[np.ndarray] = deque(maxlen=SPIKE_WINDOW + SPIKE_LEAD)
        self.spikes: deque[dict] = deque(maxlen=SPIKE_WINDOW)
        self.since_spike = SPIKE_HOLD
        # through time: per record, the most vanishing and the most exploding layer's fit
        self.time_low: deque[float] = deque(maxlen=WINDOW)
        self.time_high: deque[float] = deque(maxlen=WINDOW)
        self.time_fits: dict[str, TimeFit] = {}
        self.time_vanish = _Latch(VANISH_ENTER, VANISH_EXIT, high=False)
        self.time_vanish_crit = _Latch(VANISH_CRITICAL, VANISH_CRITICAL_EXIT, high=False)
        self.time_explode = _Latch(EXPLODE_ENTER, EXPLODE_EXIT, high=True)
        self.time_explode_crit = _Latch(EXPLODE_CRITICAL, EXPLODE_CRITICAL_EXIT, high=True)
        self.time_high_gated: deque[float] = deque(maxlen=WINDOW)
        self.time_explode_gated = _Latch(GATED_TIME_EXPLODE_ENTER, GATED_TIME_EXPLODE_EXIT, high=True)
        self.time_explode_gated_crit = _Latch(GATED_TIME_EXPLODE_CRITICAL, GATED_TIME_EXPLODE_CRITICAL_EXIT,
                                              high=True)
        #: The first record whose gradient grew through time past the critical line: (step, ratio,
        #: layer). A vanilla RNN whose first steps explode saturates and then passes exactly
        #: nothing back: the vanishing that follows has that cause, and clipping is its fix.
        self.time_burst: tuple[int, float, str] | None = None

    # -- the entry points ------------------------------------------------------------------------
    def diagnose(self, record: StepRecord) -> StepRecord:
        """The record with its verdicts: a new record, built whole (records are never mutated),
        e.g. ``record = diagnoser.diagnose(record)`` before handing it on."""
        return dataclasses.replace(record, verdicts=self.update(record))

    def update(self, record: StepRecord) -> list[Verdict]:
        """This record's verdicts, worst first (empty until MIN_RECORDS records have been seen)."""
        if record.phase != self.phase:
            # Another phase measures other layers (pre-training one layer at a time): start over.
            self.phase = record.phase
            self._reset_phase()
        verdicts: list[Verdict] = []

        if record.nonfinite is not None:
            self.nonfinite_records += 1
            if self.first_nonfinite is None:
                layer, direction = record.nonfinite
                # Steps between sampled records are not measured: the value may have turned
                # non-finite on any step after the previous record.
                after = self.last_step + 1 if self.last_step is not None else 0
                self.first_nonfinite = {"step": int(record.step), "layer": str(layer),
                                        "direction": str(direction), "phase": record.phase,
                                        "not_before": int(min(after, record.step))}
                seen = nonfinite_step(record)
                if seen is not None and seen < record.step:  # the window saw it on an earlier step
                    self.first_nonfinite["window_step"] = int(seen)
        self.last_step = int(record.step)
        if self.first_nonfinite is not None:
            verdicts.append(self._nonfinite_verdict(record))

        if record.nonfinite is None:
            # A non-finite record's other columns are garbage (nan compares as "not active"):
            # the windows keep the last finite measurements instead.
            self._observe_spikes(record)
            self._observe(record)
        if self.count < MIN_RECORDS and not verdicts:
            return []
        if record.phase.startswith("pretrain:"):
            verdicts += self._local_verdicts()
            if not verdicts:
                verdicts.append(self._pretrain_healthy(record))
            return _ordered(verdicts)

        if self.count >= MIN_RECORDS:
            verdicts += _merge_through_time(self._flow_verdicts(record), self._time_verdicts())
            spike = self._spike_verdict()
            if spike is not None:
                verdicts.append(spike)
            verdicts += self._local_verdicts()
            plateau = self._plateau_verdict(verdicts)
            if plateau is not None:
                verdicts.append(plateau)
            if not any(self.act_measured) and not any(
                    v.evidence.get("basis") == "weight_grad_norm" for v in verdicts):
                verdicts.append(self._unjudged_verdict())  # never "healthy" on what was not seen
        if not verdicts:
            verdicts.append(self._healthy_verdict())
        return _ordered(verdicts)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _observe(self, record: StepRecord) -> None:
        self.count += 1
        cols = record.layers
        first_last = record.first_last_ratio("act_grad_norm")
        self.act_measured.append(first_last.first is not None)
        ratio = first_last.value
        if not math.isfinite(ratio):  # inf over a finite last layer: no usable ratio
            ratio = float("nan")
        self.ratios.append(ratio)
        if first_last.first is not None:
            self.ratio_layers = (first_last.first, first_last.last)
        if ratio == ratio:
            self.last_finite_ratio = ratio
        self.act_grads.push(_values(record, "act_grad_norm"))
        if first_last.first is None:  # no ‖∂L/∂h‖: keep what ‖∂L/∂W‖ can tell
            w = record.first_last_ratio("weight_grad_norm")
            self.w_ratios.append(w.value if math.isfinite(w.value) else float("nan"))
            if w.first is not None:
                self.w_ratio_layers = (w.first, w.last)
        if getattr(record, "detail", True):  # not measured on the other steps: nan, not zero
            upd = _values(record, "update_ratio")
            at = np.flatnonzero(~np.isnan(upd))
            if len(at) >= 2:
                self.upd_first.append(float(upd[at[0]]))
                self.upd_last.append(float(upd[at[-1]]))
            if len(self.relu_layers):
                dead = np.asarray(_values(record, "dead"))[self.relu_layers]
                if not np.isnan(dead).all():
                    self.dead.push(dead)
            if len(self.saturating_layers):
                sat = np.asarray(_values(record, "saturated"))[self.saturating_layers]
                if not np.isnan(sat).all():
                    self.saturated.push(sat)
        total = float(record.grad_norm_total)
        self.gnorm.append(total if math.isfinite(total) else float("nan"))
        if len(self.gnorm) >= MIN_RECORDS:
            smoothed = _median(self.gnorm)
            if smoothed == smoothed and smoothed > 0:
                self.gnorm_floor = min(self.gnorm_floor, smoothed)
                self.growth_now = smoothed / self.gnorm_floor
        self.clipped.append(bool(record.clipped))
        loss = float(record.loss)
        self.losses.append(loss if math.isfinite(loss) else float("nan"))
        if self.first_loss != self.first_loss and len(self.losses) >= MIN_RECORDS:
            self.first_loss = _median(self.losses)
        if record.time_act_grad_norm:
            self._observe_time(record)

    # -- vanishing / exploding -------------------------------------------------------------------
    def _flow_verdicts(self, record: StepRecord) -> list[Verdict]:
        out: list[Verdict] = []
        ratio = _median(self.ratios)
        per_layer = self._per_layer_factor(ratio)
        vanishing = self.vanish.update(ratio)
        critical = self.vanish_crit.update(ratio)
        upd_first = _median(self.upd_first)
        upd_last = _median(self.upd_last)
        upd_spread = _ratio(upd_first, upd_last)
        frozen = self.frozen.update(upd_first) and upd_spread == upd_spread and upd_spread < UPDATE_SPREAD
        w_vanishing = False
        if not any(self.act_measured):
            w_vanishing = self.w_vanish.update(_median(self.w_ratios))
        g = steps = None
        if vanishing or frozen or w_vanishing:
            g = self.act_grads.median()
            steps = self._consecutive(g)
            out.append(self._vanishing_verdict(ratio, per_layer, steps, g, upd_first, upd_last,
                                               upd_spread, critical, frozen, w_vanishing))
        exploding_layers = self.explode.update(ratio)
        explode_critical = self.explode_crit.update(ratio)
        growth = self.growth_now
        growing = self.growth.update(growth)
        clip_fraction = sum(self.clipped) / len(self.clipped) if self.clipped else 0.0
        clipping = self.clip != "none" and self.clipping.update(clip_fraction)
        nonfinite = self.first_nonfinite is not None
        if exploding_layers or growing or clipping or nonfinite:
            if nonfinite and not (exploding_layers or growing):
                # After the overflow the norms are nan: judge growth from the last finite values.
                exploding_layers = self.last_finite_ratio > EXPLODE_ENTER
            if exploding_layers or growing or clipping:
                if steps is None:
                    steps = self._consecutive(self.act_grads.median())
                out.append(self._exploding_verdict(
                    ratio, per_layer, steps, growth, clip_fraction, exploding_layers, growing,
                    clipping, explode_critical or nonfinite or growth > STEP_GROWTH_CRITICAL))
        return out

    def _span(self) -> int:
        """Layers between the first and the last measured layer (n - 1 when all were measured)."""
        if self.ratio_layers is None:
            return self.n - 1
        return self.ratio_layers[1] - self.ratio_layers[0]

    def _per_layer_factor(self, ratio: float) -> float:
        span = self._span()
        if ratio != ratio or span < 1:
            return float("nan")
        if ratio <= 0:
            return 0.0
        return float(ratio ** (1.0 / span))

    def _pair_names(self, pair: tuple[int, int] | None) -> tuple[str, str]:
        if pair is None:
            return "", ""
        return self.names[pair[0]], self.names[pair[1]]

    def _consecutive(self, g: np.ndarray) -> list[float | None]:
        """g[i] / g[i+1]: what back-propagation through layer i+1 multiplied the gradient by
        (None where either layer was not measured or the ratio is not a number)."""
        with np.errstate(all="ignore"):
            r = g[:-1] / g[1:]
        return [float(x) if math.isfinite(x) else None for x in r]

    def _vanishing_verdict(self, ratio, per_layer, steps, g, upd_first, upd_last, upd_spread,
                           critical, frozen, w_vanishing=False) -> Verdict:
        act = self.activation
        saturating = act in ("sigmoid", "tanh")
        init = self.preset.get("init")  # None: a user's model, init unknown
        depth = self._span()
        first, last = self._pair_names(self.ratio_layers)
        dead_all = ratio == 0.0
        basis = "act_grad_norm"
        if dead_all:
            summary = f"no gradient reaches {first} (first/last ‖∂L/∂h‖ = 0, {first} / {last})"
        elif ratio == ratio and ratio < VANISH_ENTER:
            summary = (f"‖∂L/∂h‖ falls {_fmt(1 / ratio)}× from {last} to {first} "
                       f"(first/last {_fmt(ratio)}, ×{_fmt(per_layer)} per layer)")
        elif w_vanishing:
            basis = "weight_grad_norm"
            w_ratio = _median(self.w_ratios)
            first, last = self._pair_names(self.w_ratio_layers)
            summary = (f"‖∂L/∂W‖ of {first} is {_fmt(1 / w_ratio) if w_ratio > 0 else '∞'}× smaller"
                       f" than of {last} (no ‖∂L/∂h‖ measured: judged from ‖∂L/∂W‖)")
        else:
            summary = (f"first-layer updates frozen: ‖ΔW‖/‖W‖ {_fmt(upd_first)} vs "
                       f"{_fmt(upd_last)} at the output")
        worst = _argmax(-np.asarray(steps, dtype=np.float64)) if steps else -1
        if basis == "weight_grad_norm":
            causes = ["No layer's ‖∂L/∂h‖ was measured (a compiled model, or layers never called"
                      " as modules), so the flow itself cannot be seen. ‖∂L/∂W‖ is ‖∂L/∂h‖ times"
                      f" the layer's input; a first/last ratio of {_fmt(_median(self.w_ratios))}"
                      " (three decades or more) is beyond what the input's size explains in any"
                      " healthy network measured here."]
        else:
            causes = [f"Back-propagation multiplies the gradient by one factor per layer; here it"
                      f" is ×{_fmt(per_layer)} on average over the {depth} layers from {last} to"
                      f" {first}, so {first} gets {_fmt(ratio)} of the gradient {last} gets."]
        if saturating:
            peak = "0.25" if act == "sigmoid" else "1 (at 0 only)"
            causes.append(f"{act} is a saturating activation: its derivative is at most {peak}"
                          " and falls towards 0 on its flat tails, so every layer shrinks the"
                          " gradient (Glorot & Bengio 2010).")
            if init == "default" and self.preset.get("task") in ("classifier", "autoencoder"):
                causes.append("The default init U(±1/√fan_in) keeps pre-activations small, so each"
                              " layer's Jacobian is well below 1; Xavier init helps, but sigmoid"
                              " still shrinks it.")
        elif act in ("relu", "leaky_relu", "elu", "silu"):
            if init in ("kaiming_normal", "kaiming_uniform"):
                causes.append("He init preserves the gradient's scale in a plain ReLU stack, so"
                              " the loss of signal comes from somewhere else (dead units, a"
                              " negative bias, or the learning rate).")
            else:
                which = f"the init ({init})" if init else "the init"
                causes.append(f"{act} does not saturate, so the likely cause is that {which} is"
                              " too small for it: a ReLU passes half the variance, so weights"
                              " need variance 2/fan_in (He et al. 2015) or the gradient shrinks"
                              " every layer, and more so the deeper the net.")
        if self.network == "cnn":
            causes.append("A deep plain conv stack multiplies these factors over every layer; residual"
                          " blocks with batch norm add an identity path that carries the gradient"
                          " past them (He et al. 2016).")
        if dead_all:
            causes.append("A layer whose units are all inactive passes exactly zero gradient back.")
        causes.append("Early layers then barely change: their updates are tiny relative to their"
                      " weights, and the loss plateaus while the top layers do all the learning.")
        if self.task == "autoencoder":
            suggest = self._fixes("vanishing_autoencoder")
        elif saturating:
            suggest = self._fixes("vanishing_saturating")
        elif self.n > DEEP_LAYERS:
            suggest = self._fixes("vanishing_deep")
        else:
            suggest = self._fixes("vanishing_relu")
        evidence = {
            "basis": basis,
            "first_last_ratio": float(ratio),
            "first_layer": first,
            "last_layer": last,
            "per_layer_factor": float(per_layer),
            "layer_ratios": steps,
            "act_grad_norm": [float(x) if x == x else None for x in g.tolist()],
            "weakest_layer": self.names[worst + 1] if worst >= 0 else "",
            "first_update_ratio": float(upd_first),
            "last_update_ratio": float(upd_last),
            "update_spread": float(upd_spread),
            "updates_frozen": bool(frozen),
        }
        if basis == "weight_grad_norm":
            evidence["weight_grad_ratio"] = float(_median(self.w_ratios))
        severity = "critical" if (critical or dead_all) and basis == "act_grad_norm" else "warning"
        return Verdict("vanishing", severity, summary, " ".join(causes), evidence,
                       _suggest(self.preset, suggest))

    def _exploding_verdict(self, ratio, per_layer, steps, growth, clip_fraction, layers, growing,
                           clipping, critical) -> Verdict:
        parts, causes = [], []
        nf = self.first_nonfinite
        first, last = self._pair_names(self.ratio_layers)
        if layers:
            shown = ratio if ratio == ratio else self.last_finite_ratio
            parts.append(f"‖∂L/∂h‖ grows {_fmt(shown)}× from {last} to {first} "
                         f"(×{_fmt(self._per_layer_factor(shown))} per layer)")
            causes.append("Each layer multiplies the back-propagated gradient by more than 1:"
                          " the weights are initialised too large for the depth (for ReLU the"
                          " variance-preserving scale is √(2/fan_in), He et al. 2015), so the"
                          " gradient grows geometrically towards the input.")
        if growing:
            parts.append(f"global ‖g‖ up {_fmt(growth)}× over the run")
            causes.append("The global gradient norm keeps growing from step to step: updates"
                          " make the weights larger, which makes the next gradient larger"
                          " (a learning rate too large for this init).")
        if clipping:
            parts.append(f"clipping acts on {clip_fraction:.0%} of steps")
            causes.append(f"Gradient clipping ({self.clip}, threshold"
                          f" {self.preset.get('clip_threshold', '?')}) rescales most steps: it"
                          " keeps the run finite (Pascanu et al. 2013) but the underlying"
                          " gradients are still too large.")
        if nf is not None:
            parts.append(f"non-finite from step {nf['step']} ({nf['layer']}, {nf['direction']})")
            causes.append("Unchecked, the growth ends in overflow: float32 tops out near 3e38,"
                          " beyond it values become inf, then NaN, and NaN spreads to every"
                          " weight.")
        if nf is not None or not clipping:
            causes.append("Remedies: a smaller init (He scale), a smaller learning rate, or"
                          " gradient clipping by norm.")
        severity = "critical" if critical else "warning"
        if clipping and nf is None and not growing:
            severity = "warning"
        evidence = {
            "first_last_ratio": float(ratio if ratio == ratio else self.last_finite_ratio),
            "first_layer": first,
            "last_layer": last,
            "per_layer_factor": float(self._per_layer_factor(ratio if ratio == ratio
                                                             else self.last_finite_ratio)),
            "layer_ratios": steps,
            "grad_norm_growth": float(growth),
            "grad_norm_total": float(_median(self.gnorm)),
            "clipped_fraction": float(clip_fraction),
            "clip": self.clip,
            "across_layers": bool(layers),
            "over_steps": bool(growing),
        }
        if nf is not None:
            evidence.update({"nonfinite_step": nf["step"], "nonfinite_layer": nf["layer"],
                             "nonfinite_direction": nf["direction"]})
        suggest = self._fixes("exploding") if self.n <= DEEP_LAYERS else self._fixes("exploding_deep")
        return Verdict("exploding", severity, "; ".join(parts), " ".join(causes), evidence,
                       _suggest(self.preset, suggest))

    def _unjudged_verdict(self) -> Verdict:
        w_ratio = _median(self.w_ratios)
        first, last = self._pair_names(self.w_ratio_layers)
        weight = (f"; ‖∂L/∂W‖ first/last {_fmt(w_ratio)} ({first} / {last})"
                  if w_ratio == w_ratio else "")
        return Verdict(
            "unjudged", "info",
            f"vanishing/exploding across layers not judged: no layer's ‖∂L/∂h‖ was measured{weight}",
            "The diagnosis judges gradient flow from the back-propagated ‖∂L/∂h‖ of each layer's"
            " output, and none was measured here (a compiled model, or layers that are never"
            " called as modules). ‖∂L/∂W‖ is a weaker substitute: it also scales with each layer's"
            f" input, so only a first/last ratio below {WEIGHT_VANISH_ENTER:g} is read as vanishing;"
            " above it nothing can be concluded either way. Non-finite values, gradient-norm"
            " growth, spikes, clipping, dead and saturated units and the loss are still judged.",
            {"weight_grad_ratio": float(w_ratio), "first_layer": first, "last_layer": last}, [])

    # -- spikes -------------------------------------------------------------------------------------
    def _observe_spikes(self, record: StepRecord) -> bool:
        """Compare this record's loss and global ‖g‖ (the largest of every step since the previous
        record, when the record carries that window; else the measured step's) with the median of
        the same over the previous SPIKE_WINDOW records; remember spikes. True when this record
        shows one."""
        w = record.window
        values = {"loss": (record.loss, record.step), "grad_norm": (record.grad_norm_total, record.step)}
        if w is not None:
            values["loss"] = (w.loss_max, w.loss_max_step)
            if w.grad_norm_max is not None:  # None: the norm between samples was not measured
                values["grad_norm"] = (w.grad_norm_max, w.grad_norm_max_step)
        wgrad = np.array(_values(record, "weight_grad_norm"), dtype=np.float64)  # kept: a copy
        found = False
        for metric, (peak, step) in values.items():
            peak = float(peak)
            ref_values = self.spike_ref[metric]
            ref = _median(ref_values)
            floor = (SPIKE_MIN_LOSS_RISE * abs(self.first_loss)
                     if metric == "loss" and self.first_loss == self.first_loss else 0.0)
            rtol = SPIKE_RTOL if metric == "loss" else SPIKE_GRAD_RTOL
            if (metric == "grad_norm" and self.growth.on) or len(ref_values) < SPIKE_WARMUP:
                pass  # sustained growth is the exploding verdict's; too little history to judge
            elif not math.isfinite(peak) or (ref == ref and peak > ref + floor
                                             and peak - ref >= rtol * abs(ref)):
                found = True
                self.spikes.append(self._spike_event(metric, record, peak, int(step), ref, wgrad))
            if math.isfinite(peak):  # the reference is of peaks too: a window's largest value
                ref_values.append(peak)  # against earlier windows' largest, like for like
        self.wgrad_rows.append(wgrad)
        self.since_spike = 0 if found else self.since_spike + 1
        return found

    def _spike_event(self, metric, record, peak, step, ref, wgrad) -> dict:
        event = {"metric": metric, "step": step, "value": peak, "reference": ref,
                 "ratio": _ratio(peak, ref) if math.isfinite(peak) else float("inf"),
                 "record_step": int(record.step), "sampled": step == int(record.step),
                 "layers": [], "layer_factors": [], "first_layer": ""}
        rows = list(self.wgrad_rows)
        if not event["sampled"] or len(rows) < MIN_RECORDS:
            return event
        # The measured step shows the spike: which layers' ‖∂L/∂W‖ moved, against their medians.
        with np.errstate(all="ignore"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                factor = wgrad / np.nanmedian(np.stack(rows[-SPIKE_WINDOW:]), axis=0)
                factor = np.where(np.isfinite(factor), factor, np.nan)
                order = [int(i) for i in np.argsort(-np.nan_to_num(factor, nan=-np.inf))
                         if factor[i] == factor[i]][:SPIKE_LAYERS]
                event["layers"] = [self.names[i] for i in order]
                event["layer_factors"] = [float(factor[i]) for i in order]
                # First: a layer already up by the spike line in an earlier record, the earliest.
                line = 1.0 + SPIKE_RTOL
                for back in range(min(SPIKE_LEAD, len(rows) - MIN_RECORDS), 0, -1):
                    then = rows[-back]
                    before = rows[max(0, len(rows) - back - SPIKE_WINDOW):len(rows) - back]
                    moved = then / np.nanmedian(np.stack(before), axis=0)
                    moved = np.where(np.isfinite(moved), moved, -np.inf)
                    if moved.max() >= line:
                        event["first_layer"] = self.names[int(moved.argmax())]
                        event["first_step_back"] = back
                        break
        return event

    def _spike_verdict(self) -> Verdict | None:
        if not self.spikes or self.since_spike >= SPIKE_HOLD:
            return None
        last = self.spikes[-1]
        what = "loss" if last["metric"] == "loss" else "global ‖g‖"
        if math.isfinite(last["value"]):
            size = f"{_fmt(last['ratio'])}× its trailing median {_fmt(last['reference'])}"
        else:
            size = f"not finite ({_fmt(last['value'])}), trailing median {_fmt(last['reference'])}"
        where = ("" if last["sampled"] else
                 f", between samples (next measured step {last['record_step']})")
        summary = f"{what} spike at step {last['step']}: {size}{where}"
        if last["layers"]:
            moved = ", ".join(f"{name} ×{_fmt(f)}" for name, f in
                              zip(last["layers"], last["layer_factors"]))
            summary += f"; ‖∂L/∂W‖ moved most in {moved}"
            if last["first_layer"]:
                summary += f" (first: {last['first_layer']})"
        count = len(self.spikes)
        if count > 1:
            summary += f" ({count} spikes so far)" if count < SPIKE_WINDOW else \
                f" ({count}+ spikes so far)"
        rtol = SPIKE_RTOL if last["metric"] == "loss" else SPIKE_GRAD_RTOL
        explanation = (f"A {what} more than {1 + rtol:g}× the median of the previous"
                       f" {SPIKE_WINDOW} records (Lightning's SpikeDetection rule, rtol"
                       f" {rtol:g}). ")
        if not last["sampled"]:
            explanation += (f"It happened on step {last['step']}, which was not measured layer by"
                            " layer: every step's loss and global norm are accumulated between"
                            " samples, so it is caught and named, but which layers moved is not"
                            " known. ")
        explanation += ("Spikes come from a learning rate too high for the curvature met, a bad"
                        " batch, or a growing gradient; one that is not absorbed can end in"
                        " divergence or NaN. Remedies: clipping by norm, a smaller learning rate"
                        " or a warm-up.")
        evidence = {k: v for k, v in last.items()} | {"spikes": count}
        return Verdict("spike", "warning", summary, explanation, evidence,
                       _suggest(self.preset, self._fixes("spike")))

    # -- through time --------------------------------------------------------------------------------
    def _time_stride(self, points: int) -> float:
        """Time steps between recorded points: 1 unless the series was downsampled to TIME_POINTS
        and the preset names its sequence length."""
        if points < TIME_POINTS:
            return 1.0
        for key in ("seq_len", "sequence_length", "seq_length"):
            length = self.preset.get(key)
            if isinstance(length, (int, float)) and length > points:
                return (float(length) - 1.0) / (points - 1)
        return 1.0

    def _observe_time(self, record: StepRecord) -> None:
        fits = {}
        for name, norms in record.time_act_grad_norm.items():
            fit = fit_through_time(norms, self._time_stride(len(norms)))
            if fit is not None:
                fits[name] = fit
        if not fits:
            return
        self.time_fits = fits
        ratios = [f.ratio for f in fits.values() if f.ratio == f.ratio]
        if self.time_burst is None and ratios and max(ratios) > EXPLODE_CRITICAL:
            name = max((k for k in fits if fits[k].ratio == fits[k].ratio), key=lambda k: fits[k].ratio)
            self.time_burst = (int(record.step), float(fits[name].ratio), name)
        if ratios:
            self.time_low.append(min(ratios))
            plain = [f.ratio for k, f in fits.items() if f.ratio == f.ratio and not self._gated(k)]
            gated = [f.ratio for k, f in fits.items() if f.ratio == f.ratio and self._gated(k)]
            self.time_high.append(max(plain) if plain else float("nan"))
            self.time_high_gated.append(max(gated) if gated else float("nan"))

    def _gated(self, series: str) -> bool:
        """Whether a through-time series belongs to a gated cell (LSTM, GRU): by the layer's kind
        (``lstm.l1`` is layer ``lstm``'s second stacked layer) or the preset's cell."""
        if self.preset.get("cell") in GATED_KINDS:
            return True
        names = self.header.layers
        base = series if series in names else series.rsplit(".l", 1)[0]
        return base in names and self.kinds[names.index(base)] in GATED_KINDS

    def _time_verdicts(self) -> list[Verdict]:
        if not self.time_low:
            return []
        low, high = _median(self.time_low), _median(self.time_high)
        out = []
        vanishing, critical = self.time_vanish.update(low), self.time_vanish_crit.update(low)
        exploding, ex_critical = self.time_explode.update(high), self.time_explode_crit.update(high)
        gated_high = _median(self.time_high_gated)
        gated_exploding = self.time_explode_gated.update(gated_high)
        gated_critical = self.time_explode_gated_crit.update(gated_high)
        if vanishing:
            name = min(self.time_fits, key=lambda k: self.time_fits[k].ratio)
            out.append(self._time_verdict("vanishing", name, low, critical))
        if exploding or gated_exploding:
            name = max(self.time_fits, key=lambda k: self.time_fits[k].ratio)
            ratio = high if exploding else gated_high
            out.append(self._time_verdict("exploding", name, ratio, ex_critical or gated_critical))
        return out

    def _time_verdict(self, kind: str, name: str, ratio: float, critical: bool) -> Verdict:
        fit = self.time_fits[name]
        span = int(round(fit.span))
        if kind == "vanishing":
            if fit.zero_steps:
                summary = (f"through time in {name}: no gradient reaches the first"
                           f" {int(fit.zero_steps)} of {span + 1} time steps (exactly 0)")
                if fit.factor == fit.factor:
                    summary += f"; the gradient reaching step t−k falls ×{_fmt(fit.factor)} per step"
            else:
                summary = (f"through time in {name}: the gradient reaching step t−k falls"
                           f" ×{_fmt(fit.factor)} per step")
                if fit.steps_to_floor <= fit.span:
                    summary += (f"; inputs more than {math.ceil(fit.steps_to_floor)} steps back"
                                f" get less than {TIME_FLOOR:g} of it")
                else:
                    summary += f"; the first step gets {_fmt(fit.ratio)} of it"
            explanation = (
                f"‖∂L/∂h_t‖ of {name}, fitted log-linearly over the {fit.points} measured time"
                f" steps, is multiplied by {_fmt(fit.factor)} for every step back from the last"
                " one (where the loss is): back-propagation through time multiplies by the"
                " recurrent Jacobian once per step, and when its largest singular value is below 1"
                " the gradient from far-back inputs decays geometrically (Bengio, Simard &"
                " Frasconi 1994; Hochreiter 1991), so the network cannot learn long-range"
                " dependencies. Remedies: a gated cell (LSTM, GRU), whose additive cell path passes"
                " the gradient on nearly unchanged (Hochreiter & Schmidhuber 1997); an orthogonal"
                " init of the recurrent weights (singular values 1); shorter sequences."
                " Clipping does not help: it only scales large gradients down.")
            suggest = self._fixes("vanishing_time")
            burst = self.time_burst
            if burst is not None:
                summary += f", after it exploded through time at step {burst[0]}"
                explanation = (
                    f"At step {burst[0]} the gradient through time in {burst[2]} grew instead: the"
                    f" first step got {_fmt(burst[1])}× that of the last. The update it drove made"
                    " the recurrent weights so large that the units saturate, and a saturated tanh"
                    " or sigmoid passes (almost) nothing back, so now the gradient through time"
                    " vanishes. The fix is against the explosion: clipping by norm (Pascanu,"
                    " Mikolov & Bengio 2013), a recurrent init with spectral radius near 1, or a"
                    " gated cell. " + explanation.split(" Remedies:")[0])
        else:
            summary = (f"through time in {name}: the gradient grows ×{_fmt(fit.factor)} per step"
                       f" back; the first step gets {_fmt(fit.ratio)}× that of the last")
            explanation = (
                f"‖∂L/∂h_t‖ of {name} grows by {_fmt(fit.factor)} for every step back from the"
                " last one: the recurrent Jacobian's largest singular value is above 1, so the"
                " gradient grows geometrically through time and the run overflows or takes wild"
                " steps (Pascanu, Mikolov & Bengio 2013). Remedies: gradient clipping by norm,"
                " an orthogonal init of the recurrent weights (or scaled to a spectral radius"
                " below 1), a gated cell (LSTM, GRU).")
            suggest = self._fixes("exploding_time")
        evidence = {
            "through_time": True,
            "layer": name,
            "per_step_factor": float(fit.factor),
            "first_last_ratio": float(ratio),
            "span": float(fit.span),
            "steps_to_floor": float(fit.steps_to_floor),
            "zero_steps": float(fit.zero_steps),
            "per_step_factors": {k: float(f.factor) for k, f in self.time_fits.items()},
        }
        if kind == "vanishing" and self.time_burst is not None:
            evidence["exploded_step"] = self.time_burst[0]
            evidence["exploded_ratio"] = self.time_burst[1]
        return Verdict(kind, "critical" if critical else "warning", summary, explanation,
                       evidence, _suggest(self.preset, suggest))

    def _nonfinite_verdict(self, record: StepRecord) -> Verdict:
        nf = self.first_nonfinite
        where = "the loss" if nf["layer"] == "loss" else f"layer {nf['layer']}"
        unseen = nf["not_before"] < nf["step"]
        if not unseen:
            gap = ""
        elif nf["not_before"] == nf["step"] - 1:
            gap = f" (step {nf['not_before']} was not sampled)"
        else:
            gap = f" (steps {nf['not_before']}–{nf['step'] - 1} were not sampled)"
        if "window_step" in nf:
            gap += f" (the loss or global ‖g‖ was already not finite at step {nf['window_step']})"
        summary = (f"NaN/inf first at step {nf['step']} in {where} ({nf['direction']} pass)"
                   f"{gap}; {self.nonfinite_records} non-finite record"
                   f"{'s' if self.nonfinite_records != 1 else ''} so far")
        explanation = (f"At step {nf['step']} a value in the {nf['direction']} pass of {where}"
                       " was not finite"
                       + (f" (it may have turned so on any step from {nf['not_before']}: the"
                          " steps in between were not measured)" if unseen else "")
                       + ". Once a NaN reaches the weights every later step is NaN:"
                       " the run cannot recover and must be restarted. The usual cause is"
                       " exploding gradients (weights initialised too large, a learning rate too"
                       " large); gradient clipping by norm, a smaller init or a smaller learning"
                       " rate prevent it.")
        evidence = {"step": nf["step"], "layer": nf["layer"], "direction": nf["direction"],
                    "phase": nf["phase"], "not_before": nf["not_before"],
                    "records": self.nonfinite_records,
                    "last_finite_ratio": float(self.last_finite_ratio)}
        if "window_step" in nf:
            evidence["window_step"] = nf["window_step"]
        return Verdict("nonfinite", "critical", summary, explanation, evidence,
                       _suggest(self.preset, self._fixes("nonfinite")))

    # -- per-layer unit statistics ------------------------------------------------------------
    def _local_verdicts(self) -> list[Verdict]:
        out = []
        if self.count < MIN_RECORDS:
            return out
        self._dead_med = dead = self._full(self.dead.median(), self.relu_layers)
        self._worst_layer(out, dead, self.dead_latch, self.dead_crit, self._dead_verdict)
        self._sat_med = sat = self._full(self.saturated.median(), self.saturating_layers)
        self._worst_layer(out, sat, self.sat, self.sat_crit, self._saturation_verdict)
        return out

    @staticmethod
    def _worst_layer(out: list, values: np.ndarray, latch, critical, make_verdict) -> None:
        """Judge the worst layer's fraction through its latches; append the verdict when on."""
        worst = _argmax(values)
        if worst < 0:
            return
        value = float(values[worst])
        on = latch.update(value)
        crit = critical.update(value)
        if on:
            out.append(make_verdict(values, worst, value, crit))

    def _full(self, values: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Per-layer values of some layers, spread over all layers (nan for the others)."""
        out = np.full(self.n, np.nan)
        if len(index) and len(values) == len(index):
            out[index] = values
        return out

    def _fraction_evidence(self, fractions, worst, value, key: str) -> dict:
        """Evidence of a per-layer fraction verdict (dead, saturated): worst layer, mean, all."""
        finite = fractions[~np.isnan(fractions)]
        return {
            "worst_layer": self.names[worst],
            "worst_fraction": value,
            "mean_fraction": float(finite.mean()) if finite.size else float("nan"),
            key: fractions.tolist(),
        }

    def _dead_verdict(self, dead, worst, value, critical) -> Verdict:
        lr = self.preset.get("lr", float("nan"))
        bias = self.preset.get("bias_init", 0.0)
        causes = [f"{value:.0%} of the units of {self.names[worst]} output 0 on every example of"
                  " the batch: they pass no gradient, so their weights never change and they"
                  " are unlikely to come back."]
        if bias < 0:
            causes.append(f"The bias is initialised to {bias:g}: pre-activations start"
                          " negative, so most units start (and stay) off.")
        if lr == lr and lr >= 0.05:
            causes.append(f"The learning rate ({lr:g}) is large: one big update can push a"
                          " unit's pre-activation negative for every input, killing it.")
        if not causes[1:]:
            causes.append("Typical causes: a learning rate too large, a negative bias, or a"
                          " signal that collapses with depth (then every unit is either always on"
                          " or always off for the whole batch).")
        if critical:
            causes.append("A layer that is (almost) entirely dead blocks the gradient to every"
                          " layer below it.")
        causes.append("Leaky ReLU and ELU keep a gradient for negative inputs, so units can"
                      " recover.")
        evidence = self._fraction_evidence(dead, worst, value, "dead_fraction")
        return Verdict("dead", "critical" if critical else "warning",
                       f"{value:.0%} of {self.names[worst]}'s units dead"
                       f" (mean {evidence['mean_fraction']:.0%} over rectifying layers)",
                       " ".join(causes), evidence,
                       _suggest(self.preset, self._fixes("dead")))

    def _saturation_verdict(self, sat, worst, value, critical) -> Verdict:
        act = self.activation or "the activation"
        explanation = (f"{value:.0%} of the units of {self.names[worst]} sit on a flat tail of"
                       f" {act}, where its derivative is near 0: the gradient through them is cut,"
                       " and they learn slowly or not at all. Large pre-activations cause it:"
                       " weights initialised too large, or a learning rate that drives them up"
                       " (Glorot & Bengio 2010 saw the top sigmoid layer saturate at 0 early in"
                       " training). Batch norm keeps pre-activations near 0; ReLU has no upper"
                       " tail.")
        evidence = self._fraction_evidence(sat, worst, value, "saturated_fraction")
        return Verdict("saturation", "critical" if critical else "warning",
                       f"{value:.0%} of {self.names[worst]}'s units saturated",
                       explanation, evidence,
                       _suggest(self.preset, self._fixes("saturation")))

    # -- plateau ------------------------------------------------------------------------------
    def _plateau_verdict(self, others: list[Verdict]) -> Verdict | None:
        if len(self.losses) < PLATEAU_WINDOW:
            return None
        losses = list(self.losses)
        half = len(losses) // 2
        older, newer = _median(losses[:half]), _median(losses[half:])
        if not (math.isfinite(older) and math.isfinite(newer)) or older <= 0:
            return None
        improvement = (older - newer) / abs(older)
        stalled = self.plateau.update(improvement)
        converged = (self.first_loss == self.first_loss
                     and newer < PLATEAU_CONVERGED_FRACTION * self.first_loss)
        if not stalled or converged:
            return None
        kinds = [v.kind for v in _ordered(others)]
        if "vanishing" in kinds:
            cause = ("The gradient does not reach the early layers (see the vanishing verdict):"
                     " the network cannot use most of its depth, and the loss stays where it is.")
        elif "dead" in kinds or "saturation" in kinds:
            cause = "Dead or saturated units pass little gradient: the loss cannot move."
        elif kinds:
            cause = "See the verdicts above: the loss stalls because of them."
        if kinds:
            suggest = _ordered(others)[0].suggestions
        else:
            cause = ("The gradients themselves look healthy: a learning rate too small or too"
                     " large (oscillating), or the limit of what this network can fit (the noise in the"
                     " data included).")
            suggest = self._fixes("plateau_autoencoder" if self.task == "autoencoder" else "plateau")
        direction = "below" if improvement > 0 else "above"
        explanation = (f"The median loss of the last {len(losses) - half} records ({_fmt(newer)}) is"
                       f" only {abs(improvement):.1%} {direction} that of the {half} before"
                       f" ({_fmt(older)}); the run started at {_fmt(self.first_loss)}. {cause}")
        evidence = {"loss_before": float(older), "loss_now": float(newer),
                    "improvement": float(improvement), "window": len(losses),
                    "first_loss": float(self.first_loss)}
        return Verdict("plateau", "warning",
                       f"loss not improving: {_fmt(older)} → {_fmt(newer)} over {len(losses)} records",
                       explanation, evidence, _suggest(self.preset, suggest))

    # -- healthy ------------------------------------------------------------------------------
    def _healthy_verdict(self) -> Verdict:
        ratio = _median(self.ratios)
        per_layer = self._per_layer_factor(ratio)
        dead, sat = self._dead_med, self._sat_med
        evidence = {
            "first_last_ratio": float(ratio),
            "per_layer_factor": float(per_layer),
            "max_dead_fraction": float(dead[_argmax(dead)]) if _argmax(dead) >= 0 else float("nan"),
            "max_saturated_fraction": float(sat[_argmax(sat)]) if _argmax(sat) >= 0 else float("nan"),
            "grad_norm_total": float(_median(self.gnorm)),
        }
        first, last = self._pair_names(self.ratio_layers)
        evidence.update({"first_layer": first, "last_layer": last})
        summary = (f"gradient reaches {first or 'the first layer'}: first/last ‖∂L/∂h‖"
                   f" {_fmt(ratio)} ({first} / {last}, ×{_fmt(per_layer)} per layer)")
        if self.time_fits:
            name = min(self.time_fits, key=lambda k: self.time_fits[k].ratio)
            factor = self.time_fits[name].factor
            summary += f"; through time ×{_fmt(factor)} per step ({name})"
            evidence["time_per_step_factor"] = float(factor)
        return Verdict("healthy", "info", summary,
                       "No vanishing or exploding gradient, no non-finite values, no large"
                       " fraction of dead or saturated units, and the loss is still moving"
                       " (or has converged). The first/last ratio near 1 means every layer"
                       " learns at a comparable rate.", evidence, [])

    def _pretrain_healthy(self, record: StepRecord) -> Verdict:
        layer = record.phase.split(":", 1)[1]
        return Verdict("healthy", "info",
                       f"pre-training {layer} as a shallow autoencoder: no problem in this layer",
                       "During greedy layer-wise pre-training (Hinton & Salakhutdinov 2006) only"
                       " one layer and its temporary decoder are trained, so the gradient-flow"
                       " checks (first/last ratio) wait for fine-tuning of the whole stack.",
                       {"phase": record.phase}, [])


def _ordered(verdicts: list[Verdict]) -> list[Verdict]:
    return sorted(verdicts, key=lambda v: (SEVERITY_ORDER.get(v.severity, 3),
                                          KIND_ORDER.get(v.kind, 9)))

