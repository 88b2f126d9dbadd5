"""The diagnosis on what real models and long runs hand it: layers without a measurement, no
‖∂L/∂h‖ at all, spikes between samples (step windows), and gradients through time in recurrent
layers. Records are built directly (the engine that fills these fields is tested elsewhere);
through-time norms come from real torch RNNs, computed here with torch.autograd.grad."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from vgtui.diagnosis import (
    EXPLODE_ENTER,
    HOLD,
    MIN_RECORDS,
    SPIKE_RTOL,
    SPIKE_WARMUP,
    TIME_FLOOR,
    VANISH_CRITICAL,
    VANISH_ENTER,
    WEIGHT_VANISH_ENTER,
    WINDOW,
    Diagnoser,
    fit_through_time,
    nonfinite_step,
    ratio_verdict,
)
from vgtui.records import LAYER_METRICS, RunHeader, StepRecord, StepWindow

NAMES = ["embed", "layers.0.linear1", "layers.0.linear2", "layers.0.self_attn.out_proj", "head"]


def _header(names=NAMES, kinds=None, **preset) -> RunHeader:
    kinds = kinds or ["relu"] * (len(names) - 1) + ["linear"]
    return RunHeader(preset={"name": "my-net", "task": "custom", "clip": "none", **preset},
                     layers=list(names), layer_kinds=kinds, device="cpu")


def _record(step, act, *, unmeasured=(), wgrad=None, loss=2.0, gnorm=1.0, window=None,
            time=None, nonfinite=None) -> StepRecord:
    n = len(act)
    layers = {m: np.full(n, 0.5) for m in LAYER_METRICS}
    layers["act_grad_norm"] = np.asarray(act, dtype=float).copy()
    layers["weight_grad_norm"] = np.ones(n) if wgrad is None else np.asarray(wgrad, dtype=float)
    layers["dead"] = np.full(n, 0.1)
    layers["saturated"] = np.full(n, np.nan)
    layers["update_ratio"] = np.full(n, 1e-3)
    marks = {}
    for metric, index in unmeasured:
        marks.setdefault(metric, np.zeros(n, dtype=bool))[index] = True
        layers[metric][index] = np.nan
    return StepRecord(step=step, loss=loss, accuracy=float("nan"), grad_norm_total=gnorm,
                      grad_norm_clipped=gnorm, clipped=False, layers=layers, hist=None,
                      nonfinite=nonfinite, unmeasured=marks, time_act_grad_norm=time or {},
                      window=window)


def _run(diagnoser, records):
    return [diagnoser.update(r) for r in records][-1]


def _kinds(verdicts):
    return [v.kind for v in verdicts]


# -- one threshold source ---------------------------------------------------------------------------
def test_ratio_verdict_restates_the_enter_lines():
    assert ratio_verdict(VANISH_ENTER * 0.99) == "vanishing"
    assert ratio_verdict(0.05) == "vanishing"  # the dashboard once called 1e-2..0.1 "healthy"
    assert ratio_verdict(VANISH_ENTER) == "healthy"
    assert ratio_verdict(1.0) == "healthy"
    assert ratio_verdict(EXPLODE_ENTER * 1.01) == "exploding"
    assert ratio_verdict(float("inf")) == "exploding"
    assert ratio_verdict(0.0) == "vanishing"
    assert ratio_verdict(float("nan")) is None and ratio_verdict(None) is None
    # ‖∂L/∂W‖ can only show vanishing, below its own line; above it: cannot say
    assert ratio_verdict(WEIGHT_VANISH_ENTER / 2, "weight_grad_norm") == "vanishing"
    assert ratio_verdict(0.05, "weight_grad_norm") is None
    assert ratio_verdict(1e3, "weight_grad_norm") is None


# -- layers that were not measured ------------------------------------------------------------------
def test_an_unmeasured_last_layer_does_not_hide_vanishing():
    """The issue's model: out_proj (never called as a module) has no ‖∂L/∂h‖ and sat after the
    output; a 6.4e6x vanishing network was then diagnosed only "plateau"."""
    names = NAMES[:3] + ["head", "layers.0.self_attn.out_proj"]
    act = [1 / 6.4e6, 1e-4, 1e-2, 1.0, np.nan]
    d = Diagnoser(_header(names))
    verdicts = _run(d, [_record(i, act, unmeasured=[("act_grad_norm", 4)]) for i in range(WINDOW)])
    assert _kinds(verdicts)[0] == "vanishing"
    v = verdicts[0]
    assert v.severity == "critical"
    assert v.evidence["first_last_ratio"] == pytest.approx(1 / 6.4e6)
    assert (v.evidence["first_layer"], v.evidence["last_layer"]) == ("embed", "head")
    assert "from head to embed" in v.summary
    # the per-layer factor spans the 3 layers between embed and head, not the 4 of the list
    assert v.evidence["per_layer_factor"] == pytest.approx((1 / 6.4e6) ** (1 / 3))
    assert v.evidence["act_grad_norm"][4] is None  # not measured: null, never "nan"
    assert "nonfinite" not in _kinds(verdicts)


def test_an_unmeasured_middle_layer_is_skipped_not_nan():
    act = [1.0, 1.2, np.nan, 0.9, 1.1]
    d = Diagnoser(_header())
    verdicts = _run(d, [_record(i, act, unmeasured=[("act_grad_norm", 2)]) for i in range(WINDOW)])
    assert _kinds(verdicts) == ["healthy"]
    assert "embed" in verdicts[0].summary and "head" in verdicts[0].summary
    assert verdicts[0].evidence["first_last_ratio"] == pytest.approx(1.0 / 1.1)


def test_no_act_grads_is_not_healthy_and_says_why():
    """A compiled model: no ‖∂L/∂h‖ anywhere. Not "healthy": not judged, with ‖∂L/∂W‖ shown."""
    n = len(NAMES)
    nothing = [("act_grad_norm", i) for i in range(n)]
    d = Diagnoser(_header())
    verdicts = _run(d, [_record(i, [np.nan] * n, unmeasured=nothing, wgrad=[0.5, 1, 1, 1, 1])
                        for i in range(WINDOW)])
    assert _kinds(verdicts) == ["unjudged"]
    assert "not judged" in verdicts[0].summary and "‖∂L/∂h‖" in verdicts[0].summary
    assert verdicts[0].evidence["weight_grad_ratio"] == pytest.approx(0.5)


def test_no_act_grads_falls_back_to_weight_gradients_far_below_the_line():
    n = len(NAMES)
    nothing = [("act_grad_norm", i) for i in range(n)]
    d = Diagnoser(_header())
    verdicts = _run(d, [_record(i, [np.nan] * n, unmeasured=nothing,
                                wgrad=[1e-5, 1e-3, 1e-2, 1e-1, 1.0]) for i in range(WINDOW)])
    assert _kinds(verdicts) == ["vanishing"]
    v = verdicts[0]
    assert v.severity == "warning"  # weaker evidence than ‖∂L/∂h‖
    assert v.evidence["basis"] == "weight_grad_norm"
    assert v.evidence["weight_grad_ratio"] == pytest.approx(1e-5)
    assert "judged from ‖∂L/∂W‖" in v.summary


def test_records_are_built_whole():
    d = Diagnoser(_header())
    records = [_record(i, [1.0] * len(NAMES)) for i in range(MIN_RECORDS)]
    built = [d.diagnose(r) for r in records]
    assert all(r.verdicts == [] for r in records)  # the inputs are untouched
    assert _kinds(built[-1].verdicts) == ["healthy"]
    assert built[-1].step == records[-1].step and built[-1] is not records[-1]


# -- spikes -------------------------------------------------------------------------------------------
def _window(first, last, loss=2.0, gnorm=1.0, loss_max=None, loss_max_step=None, g_max=None,
            g_max_step=None) -> StepWindow:
    return StepWindow(steps=last - first + 1, first_step=first, loss_min=loss, loss_max=loss_max or loss,
                      loss_mean=loss, loss_last=loss, loss_max_step=loss_max_step or last,
                      grad_norm_min=gnorm, grad_norm_max=g_max or gnorm, grad_norm_mean=gnorm,
                      grad_norm_last=gnorm, grad_norm_max_step=g_max_step or last)


def test_a_loss_spike_on_an_unsampled_step_is_named():
    """Sampled every 10 steps; the loss spikes at step 137, between samples (130 and 140)."""
    d = Diagnoser(_header())
    act = [1.0] * len(NAMES)
    records = [_record(s, act, window=_window(s - 9, s)) for s in range(10, 140, 10)]
    spike = _window(131, 140, loss_max=2.0 * (2 + SPIKE_RTOL), loss_max_step=137)
    out = _run(d, records + [_record(140, act, window=spike)])
    v = [x for x in out if x.kind == "spike"]
    assert v, _kinds(out)
    assert v[0].evidence["step"] == 137 and v[0].evidence["sampled"] is False
    assert "step 137" in v[0].summary and "between samples" in v[0].summary
    assert v[0].evidence["layers"] == []  # no layer was measured at step 137
    # it stays readable for a while, then goes
    calm = [_record(s, act, window=_window(s - 9, s)) for s in range(150, 150 + 10 * HOLD, 10)]
    shown = [any(x.kind == "spike" for x in d.update(r)) for r in calm]
    assert shown[0] and not shown[-1]


def test_a_measured_spike_names_the_layers_that_moved():
    d = Diagnoser(_header())
    act = [1.0] * len(NAMES)
    rng = np.random.default_rng(0)
    records = [_record(s, act, gnorm=1.0 + 0.1 * rng.random(), wgrad=1.0 + 0.1 * rng.random(5))
               for s in range(SPIKE_WARMUP + 2)]
    wgrad = np.array([1.0, 1.0, 1.0, 40.0, 8.0])  # layer 3 moved most, then the head
    out = _run(d, records + [_record(SPIKE_WARMUP + 2, act, gnorm=30.0, wgrad=wgrad)])
    v = [x for x in out if x.kind == "spike"][0]
    assert v.evidence["metric"] == "grad_norm" and v.evidence["sampled"] is True
    assert v.evidence["layers"][:2] == [NAMES[3], NAMES[4]]
    assert NAMES[3] in v.summary


def test_no_spike_without_history_or_in_steady_noise():
    d = Diagnoser(_header())
    act = [1.0] * len(NAMES)
    rng = np.random.default_rng(1)
    out = [d.update(_record(s, act, loss=2.0 * (1 + 0.3 * rng.random()),
                            gnorm=1 + 0.5 * rng.random())) for s in range(50)]
    assert not any(v.kind == "spike" for vs in out for v in vs)
    # a huge first value is the start of training, not a spike
    d = Diagnoser(_header())
    out = [d.update(_record(s, act, loss=100.0 if s == 1 else 2.0)) for s in range(5)]
    assert not any(v.kind == "spike" for vs in out for v in vs)


def test_nonfinite_in_a_window_is_a_nonfinite_step():
    w = _window(1, 10, loss_max=float("nan"), loss_max_step=7)
    assert nonfinite_step(_record(10, [1.0] * 5, window=w)) == 7
    assert nonfinite_step(_record(10, [1.0] * 5)) is None
    assert nonfinite_step(_record(10, [1.0] * 5, nonfinite=("head", "forward"))) == 10
    # not measured is never non-finite
    assert nonfinite_step(_record(10, [np.nan] * 5, unmeasured=[("act_grad_norm", i)
                                                               for i in range(5)])) is None


# -- through time ---------------------------------------------------------------------------------------
def _through_time(cell: nn.Module, steps: int, seed: int = 0) -> np.ndarray:
    """‖∂L/∂h_t‖ for every t of a real one-layer recurrent module, the loss on the last step
    only, computed independently of vgtui: the module stepped one time step at a time, each
    step's output fed back as the next state, and torch.autograd.grad on every output."""
    torch.manual_seed(seed)
    x = torch.randn(8, steps, cell.input_size)
    h = torch.zeros(1, 8, cell.hidden_size)
    state = (h, torch.zeros_like(h)) if isinstance(cell, nn.LSTM) else h
    outputs = []
    for t in range(steps):
        out, new = cell(x[:, t:t + 1], state)
        outputs.append(out)
        h_next = out.transpose(0, 1)  # the same values as the new h, on the graph through `out`
        state = (h_next, new[1]) if isinstance(cell, nn.LSTM) else h_next
    loss = outputs[-1].pow(2).sum()
    grads = torch.autograd.grad(loss, outputs)
    return np.asarray([float(g.norm()) for g in grads])


