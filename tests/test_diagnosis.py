"""The diagnosis: truth tests on the built-in presets (the product's promise) and unit tests of the
rules on hand-made records (hysteresis, latching, ordering, serialisation).

Truth tests train for a handful of steps on synthetic data with the presets' fixed seeds: the
first/last ‖∂L/∂h‖ ratio is a property of the architecture and init, visible from the first step.
"""

from __future__ import annotations

import io
import json
import math
from functools import lru_cache

import numpy as np
import pytest

from vgtui.config import builtin_names, load_preset
from vgtui.diagnosis import (
    DEAD_ENTER,
    EXPLODE_ENTER,
    MIN_RECORDS,
    PLATEAU_WINDOW,
    SUGGESTIONS,
    VANISH_ENTER,
    VANISH_EXIT,
    WINDOW,
    Diagnoser,
)
from vgtui.records import LAYER_METRICS, RunHeader, StepRecord, Verdict
from vgtui.trainer import run_to_completion


# -- helpers ---------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _train(name: str, steps: int, **changes) -> tuple[RunHeader, tuple[StepRecord, ...]]:
    preset = load_preset(name)
    if changes:
        preset = preset.replace(**changes)
    records = run_to_completion(preset, steps)
    header = next(r for r in records if isinstance(r, RunHeader))
    steps_ = tuple(r for r in records if isinstance(r, StepRecord))
    assert len(steps_) == steps
    return header, steps_


def _kinds(record: StepRecord) -> list[str]:
    return [v.kind for v in record.verdicts]


def _verdict(record: StepRecord, kind: str) -> Verdict:
    found = [v for v in record.verdicts if v.kind == kind]
    assert found, f"no {kind} verdict at step {record.step}: {_kinds(record)}"
    return found[0]


def _ratio(record: StepRecord) -> float:
    g = record.layers["act_grad_norm"]
    return float(g[0] / g[-1])


# -- truth tests: vanishing ------------------------------------------------------------------------
TRUTH_STEPS = 5


def test_sigmoid_deep_is_vanishing():
    _, records = _train("sigmoid-deep", TRUTH_STEPS)
    last = records[-1]
    v = _verdict(last, "vanishing")
    assert v.severity == "critical"
    ratio = v.evidence["first_last_ratio"]
    assert ratio < 1e-3  # "well below 1e-2": measured ~2e-4
    assert v.evidence["per_layer_factor"] == pytest.approx(ratio ** (1 / 5), rel=1e-6)
    assert len(v.evidence["layer_ratios"]) == 5
    # the early-layer updates are tiny relative to the weights
    assert v.evidence["first_update_ratio"] < 1e-5
    assert v.evidence["updates_frozen"] is True
    assert {"relu-he", "sigmoid-batchnorm", "sigmoid-residual"} <= set(v.suggestions)
    assert last.verdicts[0].severity == "critical"


@pytest.mark.parametrize("name", ["relu-he", "sigmoid-batchnorm", "sigmoid-residual"])
def test_remedies_are_not_vanishing(name):
    _, records = _train(name, TRUTH_STEPS)
    for record in records:
        assert "vanishing" not in _kinds(record), (record.step, record.verdicts)
        assert 1 / 3 < _ratio(record) < 3, (record.step, _ratio(record))
    assert _kinds(records[-1]) == ["healthy"]
    healthy = records[-1].verdicts[0]
    assert healthy.severity == "info"
    assert 1 / 3 < healthy.evidence["first_last_ratio"] < 3


def test_relu_30_xavier_vanishes_and_he_does_not():
    _, xavier = _train("relu-30-xavier", TRUTH_STEPS)
    v = _verdict(xavier[-1], "vanishing")
    assert v.evidence["first_last_ratio"] < 1e-3  # measured ~3e-5 (He et al. 2015, fig. 3)
    assert v.suggestions == ["relu-30-he"]
    _, he = _train("relu-30-he", TRUTH_STEPS)
    for record in he:
        assert "vanishing" not in _kinds(record)
        assert "exploding" not in _kinds(record)
        assert 1 / 3 < _ratio(record) < 3


# -- truth tests: exploding ------------------------------------------------------------------------
EXPLODE_STEPS = 8


