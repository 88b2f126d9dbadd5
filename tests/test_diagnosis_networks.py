"""Suggestions that fit the model: recurrent runs are pointed to recurrent presets, convolutional
runs to the residual conv net, MLPs to the MLP presets (end to end on the built-in presets, and
on hand-made records for the verdicts a short run does not reach)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from vgtui.config import builtin_names, load_preset
from vgtui.diagnosis import NETWORK_SUGGESTIONS, SUGGESTIONS, Diagnoser
from vgtui.headless import run_headless
from vgtui.records import LAYER_METRICS, RunHeader, StepRecord
from vgtui.trainer import run_to_completion

RECURRENT = {"lstm", "gru", "rnn-orthogonal", "rnn-clipped", "rnn-exploding", "rnn-tanh"}
CONVOLUTIONAL = {"cnn-plain", "cnn-residual", "cnn-sigmoid"}


def test_network_suggestions_are_builtin_presets_of_that_network():
    names = set(builtin_names())
    for network, table in NETWORK_SUGGESTIONS.items():
        family = RECURRENT if network == "rnn" else CONVOLUTIONAL
        for key, suggestions in table.items():
            assert key in SUGGESTIONS, key
            assert suggestions and set(suggestions) <= names & family, (network, key, suggestions)


def _header(network: str, name: str, kind: str, n: int = 4) -> RunHeader:
    return RunHeader(preset={"name": name, "network": network, "activation": kind, "task": "classifier",
                             "clip": "none", "init": "default", "lr": 0.01},
                     layers=[f"layer{i + 1}" for i in range(n - 1)] + ["output"],
                     layer_kinds=[kind] * (n - 1) + ["linear"], device="cpu")


def _record(step: int, n: int = 4, ratio: float = 1.0, gnorm: float = 1.0, nonfinite=None,
            dead: float = np.nan, saturated: float = np.nan) -> StepRecord:
    layers = {name: np.ones(n) for name in LAYER_METRICS}
    layers["act_grad_norm"] = ratio ** (np.arange(n - 1, -1, -1) / (n - 1))
    layers["dead"] = np.full(n, dead)
    layers["saturated"] = np.full(n, saturated)
    layers["update_ratio"] = np.full(n, 1e-3)
    return StepRecord(step=step, loss=2.0, accuracy=float("nan"), grad_norm_total=gnorm,
                      grad_norm_clipped=gnorm, clipped=False, layers=layers, hist=np.zeros((n, 1)), nonfinite=nonfinite,
                      detail=True)


def _last_verdicts(header: RunHeader, records) -> dict:
    diagnoser = Diagnoser(header)
    for record in records:
        verdicts = diagnoser.update(record)
    return {v.kind: v for v in verdicts}


@pytest.mark.parametrize("network,name,kind,expected", [
    ("rnn", "rnn-tanh", "tanh", ["lstm", "gru", "rnn-orthogonal"]),
    ("cnn", "cnn-sigmoid", "sigmoid", ["cnn-residual", "cnn-plain"]),
    ("cnn", "cnn-plain", "relu", ["cnn-residual"]),
    ("mlp", "sigmoid-deep", "sigmoid", ["relu-he", "sigmoid-batchnorm", "sigmoid-residual"]),
])
def test_vanishing_across_layers_suggests_presets_of_the_same_network(network, name, kind, expected):
    verdicts = _last_verdicts(_header(network, name, kind), [_record(i, ratio=1e-6) for i in range(6)])
    assert verdicts["vanishing"].suggestions == expected


def test_a_recurrent_run_that_blows_up_is_pointed_to_clipping_and_gated_cells():
    records = [_record(i, ratio=100.0, gnorm=10.0 ** i) for i in range(4)]
    records.append(_record(4, ratio=float("nan"), gnorm=float("inf"), nonfinite=("layer1", "backward")))
    verdicts = _last_verdicts(_header("rnn", "rnn-exploding", "tanh"), records)
    assert verdicts["nonfinite"].suggestions == ["rnn-clipped", "lstm", "gru"]
    assert verdicts["exploding"].suggestions == ["rnn-clipped", "lstm", "gru"]


def test_dead_conv_units_point_to_the_residual_net_not_to_mlps():
    verdicts = _last_verdicts(_header("cnn", "cnn-plain", "relu"), [_record(i, dead=0.9) for i in range(8)])
    assert verdicts["dead"].suggestions == ["cnn-residual"]


def test_cnn_plain_end_to_end_is_vanishing_and_points_to_cnn_residual():
    records = [r for r in run_to_completion(load_preset("cnn-plain"), 6) if isinstance(r, StepRecord)]
    vanishing = next(v for v in records[-1].verdicts if v.kind == "vanishing")
    assert vanishing.evidence["first_last_ratio"] < 1e-6
    assert vanishing.suggestions == ["cnn-residual"]
    assert "He et al. 2016" in vanishing.explanation
    assert all(set(v.suggestions) <= CONVOLUTIONAL for v in records[-1].verdicts)


def test_rnn_tanh_run_output_shows_the_ratio_through_time_and_recurrent_fixes():
    out = io.StringIO()
    preset = load_preset("rnn-tanh").replace(eval_every=5)
    assert run_headless(preset, 12, device="cpu", print_every=5, out=out) == 0
    text = out.getvalue()
    step0 = next(line for line in text.splitlines() if line.startswith("step      0"))
    through_time = float(step0.split("in time")[1].split()[0])
    assert through_time < 1e-9  # the gradient reaching t = 0 (1.6e-13 at init, docs/DIAGNOSIS.md)
    assert "held-out" in step0
    assert "try: lstm, gru, rnn-orthogonal" in text
    assert "relu-he" not in text and "sigmoid-batchnorm" not in text


def _verdicts_after(name: str, steps: int):
    records = [r for r in run_to_completion(load_preset(name), steps) if isinstance(r, StepRecord)]
    return records[-1].verdicts


def test_rnn_exploding_is_traced_back_to_its_first_step_and_pointed_to_clipping():
    """Its first step explodes through time (5e6× at t = 0), the update saturates every unit, and
    from then on nothing passes back: the vanishing has that cause, and clipping fixes it."""
    verdicts = {v.kind: v for v in _verdicts_after("rnn-exploding", 25)}  # saturation: detail steps
    vanishing = verdicts["vanishing"]
    assert vanishing.evidence["through_time"] and vanishing.evidence["exploded_step"] == 0
    assert vanishing.evidence["exploded_ratio"] > 1e6
    assert "after it exploded through time at step 0" in vanishing.summary
    assert vanishing.suggestions[0] == "rnn-clipped"
    assert verdicts["saturation"].suggestions[0] == "rnn-clipped"


def test_rnn_clipped_reads_exploding_once_through_time_with_its_clipping():
    verdicts = _verdicts_after("rnn-clipped", 6)
    exploding = [v for v in verdicts if v.kind == "exploding"]
    assert len(exploding) == 1
    (verdict,) = exploding
    assert verdict.evidence["through_time"] and verdict.evidence["clipped_fraction"] == 1.0
    assert "clipping acts on 100% of steps" in verdict.summary
    assert verdict.severity == "warning"  # clipping keeps it finite
    assert verdict.evidence["across_layers_ratio"] > 1e3
    assert set(verdict.suggestions) <= RECURRENT


def _time_run(kind: str, ratio: float, records: int = 12):
    """Records whose only layer carries a through-time series growing ``ratio``x from last to first."""
    import numpy as np

    from vgtui.diagnosis import Diagnoser
    from vgtui.records import LAYER_METRICS, RunHeader, StepRecord

    header = RunHeader(preset={"name": "t"}, layers=["rnn", "head"], layer_kinds=[kind, "linear"], device="cpu")
    diagnoser = Diagnoser(header)
    series = np.geomspace(ratio, 1.0, 40)
    verdicts = []
    for step in range(records):
        layers = {m: np.array([1.0, 1.0]) for m in LAYER_METRICS}
        record = StepRecord(step, 1.0 - step * 0.01, 0.5, 1.0, 1.0, False, layers, None,
                            time_act_grad_norm={"rnn": series})
        verdicts = diagnoser.update(record)
    return [v for v in verdicts if v.evidence.get("through_time")]


def test_a_gated_cell_carrying_more_gradient_to_early_steps_is_not_exploding():
    """The lstm preset measures 30-300x first/last through time while it learns the recall task:
    a gated cell's long memory, not an explosion. A vanilla cell growing as much is exploding."""
    assert _time_run("lstm", 300.0) == []
    assert _time_run("gru", 300.0) == []
    assert [v.kind for v in _time_run("tanh", 300.0)] == ["exploding"]
    # a gated cell's real explosion is still caught
    assert [v.kind for v in _time_run("lstm", 1e7)] == ["exploding"]