def _rnn_header(name="rnn"):
    return RunHeader(preset={"name": "my-rnn", "task": "custom", "clip": "none"},
                     layers=[name, "head"], layer_kinds=["tanh", "linear"], device="cpu")


def _time_records(norms, name="rnn", count=WINDOW):
    return [_record(i, [1.0, 1.0], time={name: norms}) for i in range(count)]


def test_a_vanilla_rnn_vanishing_through_time_is_not_healthy():
    torch.manual_seed(0)
    rnn = nn.RNN(4, 32, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.5)  # largest singular value well below 1
    norms = _through_time(rnn, 30)
    assert (norms > 0).all()
    d = Diagnoser(_rnn_header())
    verdicts = _run(d, _time_records(norms))
    assert "healthy" not in _kinds(verdicts)
    v = [x for x in verdicts if x.kind == "vanishing"][0]
    assert v.evidence["through_time"] is True and v.evidence["layer"] == "rnn"
    # the factor against an independent log-linear fit of the same autograd numbers
    t = np.arange(len(norms))
    slope = np.polyfit(t[norms > 0], np.log(norms[norms > 0]), 1)[0]
    assert v.evidence["per_step_factor"] == pytest.approx(math.exp(-slope), rel=1e-6)
    assert v.evidence["per_step_factor"] < 1
    n_back = math.log(TIME_FLOOR) / math.log(v.evidence["per_step_factor"])
    assert f"more than {math.ceil(n_back)} steps back" in v.summary
    assert "falls ×" in v.summary and "per step" in v.summary
    assert set(v.suggestions) == {"lstm", "gru", "rnn-orthogonal"}
    # over 100 steps the same RNN's gradient underflows to exactly 0 at the start: still caught
    norms = _through_time(rnn, 100)
    assert norms[0] == 0.0
    verdicts = _run(Diagnoser(_rnn_header()), _time_records(norms))
    assert "healthy" not in _kinds(verdicts)
    v = [x for x in verdicts if x.kind == "vanishing"][0]
    assert v.severity == "critical" and "no gradient reaches the first" in v.summary