def test_exploding_names_the_nonfinite_layer_and_first_step():
    _, records = _train("exploding", EXPLODE_STEPS)
    first_bad = next(r for r in records if r.nonfinite is not None)
    # measured: at step 4 the gradients reach ~1e31 (finite; their float32 norms overflow), the
    # update then overflows hidden2's forward pass at step 5.
    assert first_bad.step == 5
    assert first_bad.nonfinite == ("hidden2", "forward")
    for record in records[records.index(first_bad):]:
        nf = _verdict(record, "nonfinite")
        assert nf.severity == "critical"
        # the FIRST appearance, remembered, even though later records name other layers
        layer, direction = first_bad.nonfinite
        assert nf.evidence["step"] == first_bad.step
        assert (nf.evidence["layer"], nf.evidence["direction"]) == (layer, direction)
        assert layer.startswith("hidden") or layer == "output"
        assert direction in ("forward", "backward")
        assert f"step {first_bad.step}" in nf.summary and layer in nf.summary
        assert direction in nf.summary
        ex = _verdict(record, "exploding")
        assert ex.severity == "critical"
        assert ex.evidence["nonfinite_step"] == first_bad.step
        assert ex.evidence["nonfinite_layer"] == layer
        assert "exploding-clipped" in ex.suggestions
        assert record.verdicts[0].kind == "nonfinite"
    # before the overflow the growth across layers was already reported
    before = records[records.index(first_bad) - 1]
    ex = _verdict(before, "exploding")
    assert ex.evidence["first_last_ratio"] > EXPLODE_ENTER
    assert ex.evidence["across_layers"] is True
    assert "nonfinite" not in _kinds(before)


def test_exploding_clipped_stays_finite_with_clipping_reported():
    _, records = _train("exploding-clipped", EXPLODE_STEPS)
    for record in records:
        assert record.nonfinite is None
        assert math.isfinite(record.loss)
        assert "nonfinite" not in _kinds(record)
        assert record.clipped
    ex = _verdict(records[-1], "exploding")
    assert ex.evidence["clipped_fraction"] >= 0.5
    assert "clipping acts on" in ex.summary
    assert ex.severity == "warning"
    assert "exploding-clipped" not in ex.suggestions  # never suggest what is running


# -- truth tests: dead units -----------------------------------------------------------------------
DEAD_STEPS = 50


def test_relu_dead_reports_dead_units():
    _, records = _train("relu-dead", DEAD_STEPS)
    last = records[-1]
    v = _verdict(last, "dead")
    assert v.evidence["worst_fraction"] >= DEAD_ENTER
    assert v.suggestions[0] == "relu-he"  # the same network at a tenth of the learning rate
    assert "learning rate (0.1) is large" in v.explanation
    # the units die during training: none of that at the start
    assert "dead" not in _kinds(records[MIN_RECORDS])
    # the healthy counterpart (same net, lr 0.01) reports no dead units
    _, healthy = _train("relu-he", TRUTH_STEPS)
    assert "dead" not in _kinds(healthy[-1])


# -- truth test: saturation (no built-in preset saturates on these data; a too-large init does) ---
def test_sigmoid_with_a_large_init_saturates():
    _, records = _train("sigmoid-deep", TRUTH_STEPS, init="normal", init_std=0.5)
    v = _verdict(records[-1], "saturation")
    assert v.evidence["worst_fraction"] >= 0.5  # measured 0.72 at step 0
    assert v.suggestions[0] == "sigmoid-batchnorm"
    _, default = _train("sigmoid-deep", TRUTH_STEPS)
    assert "saturation" not in _kinds(default[-1])
    assert np.nanmax(default[0].layers["saturated"]) < 0.05


# -- the verdict travels with the record -------------------------------------------------------------
def test_headless_run_prints_and_records_verdicts(tmp_path):
    from vgtui.headless import run_headless
    from vgtui.jsonl import read_recording

    out = io.StringIO()
    path = tmp_path / "run.jsonl"
    code = run_headless(load_preset("sigmoid-deep"), TRUTH_STEPS, record=path, out=out)
    assert code == 0
    assert "[critical] vanishing:" in out.getvalue()
    assert "try: relu-he" in out.getvalue()
    steps = [r for r in read_recording(path).records if isinstance(r, StepRecord)]
    assert steps[0].verdicts == []  # not enough records yet: the UI shows a placeholder
    assert steps[-1].verdicts and steps[-1].verdicts[0].kind == "vanishing"
    assert steps[-1].verdicts[0].evidence["first_last_ratio"] < 1e-3


def test_suggestions_are_builtin_presets():
    names = set(builtin_names())
    for key, suggestions in SUGGESTIONS.items():
        assert suggestions, key
        missing = set(suggestions) - names
        assert not missing, (key, missing)


# -- unit tests on hand-made records -----------------------------------------------------------------
def _header(n: int = 6, activation: str = "sigmoid", **preset) -> RunHeader:
    kinds = [activation] * (n - 1) + ["linear"]
    return RunHeader(preset={"name": "custom", "activation": activation, "task": "classifier",
                             "clip": "none", "init": "default", "lr": 0.01, **preset},
                     layers=[f"hidden{i + 1}" for i in range(n - 1)] + ["output"],
                     layer_kinds=kinds, device="cpu")


