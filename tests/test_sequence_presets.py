"""Recurrent presets: the gradient through time, checked against torch's own cells.

The truth here is an independent computation: the preset's weights copied into ``nn.RNNCell`` /
``nn.LSTMCell`` / ``nn.GRUCell``, looped by the test, every h_t kept with ``retain_grad`` and its
total gradient ‖∂L/∂h_t‖ read after ``backward``. At initialisation, fixed seeds.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vgtui.cli import main
from vgtui.config import load_preset
from vgtui.data import make_data
from vgtui.jsonl import read_recording
from vgtui.models import Recurrent, build_model, make_optimizer
from vgtui.records import RunError, RunHeader, StepRecord
from vgtui.trainer import run_to_completion

SEQUENCE_PRESETS = ["rnn-tanh", "lstm", "gru", "rnn-orthogonal", "rnn-exploding", "rnn-clipped"]
TORCH_CELLS = {"rnn_tanh": nn.RNNCell, "rnn_relu": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


def torch_cell_replica(layer: Recurrent) -> nn.Module:
    """torch's own cell holding a copy of ``layer``'s weights."""
    cls = TORCH_CELLS[layer.cell]
    kwargs = {"nonlinearity": "relu" if layer.cell == "rnn_relu" else "tanh"} if cls is nn.RNNCell else {}
    cell = cls(layer.weight_ih.shape[1], layer.hidden_size, **kwargs)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(layer, name))
    return cell


def through_time_truth(name: str, batch_index: int = 0, **changes) -> tuple[np.ndarray, float]:
    """‖∂L/∂h_t‖ for t = 0..T-1 of the first recurrent layer of preset ``name`` at init, on its
    training batch ``batch_index``, computed with torch's cells; and the loss."""
    preset = load_preset(name).replace(**changes) if changes else load_preset(name)
    model = build_model(preset).model
    data = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len)
    x, y = data.batch(batch_index)
    kept = []
    for layer in model.recurrent:
        cell = torch_cell_replica(layer)
        h = x.new_zeros(x.shape[0], layer.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[1]):
            if layer.cell == "lstm":
                h, c = cell(x[:, t], (h, c))
            else:
                h = cell(x[:, t], h)
            h.retain_grad()
            outputs.append(h)
        kept.append(outputs)
        x = torch.stack(outputs, 1)
    loss = nn.functional.cross_entropy(model.head(x[:, -1]), y)
    loss.backward()
    norms = np.array([float(h.grad.norm()) if h.grad is not None else 0.0 for h in kept[0]])
    return norms, float(loss.detach())


def first_last(norms: np.ndarray) -> float:
    return norms[0] / norms[-1]


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_recurrent_layer_is_torchs_cell_looped(cell):
    """Same parameters, same outputs and same weight gradients as nn.RNN / nn.LSTM / nn.GRU."""
    torch.manual_seed(1)
    reference = {"rnn_tanh": nn.RNN(5, 8, batch_first=True),
                 "rnn_relu": nn.RNN(5, 8, batch_first=True, nonlinearity="relu"),
                 "lstm": nn.LSTM(5, 8, batch_first=True), "gru": nn.GRU(5, 8, batch_first=True)}[cell]
    ours = Recurrent(cell, 5, 8)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ours, name).copy_(getattr(reference, name + "_l0"))
    x = torch.randn(3, 9, 5)
    mine, theirs = ours(x, taps=[]), reference(x)[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    mine.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(ours.weight_hh.grad, reference.weight_hh_l0.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["rnn-tanh", "lstm", "gru"])
def test_taps_give_the_total_gradient_at_every_time_step(name):
    """The tapped h of a recurrent layer has, at each t, the total ∂L/∂h_t (through every later
    step), not the direct path alone (which is zero before the last step here)."""
    truth, loss_truth = through_time_truth(name)
    preset = load_preset(name)
    built = build_model(preset)
    x, y = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len).batch(0)
    taps = []
    loss = built.loss_fn(built.model(x, taps=taps), y)
    assert len(taps) == len(built.layers)
    assert built.layers[0].time_dim == 1 and built.layers[-1].time_dim is None
    activation, h = taps[0]
    assert activation.shape == h.shape == (preset.batch_size, preset.seq_len, preset.width)
    grad, direct = torch.autograd.grad(loss, [h, activation])
    measured = grad.norm(dim=(0, 2)).numpy()
    # What the output tensor itself would say: the direct path only, nothing before the last step.
    assert float(direct[:, :-1].abs().max()) == 0.0 and float(direct[:, -1].abs().max()) > 0.0
    assert math.isclose(float(loss.detach()), loss_truth, rel_tol=1e-5)
    np.testing.assert_allclose(measured, truth, rtol=1e-3, atol=1e-30)
    assert truth[0] > 0  # the first step does get a gradient, however small


def test_rnn_tanh_vanishes_through_time_orders_of_magnitude_more_than_lstm_and_gru():
    tanh = first_last(through_time_truth("rnn-tanh")[0])
    lstm = first_last(through_time_truth("lstm")[0])
    gru = first_last(through_time_truth("gru")[0])
    assert tanh < 1e-9  # 50 steps back: nothing left
    assert lstm > 1e4 * tanh and gru > 1e4 * tanh
    # The forget-gate bias is what buys it: at bias 0 the same LSTM starts near 1e-10.
    assert first_last(through_time_truth("lstm", forget_bias=0.0)[0]) < 1e-2 * lstm


def test_orthogonal_init_keeps_the_vanilla_rnns_gradient_through_time():
    orthogonal = first_last(through_time_truth("rnn-orthogonal")[0])
    assert orthogonal > 1e8 * first_last(through_time_truth("rnn-tanh")[0])