def test_a_gradient_that_reaches_zero_through_time_is_critical():
    """100 steps of a vanilla RNN whose gradient underflows to exactly 0 in the early steps."""
    norms = np.concatenate([np.zeros(40), 0.7 ** np.arange(60, 0, -1)])
    fit = fit_through_time(norms)
    assert fit.ratio == 0.0 and fit.zero_steps == 40 and fit.factor == pytest.approx(0.7)
    d = Diagnoser(_rnn_header())
    verdicts = _run(d, _time_records(norms))
    v = [x for x in verdicts if x.kind == "vanishing"][0]
    assert v.severity == "critical"
    assert "no gradient reaches the first 40 of 100 time steps" in v.summary


def test_exploding_through_time():
    torch.manual_seed(0)
    rnn = nn.RNN(4, 32, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        w = torch.linalg.qr(torch.randn(32, 32))[0]
        rnn.weight_hh_l0.copy_(3.0 * w)  # every singular value 3 (ReLU passes about half)
    norms = _through_time(rnn, 30)
    assert norms[0] > norms[-1]
    verdicts = _run(Diagnoser(_rnn_header()), _time_records(norms))
    v = [x for x in verdicts if x.kind == "exploding"][0]
    assert v.evidence["through_time"] is True and v.evidence["per_step_factor"] > 1
    assert "grows ×" in v.summary


def test_an_lstm_that_keeps_its_gradient_is_healthy_through_time():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 32, batch_first=True)
    with torch.no_grad():  # forget gates open (bias +3): the cell path passes the gradient on
        lstm.bias_hh_l0[32:64].fill_(3.0)
        lstm.bias_ih_l0[32:64].fill_(3.0)
    norms = _through_time(lstm, 20)
    fit = fit_through_time(norms)
    assert fit.ratio > VANISH_ENTER, fit
    verdicts = _run(Diagnoser(_rnn_header("lstm")), _time_records(norms, "lstm"))
    assert _kinds(verdicts) == ["healthy"]
    assert "through time" in verdicts[0].summary