def _record(step: int, n: int = 6, ratio: float = 1.0, loss: float = 2.0, dead=np.nan,
            saturated=0.0, gnorm: float = 1.0, clipped: bool = False, nonfinite=None,
            phase: str = "train") -> StepRecord:
    layers = {name: np.zeros(n) for name in LAYER_METRICS}
    # a geometric profile from output (1.0) to the first layer (ratio)
    layers["act_grad_norm"] = ratio ** (np.arange(n - 1, -1, -1) / (n - 1))
    layers["weight_grad_norm"] = np.ones(n)
    layers["update_ratio"] = np.full(n, 1e-3)
    layers["dead"] = np.full(n, dead, dtype=float)
    layers["dead"][-1] = np.nan
    layers["saturated"] = np.full(n, saturated, dtype=float)
    layers["saturated"][-1] = np.nan
    layers["weight_norm"] = np.ones(n)
    return StepRecord(step=step, loss=loss, accuracy=float("nan"), grad_norm_total=gnorm,
                      grad_norm_clipped=gnorm, clipped=clipped, layers=layers, hist=np.zeros((n, 1)),
                      nonfinite=nonfinite, phase=phase)


def _feed(diagnoser: Diagnoser, records) -> list[list[Verdict]]:
    return [diagnoser.update(r) for r in records]


def test_nothing_before_enough_records_then_single_healthy():
    d = Diagnoser(_header())
    out = _feed(d, [_record(i) for i in range(MIN_RECORDS + 2)])
    assert all(v == [] for v in out[: MIN_RECORDS - 1])
    for verdicts in out[MIN_RECORDS - 1:]:
        assert [v.kind for v in verdicts] == ["healthy"]
        assert verdicts[0].severity == "info"


def test_vanishing_hysteresis_does_not_flicker():
    d = Diagnoser(_header())
    # settle well inside the verdict, then hover just either side of the enter line
    ratios = [1e-2] * WINDOW + [VANISH_ENTER * 0.9, VANISH_ENTER * 1.2] * 10
    out = _feed(d, [_record(i, ratio=r) for i, r in enumerate(ratios)])
    states = ["vanishing" in [v.kind for v in vs] for vs in out[MIN_RECORDS - 1:]]
    assert all(states), states
    # leave only once clearly past the exit line, for long enough to move the median
    out = _feed(d, [_record(100 + i, ratio=VANISH_EXIT * 2) for i in range(WINDOW)])
    assert [v.kind for v in out[-1]] == ["healthy"]
    # and a single odd record does not bring it back (median of the window)
    out = _feed(d, [_record(200, ratio=1e-4), _record(201, ratio=VANISH_EXIT * 2)])
    assert all([v.kind for v in vs] == ["healthy"] for vs in out)


def test_nonfinite_is_latched_with_first_step_layer_direction():
    d = Diagnoser(_header(activation="relu", init="normal"))
    recs = [_record(i, ratio=100.0, gnorm=10.0 ** i) for i in range(4)]
    recs.append(_record(4, ratio=float("nan"), loss=float("nan"), gnorm=float("inf"),
                        nonfinite=("hidden3", "backward")))
    recs += [_record(5 + i, ratio=float("nan"), loss=float("nan"), gnorm=float("nan"),
                     nonfinite=("hidden1", "forward")) for i in range(5)]
    out = _feed(d, recs)
    for verdicts in out[4:]:
        nf = verdicts[0]
        assert nf.kind == "nonfinite" and nf.severity == "critical"
        assert (nf.evidence["step"], nf.evidence["layer"], nf.evidence["direction"]) == (
            4, "hidden3", "backward")
        assert "exploding" in [v.kind for v in verdicts]
        json.dumps([v.to_json() for v in verdicts])  # plain, serialisable evidence


def test_nonfinite_on_the_very_first_record():
    d = Diagnoser(_header())
    out = d.update(_record(0, ratio=float("nan"), loss=float("nan"), nonfinite=("loss", "forward")))
    assert [v.kind for v in out] == ["nonfinite"]
    assert out[0].evidence["layer"] == "loss"


def test_exploding_over_steps_and_clipping():
    d = Diagnoser(_header(activation="relu", clip="norm", clip_threshold=1.0))
    out = _feed(d, [_record(i, gnorm=3.0, clipped=True) for i in range(10)])
    v = [x for x in out[-1] if x.kind == "exploding"]
    assert v and v[0].evidence["clipped_fraction"] == 1.0 and v[0].severity == "warning"
    d = Diagnoser(_header(activation="relu"))
    out = _feed(d, [_record(i, gnorm=1.0 * 3.0 ** i) for i in range(12)])
    v = [x for x in out[-1] if x.kind == "exploding"]
    assert v and v[0].evidence["over_steps"] is True and v[0].evidence["grad_norm_growth"] > 100


