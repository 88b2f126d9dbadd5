"""Diagnosis: turns the stream of StepRecords into a short list of verdicts.

Pure Python + numpy, no UI imports, cheap enough to run in the training thread on every sampled
step (a few dozen microseconds on a 30-layer record; see docs/DIAGNOSIS.md for the measurement).

What is measured, and why it is the right quantity
--------------------------------------------------
The quantity the literature uses for gradient flow is the back-propagated gradient of each layer's
output, ‖∂L/∂h‖ (Glorot & Bengio 2010, figs. 5 and 7; He et al. 2015, sec. 2.2). Weight gradients
‖∂L/∂W‖ can look flat across layers while ‖∂L/∂h‖ decays, so the rules below use ‖∂L/∂h‖. The
headline figure is the first/last ratio ``act_grad_norm[0] / act_grad_norm[-1]``: the first
hidden layer against the output (logits) layer. Its (n-1)-th root is the per-layer factor, the
geometric mean of the ratio between consecutive layers: the number that back-propagation
multiplies the gradient by, on average, at each layer. A factor below 1 compounds with depth into
vanishing, above 1 into exploding.

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

import math
from collections import deque
import numpy as np

from .records import SEVERITY_ORDER, RunHeader, StepRecord, Verdict

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
}
#: Depth (layers measured, output included) from which the 30-layer presets are the better example.
DEEP_LAYERS = 12

KIND_ORDER = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "dead": 3, "saturation": 4,
              "plateau": 5, "healthy": 6}


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

    # -- state ---------------------------------------------------------------------------------
    def _reset_phase(self) -> None:
        self.count = 0
        self.ratios: deque[float] = deque(maxlen=WINDOW)
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

    # -- the one entry point ---------------------------------------------------------------------
    def update(self, record: StepRecord) -> list[Verdict]:
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
        self.last_step = int(record.step)
        if self.first_nonfinite is not None:
            verdicts.append(self._nonfinite_verdict(record))

        if record.nonfinite is None:
            # A non-finite record's other columns are garbage (nan compares as "not active"):
            # the windows keep the last finite measurements instead.
            self._observe(record)
        if self.count < MIN_RECORDS and not verdicts:
            return []
        if record.phase.startswith("pretrain:"):
            verdicts += self._local_verdicts()
            if not verdicts:
                verdicts.append(self._pretrain_healthy(record))
            return _ordered(verdicts)

        if self.count >= MIN_RECORDS:
            verdicts += self._flow_verdicts(record)
            verdicts += self._local_verdicts()
            plateau = self._plateau_verdict(verdicts)
            if plateau is not None:
                verdicts.append(plateau)
        if not verdicts:
            verdicts.append(self._healthy_verdict())
        return _ordered(verdicts)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _observe(self, record: StepRecord) -> None:
        self.count += 1
        cols = record.layers
        g = np.asarray(cols["act_grad_norm"], dtype=np.float64)
        ratio = _ratio(float(g[0]), float(g[-1])) if len(g) > 1 else float("nan")
        self.ratios.append(ratio)
        if ratio == ratio:
            self.last_finite_ratio = ratio
        self.act_grads.push(g)
        if getattr(record, "detail", True):  # not measured on the other steps: nan, not zero
            upd = cols["update_ratio"]
            if len(upd) and upd[0] == upd[0] and upd[-1] == upd[-1]:
                self.upd_first.append(float(upd[0]))
                self.upd_last.append(float(upd[-1]))
            if len(self.relu_layers):
                dead = np.asarray(cols["dead"])[self.relu_layers]
                if not np.isnan(dead).all():
                    self.dead.push(dead)
            if len(self.saturating_layers):
                sat = np.asarray(cols["saturated"])[self.saturating_layers]
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
        g = steps = None
        if vanishing or frozen:
            g = self.act_grads.median()
            steps = self._consecutive(g)
            out.append(self._vanishing_verdict(ratio, per_layer, steps, g, upd_first, upd_last,
                                               upd_spread, critical, frozen))
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

    def _per_layer_factor(self, ratio: float) -> float:
        if ratio != ratio or self.n < 2:
            return float("nan")
        if ratio <= 0:
            return 0.0
        return float(ratio ** (1.0 / (self.n - 1)))

    def _consecutive(self, g: np.ndarray) -> list[float]:
        """g[i] / g[i+1]: what back-propagation through layer i+1 multiplied the gradient by."""
        with np.errstate(all="ignore"):
            r = g[:-1] / g[1:]
        return np.where(np.isfinite(r), r, np.nan).tolist()

    def _vanishing_verdict(self, ratio, per_layer, steps, g, upd_first, upd_last, upd_spread,
                           critical, frozen) -> Verdict:
        act = self.activation
        saturating = act in ("sigmoid", "tanh")
        init = self.preset.get("init")  # None: a user's model, init unknown
        depth = self.n - 1
        dead_all = ratio == 0.0
        if dead_all:
            summary = "no gradient reaches the first layer (first/last ‖∂L/∂h‖ = 0)"
        elif ratio == ratio and ratio < VANISH_ENTER:
            summary = (f"‖∂L/∂h‖ falls {_fmt(1 / ratio)}× from output to first layer "
                       f"(first/last {_fmt(ratio)}, ×{_fmt(per_layer)} per layer)")
        else:
            summary = (f"first-layer updates frozen: ‖ΔW‖/‖W‖ {_fmt(upd_first)} vs "
                       f"{_fmt(upd_last)} at the output")
        worst = _argmax(-np.asarray(steps, dtype=np.float64)) if steps else -1
        causes = [f"Back-propagation multiplies the gradient by one factor per layer; here it is "
                  f"×{_fmt(per_layer)} on average over {depth} layers, so the first layer gets "
                  f"{_fmt(ratio)} of the gradient the output layer gets."]
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
        if dead_all:
            causes.append("A layer whose units are all inactive passes exactly zero gradient back.")
        causes.append("Early layers then barely change: their updates are tiny relative to their"
                      " weights, and the loss plateaus while the top layers do all the learning.")
        if self.task == "autoencoder":
            suggest = SUGGESTIONS["vanishing_autoencoder"]
        elif saturating:
            suggest = SUGGESTIONS["vanishing_saturating"]
        elif self.n > DEEP_LAYERS:
            suggest = SUGGESTIONS["vanishing_deep"]
        else:
            suggest = SUGGESTIONS["vanishing_relu"]
        evidence = {
            "first_last_ratio": float(ratio),
            "per_layer_factor": float(per_layer),
            "layer_ratios": steps,
            "act_grad_norm": g.tolist(),
            "weakest_layer": self.names[worst + 1] if worst >= 0 else "",
            "first_update_ratio": float(upd_first),
            "last_update_ratio": float(upd_last),
            "update_spread": float(upd_spread),
            "updates_frozen": bool(frozen),
        }
        return Verdict("vanishing", "critical" if critical or dead_all else "warning", summary,
                       " ".join(causes), evidence, _suggest(self.preset, suggest))

    def _exploding_verdict(self, ratio, per_layer, steps, growth, clip_fraction, layers, growing,
                           clipping, critical) -> Verdict:
        parts, causes = [], []
        nf = self.first_nonfinite
        if layers:
            shown = ratio if ratio == ratio else self.last_finite_ratio
            parts.append(f"‖∂L/∂h‖ grows {_fmt(shown)}× from output to first layer "
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
        suggest = SUGGESTIONS["exploding"] if self.n <= DEEP_LAYERS else SUGGESTIONS["exploding_deep"]
        return Verdict("exploding", severity, "; ".join(parts), " ".join(causes), evidence,
                       _suggest(self.preset, suggest))

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
        return Verdict("nonfinite", "critical", summary, explanation, evidence,
                       _suggest(self.preset, SUGGESTIONS["nonfinite"]))

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
                       _suggest(self.preset, SUGGESTIONS["dead"]))

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
                       _suggest(self.preset, SUGGESTIONS["saturation"]))

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
            suggest = SUGGESTIONS["plateau_autoencoder" if self.task == "autoencoder" else "plateau"]
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
        return Verdict("healthy", "info",
                       f"gradient reaches the first layer: first/last ‖∂L/∂h‖ {_fmt(ratio)}"
                       f" (×{_fmt(per_layer)} per layer)",
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