def test_fit_through_time_ignores_not_measured_points_and_downsampling():
    norms = 0.9 ** np.arange(50, 0, -1)
    holes = norms.copy()
    holes[[3, 10, 30]] = np.nan
    assert fit_through_time(holes).factor == pytest.approx(0.9)
    assert fit_through_time(norms[::2], stride=2.0).factor == pytest.approx(0.9)
    assert fit_through_time([np.nan, np.nan]) is None
    assert fit_through_time([0.0, 0.0, 0.0]) is None  # no gradient at all: nothing through time
    assert VANISH_CRITICAL < 1


def test_a_measured_spike_names_the_layer_that_moved_first():
    """hidden layer 1 is up 10x one record before the spike; at the spike the head moved most."""
    d = Diagnoser(_header())
    act = [1.0] * len(NAMES)
    records = [_record(s, act, gnorm=1.0, wgrad=np.ones(5)) for s in range(SPIKE_WARMUP + 2)]
    early = _record(SPIKE_WARMUP + 2, act, gnorm=1.5, wgrad=[1, 10, 1, 1, 1])
    spike = _record(SPIKE_WARMUP + 3, act, gnorm=40.0, wgrad=[1, 12, 1, 1, 60])
    out = _run(d, records + [early, spike])
    v = [x for x in out if x.kind == "spike"][0]
    assert v.evidence["layers"][:2] == [NAMES[4], NAMES[1]]
    assert v.evidence["first_layer"] == NAMES[1] and v.evidence["first_step_back"] == 1
    assert f"(first: {NAMES[1]})" in v.summary