def test_dead_and_saturation_from_unit_fractions():
    d = Diagnoser(_header(activation="relu"))
    out = _feed(d, [_record(i, dead=0.97) for i in range(WINDOW)])
    dead = [v for v in out[-1] if v.kind == "dead"]
    assert dead and dead[0].severity == "critical"
    d = Diagnoser(_header(activation="relu"))
    out = _feed(d, [_record(i, dead=0.2) for i in range(WINDOW)])
    assert [v.kind for v in out[-1]] == ["healthy"]
    d = Diagnoser(_header(activation="sigmoid"))
    out = _feed(d, [_record(i, saturated=0.7) for i in range(WINDOW)])
    sat = [v for v in out[-1] if v.kind == "saturation"]
    assert sat and sat[0].severity == "warning" and sat[0].evidence["worst_fraction"] == pytest.approx(0.7)


def test_plateau_only_when_not_converged():
    d = Diagnoser(_header())
    out = _feed(d, [_record(i, loss=2.3) for i in range(PLATEAU_WINDOW)])
    assert [v.kind for v in out[-1]] == ["plateau"]
    d = Diagnoser(_header())
    losses = list(np.linspace(2.3, 0.01, 30)) + [0.01] * PLATEAU_WINDOW
    out = _feed(d, [_record(i, loss=x) for i, x in enumerate(losses)])
    assert [v.kind for v in out[-1]] == ["healthy"]  # converged, not stalled
    d = Diagnoser(_header())
    losses = list(np.linspace(2.3, 1.0, PLATEAU_WINDOW))
    out = _feed(d, [_record(i, loss=x) for i, x in enumerate(losses)])
    assert [v.kind for v in out[-1]] == ["healthy"]  # still improving


def test_ordered_by_severity_then_kind():
    d = Diagnoser(_header(activation="relu"))
    out = _feed(d, [_record(i, ratio=1e-4, dead=0.6, loss=2.3) for i in range(PLATEAU_WINDOW)])
    kinds = [(v.severity, v.kind) for v in out[-1]]
    assert kinds == [("critical", "vanishing"), ("warning", "dead"), ("warning", "plateau")]
    # plateau explained by the vanishing gradient, with the same remedies
    assert out[-1][2].suggestions == out[-1][0].suggestions


def test_phase_change_restarts_the_windows():
    d = Diagnoser(_header())
    out = _feed(d, [_record(i, ratio=float("nan"), phase="pretrain:hidden1") for i in range(4)])
    assert out[-1][0].kind == "healthy" and "pre-training" in out[-1][0].summary
    out = _feed(d, [_record(4 + i, ratio=1e-4) for i in range(MIN_RECORDS)])
    assert out[0] == [] and out[-1][0].kind == "vanishing"


def test_a_users_model_without_a_preset():
    """vgtui.watch headers carry layer kinds but no activation or init: explanations stay generic."""
    header = RunHeader(preset={"name": "my-net", "task": "custom", "clip": "none"},
                       layers=["conv1", "conv2", "fc1", "fc2"],
                       layer_kinds=["relu", "relu", "relu", "linear"], device="cpu")
    d = Diagnoser(header)
    out = _feed(d, [_record(i, n=4, ratio=1e-4, dead=0.6) for i in range(WINDOW)])
    kinds = [v.kind for v in out[-1]]
    assert kinds == ["vanishing", "dead"]
    vanishing = out[-1][0]
    assert "relu does not saturate" in vanishing.explanation
    assert "None" not in vanishing.explanation and "default init" not in vanishing.explanation
    assert out[-1][1].evidence["worst_layer"] in header.layers


def test_verdicts_survive_a_json_round_trip():
    d = Diagnoser(_header(activation="relu", clip="norm"))
    recs = [_record(i, ratio=1e-4, dead=0.97, loss=2.3, clipped=True) for i in range(PLATEAU_WINDOW)]
    recs.append(_record(PLATEAU_WINDOW, ratio=float("nan"), loss=float("nan"),
                        nonfinite=("hidden2", "backward")))
    verdicts = _feed(d, recs)[-1]
    assert {v.kind for v in verdicts} == {"nonfinite", "exploding", "vanishing", "dead", "plateau"}
    for v in verdicts:
        text = json.dumps(v.to_json(), allow_nan=False)
        back = Verdict.from_json(json.loads(text))
        assert (back.kind, back.severity, back.summary, back.suggestions) == (
            v.kind, v.severity, v.summary, v.suggestions)


def test_nonfinite_between_sampled_steps_says_so():
    d = Diagnoser(_header())
    recs = [_record(step) for step in (0, 5, 10)]
    recs.append(_record(15, ratio=float("nan"), loss=float("nan"), nonfinite=("hidden1", "forward")))
    nf = _feed(d, recs)[-1][0]
    assert nf.kind == "nonfinite"
    assert (nf.evidence["step"], nf.evidence["not_before"]) == (15, 11)
    assert "steps 11–14 were not sampled" in nf.summary