def test_rnn_exploding_gradient_grows_back_in_time():
    norms, loss = through_time_truth("rnn-exploding")
    assert first_last(norms) > 1e3 and math.isfinite(loss)


def _recurrent_weight_norms(name: str, steps: int) -> list[float]:
    """‖W_hh‖ after each of ``steps`` plain training steps (the preset's own optimiser and clipping)."""
    preset = load_preset(name)
    built = build_model(preset)
    optimizer = make_optimizer(built.model.parameters(), preset)
    data = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len)
    norms = [float(built.model.recurrent[0].weight_hh.detach().norm())]
    for step in range(steps):
        x, y = data.batch(step)
        optimizer.zero_grad()
        built.loss_fn(built.model(x), y).backward()
        if preset.clip == "norm":
            nn.utils.clip_grad_norm_(built.model.parameters(), preset.clip_threshold)
        optimizer.step()
        norms.append(float(built.model.recurrent[0].weight_hh.detach().norm()))
    return norms


def test_rnn_exploding_blows_up_its_weights_and_rnn_clipped_stays_put():
    exploding = _recurrent_weight_norms("rnn-exploding", 3)
    clipped = _recurrent_weight_norms("rnn-clipped", 3)
    assert exploding[0] == clipped[0]  # the same network
    assert exploding[1] > 100 * exploding[0]  # one unclipped step
    assert all(math.isfinite(n) for n in clipped)
    # Clipped to global norm 1 with lr 0.01 and momentum 0.9, W_hh moves at most 0.01 * (1 + 1.9 + 2.71).
    assert abs(clipped[-1] - clipped[0]) <= 0.0562


def test_trainer_records_explosion_and_clipping():
    """Through the real Trainer: a huge global norm, clipped to 1 in rnn-clipped, finite records."""
    steps = {}
    for name in ("rnn-exploding", "rnn-clipped"):
        records = run_to_completion(load_preset(name), 3)
        assert not [r for r in records if isinstance(r, RunError)]
        steps[name] = [r for r in records if isinstance(r, StepRecord)]
    first = steps["rnn-exploding"][0]
    assert first.grad_norm_total > 1e4 and not first.clipped
    for record in steps["rnn-clipped"]:
        assert record.clipped and record.grad_norm_clipped == pytest.approx(1.0, rel=1e-4)
        assert math.isfinite(record.loss)


def test_trainer_measures_the_total_gradient_of_each_recurrent_layer():
    """The record's ‖∂L/∂h‖ of a recurrent layer is the norm over its whole sequence of total
    gradients: sqrt(sum_t ‖∂L/∂h_t‖²) of the independent computation, at step 0."""
    truth, loss = through_time_truth("lstm")
    records = [r for r in run_to_completion(load_preset("lstm"), 1) if isinstance(r, StepRecord)]
    assert records[0].loss == pytest.approx(loss, rel=1e-5)
    assert records[0].layers["act_grad_norm"][0] == pytest.approx(float(np.sqrt(np.sum(truth**2))), rel=1e-4)


@pytest.mark.parametrize("name", SEQUENCE_PRESETS)
def test_each_sequence_preset_builds_and_trains(name):
    preset = load_preset(name)
    assert (preset.network, preset.data) == ("rnn", "recall")
    records = run_to_completion(preset.replace(batch_size=8, seq_len=12), 3)
    assert not [r for r in records if isinstance(r, RunError)]
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r.loss) for r in steps)


def test_stacked_recurrent_layers_each_get_a_probe_point():
    built = build_model(load_preset("gru").replace(depth=3, width=8, seq_len=6))
    assert [layer.name for layer in built.layers] == ["gru1", "gru2", "gru3", "output"]
    assert [layer.time_dim for layer in built.layers] == [1, 1, 1, None]
    taps = []
    built.model(torch.zeros(2, 6, 11), taps=taps)
    assert [tuple(h.shape) for _, h in taps] == [(2, 6, 8)] * 3 + [(2, 10)]


def test_orthogonal_and_spectral_recurrent_init():
    ortho = build_model(load_preset("rnn-tanh").replace(recurrent_init="orthogonal", width=16)).model
    w = ortho.recurrent[0].weight_hh.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)
    lstm = build_model(load_preset("lstm").replace(recurrent_init="spectral", spectral_radius=0.5, width=16))
    layer = lstm.model.recurrent[0]
    for block in layer.weight_hh.detach().split(16):  # every gate's block, one by one
        assert float(torch.linalg.eigvals(block.double()).abs().max()) == pytest.approx(0.5, rel=1e-5)
    assert torch.all(layer.bias_ih[16:32] == 3.0) and torch.all(layer.bias_hh[16:32] == 0.0)  # forget gate


def test_cli_runs_a_sequence_preset(tmp_path):
    record = tmp_path / "lstm.jsonl"
    assert main(["run", "--preset", "lstm", "--steps", "20", "--budget", "0", "--record", str(record)]) == 0
    recording = read_recording(record)
    assert not recording.problems
    headers = [r for r in recording.records if isinstance(r, RunHeader)]
    assert headers[0].layers == ["lstm1", "output"] and headers[0].preset["network"] == "rnn"
    steps = [r for r in recording.records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == list(range(20))
    assert all(np.isfinite(r.layers["act_grad_norm"]).all() for r in steps)


def test_cli_refuses_image_data_for_a_sequence_preset(capsys):
    assert main(["run", "--preset", "lstm", "--data", "fashion-mnist", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data" in err and "recall" in err and "Traceback" not in err
