"""Total ‖∂L/∂h_t‖ through time for every layer of a user's fused nn.RNN / nn.LSTM / nn.GRU.

The truth is independent of vgtui: the module's weights copied into ``nn.LSTMCell`` /
``nn.GRUCell`` / ``nn.RNNCell``, looped by the test (both directions, every stacked layer),
``retain_grad()`` on every h_t, the same loss, one ``backward()``: ``h_t.grad`` is the total
∂L/∂h_t (direct path plus every later step and every layer above).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui.channel import Channel
from vgtui.records import RunEvent, RunHeader, StepRecord

RTOL = 1e-4
ATOL = 1e-9
CELLS = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}


def cells_of(module):
    """cells[k][d]: layer k, direction d, sharing (copies of) the module's weights."""
    cls = CELLS[type(module)]
    dirs = 2 if module.bidirectional else 1
    cells = []
    for k in range(module.num_layers):
        row = []
        for d in range(dirs):
            size = module.input_size if k == 0 else module.hidden_size * dirs
            extra = {"nonlinearity": module.nonlinearity} if cls is nn.RNNCell else {}
            cell = cls(size, module.hidden_size, bias=module.bias, **extra)
            suffix = f"_l{k}" + ("_reverse" if d else "")
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ()):
                    getattr(cell, name).copy_(getattr(module, name + suffix))
            row.append(cell)
        cells.append(row)
    return cells


def truth(module, x, loss_of, hx=None):
    """Per layer: ‖∂L/∂h_t‖ for every t, by an unrolled cell loop and retain_grad()."""
    cells = cells_of(module)
    lstm = isinstance(module, nn.LSTM)
    dirs = 2 if module.bidirectional else 1
    xs = x.transpose(0, 1) if module.batch_first else x
    steps, batch = xs.shape[0], xs.shape[1]
    zeros = torch.zeros(module.num_layers * dirs, batch, module.hidden_size)
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (zeros, zeros)
    inputs = list(xs)
    kept: list[list[list[torch.Tensor]]] = []
    h_n, c_n = [], []
    for k in range(module.num_layers):
        seqs = []
        for d in range(dirs):
            h, c = h0[k * dirs + d], c0[k * dirs + d] if lstm else None
            seq = [None] * steps
            for t in (range(steps - 1, -1, -1) if d else range(steps)):
                if lstm:
                    h, c = cells[k][d](inputs[t], (h, c))
                else:
                    h = cells[k][d](inputs[t], h)
                h.retain_grad()
                seq[t] = h
            seqs.append(seq)
            h_n.append(h)
            c_n.append(c)
        kept.append(seqs)
        inputs = [torch.cat([s[t] for s in seqs], dim=1) for t in range(steps)]
    out = torch.stack(inputs)
    out = out.transpose(0, 1) if module.batch_first else out
    state = (torch.stack(h_n), torch.stack(c_n)) if lstm else torch.stack(h_n)
    loss = loss_of(out, state)
    loss.backward()

    def norm(h):
        return 0.0 if h.grad is None else float(h.grad.square().sum())

    return loss, [np.sqrt([sum(norm(seq[t]) for seq in seqs) for t in range(steps)]) for seqs in kept]


class Net(nn.Module):
    def __init__(self, rnn, loss_of):
        super().__init__()
        self.rnn = rnn
        self.loss_of = loss_of

    def forward(self, x, hx=None):
        return self.loss_of(*self.rnn(x, hx))


def watch_steps(net, x, steps=1, hx=None, **kwargs):
    channel = Channel(10_000)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    options = dict(channel=channel, optimizer=opt, diagnose=False, detail_every=1, overhead_budget=None)
    watcher = vgtui.watch(net, **(options | kwargs))
    losses = []
    for _ in range(steps):
        loss = net(x, hx)
        loss.backward()
        losses.append(loss.detach().clone())
        watcher.step(opt, loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    records = channel.drain()
    return records, [r for r in records if isinstance(r, StepRecord)], losses


CASES = {
    # name: (module factory, what the loss reads)
    "lstm-last": (lambda: nn.LSTM(3, 8, batch_first=True), "last"),
    "lstm2-every": (lambda: nn.LSTM(3, 8, num_layers=2), "every"),
    "lstm2-state": (lambda: nn.LSTM(3, 8, num_layers=2, batch_first=True), "state"),
    "gru2-last": (lambda: nn.GRU(3, 8, num_layers=2), "last"),
    "rnn-relu-every": (lambda: nn.RNN(3, 8, nonlinearity="relu", batch_first=True), "every"),
    "lstm-bi2-last": (lambda: nn.LSTM(3, 6, num_layers=2, bidirectional=True), "last"),
    "gru-bi-every": (lambda: nn.GRU(3, 6, bidirectional=True, batch_first=True), "every"),
}


def loss_for(kind, batch_first, target):
    def loss_of(out, state):
        if kind == "every":
            return out.square().mean() + (out * target.unsqueeze(1 if batch_first else 0)).mean()
        y = out[:, -1] if batch_first else out[-1]
        loss = F.mse_loss(y, target)
        if kind == "state":  # the final state h_n (and c_n) enter the loss as well
            h_n, c_n = state
            loss = loss + h_n.square().mean() + 0.5 * c_n.square().mean()
        return loss
    return loss_of


@pytest.mark.parametrize("case", list(CASES))
def test_total_gradient_through_time_matches_an_unrolled_cell_loop(case):
    factory, kind = CASES[case]
    torch.manual_seed(0)
    module = factory()
    dirs = 2 if module.bidirectional else 1
    g = torch.Generator().manual_seed(1)
    steps, batch = 9, 3
    x = torch.randn(batch, steps, 3, generator=g)
    x = x if module.batch_first else x.transpose(0, 1).contiguous()
    target = torch.randn(batch, module.hidden_size * dirs, generator=g)
    loss_of = loss_for(kind, module.batch_first, target)
    ref_module = copy.deepcopy(module)
    _, expected = truth(ref_module, x, loss_of)
    _, (record,), _ = watch_steps(Net(module, loss_of), x)
    names = ["rnn"] if module.num_layers == 1 else [f"rnn.l{k}" for k in range(module.num_layers)]
    assert sorted(record.time_act_grad_norm) == names
    for name, want in zip(names, expected):
        np.testing.assert_allclose(record.time_act_grad_norm[name], want, rtol=RTOL, atol=ATOL)
    if kind == "last" and not module.bidirectional:
        # the direct path alone is exactly 0 before the last step; the total is not
        assert (record.time_act_grad_norm[names[-1]][:-1] > 0).all()


def test_initial_state_and_micro_batches_pool():
    """A given (h0, c0) is replayed; two micro-batches add as Σ_k ‖∂L_k/∂h_t‖²."""
    torch.manual_seed(0)
    module = nn.LSTM(3, 5, num_layers=2)
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(7, 2, 3, generator=g), torch.randn(7, 2, 3, generator=g)
    hx = (torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g))
    target = torch.randn(2, 5, generator=g)
    loss_of = loss_for("state", False, target)
    _, ea = truth(copy.deepcopy(module), xa, loss_of, hx)
    _, eb = truth(copy.deepcopy(module), xb, loss_of, hx)
    net = Net(module, loss_of)
    channel = Channel(100)
    watcher = vgtui.watch(net, channel=channel, diagnose=False, overhead_budget=None)
    for x in (xa, xb):
        net(x, hx).backward()
    watcher.step(None)
    watcher.close()
    (record,) = [r for r in channel.drain() if isinstance(r, StepRecord)]
    for k in range(2):
        want = np.sqrt(ea[k] ** 2 + eb[k] ** 2)
        np.testing.assert_allclose(record.time_act_grad_norm[f"rnn.l{k}"], want, rtol=RTOL)


def test_tanh_rnn_vanishes_tiny_but_not_zero_while_a_healthy_lstm_is_not_flagged():
    steps, batch = 30, 4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, steps, 3, generator=g)
    target = torch.randn(batch, 16, generator=g)
    loss_of = loss_for("last", True, target)

    torch.manual_seed(0)
    rnn = nn.RNN(3, 16, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.5)  # spectral radius well below 1: the gradient through time vanishes
    _, expected = truth(copy.deepcopy(rnn), x, loss_of)
    _, records, _ = watch_steps(Net(rnn, loss_of), x)
    series = records[0].time_act_grad_norm["rnn"]
    np.testing.assert_allclose(series, expected[0], rtol=RTOL, atol=1e-30)
    assert 0 < series[0] < 1e-6 * series[-1]
    rnn_ratio = series[0] / series[-1]

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 16, batch_first=True)
    with torch.no_grad():  # forget-gate bias 3 (Jozefowicz et al. 2015): the cell keeps its gradient
        lstm.bias_ih_l0[16:32].fill_(3.0)
    records_lstm = watch_steps(Net(lstm, loss_of), x, steps=5, diagnose=True)[1]
    series = records_lstm[-1].time_act_grad_norm["rnn"]
    assert series[0] / series[-1] > 1e4 * rnn_ratio
    through_time = [v for r in records_lstm for v in r.verdicts if v.evidence.get("through_time")]
    assert not [v for v in through_time if v.kind == "vanishing"]
    # ...and the same tanh RNN over these steps is diagnosed vanishing through time
    records_rnn = watch_steps(Net(rnn, loss_of), x, steps=5, diagnose=True)[1]
    kinds = {v.kind for v in records_rnn[-1].verdicts if v.evidence.get("through_time")}
    assert "vanishing" in kinds


def test_the_users_loss_and_gradients_are_bit_identical_with_and_without_watching():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 12, 3, generator=g)
    target = torch.randn(4, 8, generator=g)
    loss_of = loss_for("state", True, target)
    torch.manual_seed(0)
    plain = Net(nn.LSTM(3, 8, num_layers=2, batch_first=True), loss_of)
    watched = copy.deepcopy(plain)

    def train(net, watcher):
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        out = []
        for _ in range(3):
            loss = net(x)
            loss.backward()
            out.append((loss.detach().clone(), [p.grad.clone() for p in net.parameters()]))
            if watcher is not None:
                watcher.step(opt, loss)
            opt.step()
            opt.zero_grad()
        return out, [p.detach().clone() for p in net.parameters()]

    bare, bare_params = train(plain, None)
    watcher = vgtui.watch(watched, diagnose=False, overhead_budget=None, detail_every=1)
    seen, seen_params = train(watched, watcher)
    watcher.close()
    assert watcher.latest is not None and "rnn.l1" in watcher.latest.time_act_grad_norm
    for (la, ga), (lb, gb) in zip(bare, seen):
        assert torch.equal(la, lb)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert all(torch.equal(a, b) for a, b in zip(bare_params, seen_params))


def test_packed_sequences_and_training_dropout_are_not_measured_with_one_notice():
    from torch.nn.utils.rnn import pack_padded_sequence

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 3, generator=g)
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = lstm

        def forward(self, x, hx=None):
            packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]))
            return self.rnn(packed)[1][0].square().mean()

    with pytest.warns(UserWarning, match="PackedSequence"):
        records, steps, _ = watch_steps(Packed(), x, steps=2)
    assert all(not r.time_act_grad_norm for r in steps)
    assert all(np.isfinite(r.layers["act_grad_norm"]).all() or r.unmeasured for r in steps)
    notices = [r for r in records if isinstance(r, RunEvent) and "PackedSequence" in r.message]
    assert len(notices) == 1

    torch.manual_seed(0)
    dropped = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    target = torch.randn(3, 4, generator=g)
    net = Net(dropped, loss_for("last", False, target))
    with pytest.warns(UserWarning, match="dropout"):
        _, steps, _ = watch_steps(net, x, steps=2)
    assert all(not r.time_act_grad_norm for r in steps)
    net.eval()  # no dropout in eval mode: replayed exactly (gradients still flow in eval)
    _, expected = truth(copy.deepcopy(dropped).eval(), x, loss_for("last", False, target))
    _, (record,), _ = watch_steps(net, x)
    np.testing.assert_allclose(record.time_act_grad_norm["rnn.l0"], expected[0], rtol=RTOL)


def test_the_header_keeps_one_layer_and_the_recording_carries_the_stacked_series(tmp_path):
    from vgtui.jsonl import read_recording

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 3, generator=g)
    net = Net(nn.GRU(3, 4, num_layers=3), loss_for("last", False, torch.randn(2, 4, generator=g)))
    path = tmp_path / "run.jsonl"
    watch_steps(net, x, steps=1, record=path)
    result = read_recording(path)
    assert not result.problems
    records = result.records
    header = next(r for r in records if isinstance(r, RunHeader))
    (record,) = [r for r in records if isinstance(r, StepRecord)]
    assert header.layers == ["rnn"]
    assert sorted(record.time_act_grad_norm) == ["rnn.l0", "rnn.l1", "rnn.l2"]
    assert all(len(v) == 5 for v in record.time_act_grad_norm.values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "step-by-step"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.RNN])
def test_both_replays_agree_with_the_truth(cls, fused):
    """LSTM and RNN replay through PyTorch's kernel by default; the step-by-step replay (GRU's) is
    exact for them too."""
    from vgtui.recurrent import total_time_grads

    torch.manual_seed(0)
    module = cls(3, 6, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 2, 3, generator=g)
    target = torch.randn(2, 12, generator=g)
    last = loss_for("last", False, target)

    def loss_of(out, state):  # the final state enters the loss as well
        h_n = state[0] if isinstance(state, tuple) else state
        return last(out, state) + h_n.square().mean()

    _, expected = truth(copy.deepcopy(module), x, loss_of)
    out, state = module(x)
    finals = list(state) if isinstance(state, tuple) else [state]
    grads = torch.autograd.grad(loss_of(out, state), [out, *finals], allow_unused=True)  # c_n: unused
    got = total_time_grads(module, x, None, grads[0], grads[1], grads[2] if len(grads) > 2 else None, fused=fused)
    for k in range(2):
        np.testing.assert_allclose(got[k].sqrt().numpy(), expected[k], rtol=RTOL, atol=ATOL)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_lstm_with_projection_matches_its_equations_unrolled():
    """proj_size: h_t = W_hr (o_t ⊙ tanh c_t), and h_{t-1} enters the gates through W_hh (4H×P).
    No cell class has a projection: the truth is PyTorch's documented equations, written out."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 6, proj_size=4, batch_first=True)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 3, generator=g)
    target = torch.randn(2, 4, generator=g)
    w_ih, w_hh, b_ih, b_hh, w_hr = (p.detach() for p in (lstm.weight_ih_l0, lstm.weight_hh_l0,
                                                        lstm.bias_ih_l0, lstm.bias_hh_l0, lstm.weight_hr_l0))
    h, c = torch.zeros(2, 4), torch.zeros(2, 6)
    hs = []
    xr = x.clone().requires_grad_()  # something for autograd to differentiate
    for t in range(7):
        i, f, gg, o = (xr[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = (torch.sigmoid(o) * torch.tanh(c)) @ w_hr.T
        h.retain_grad()
        hs.append(h)
    loss_of = loss_for("last", True, target)
    loss_of(torch.stack(hs, dim=1), None).backward()
    expected = np.array([float(h.grad.norm()) for h in hs])
    _, (record,), _ = watch_steps(Net(lstm, loss_of), x)
    np.testing.assert_allclose(record.time_act_grad_norm["rnn"], expected, rtol=RTOL)


def test_a_failing_replay_costs_only_its_own_series(monkeypatch):
    """A fault in the replay: one notice, no series for that module from then on; every other
    measurement of the step goes on, and so does training."""
    from vgtui import recurrent

    def broken(*args, **kwargs):
        raise RuntimeError("odd weights")

    monkeypatch.setattr(recurrent, "total_time_grads", broken)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 2, 3, generator=g)
    net = Net(nn.LSTM(3, 4), loss_for("last", False, torch.randn(2, 4, generator=g)))
    with pytest.warns(UserWarning, match="odd weights"):
        records, steps, _ = watch_steps(net, x, steps=3)
    assert len(steps) == 3 and all(not r.time_act_grad_norm for r in steps)
    assert all(np.isfinite(r.layers["act_grad_norm"][0]) for r in steps)
    assert len([r for r in records if isinstance(r, RunEvent) and "odd weights" in r.message]) == 1
    assert not [r for r in records if type(r).__name__ == "RunError"]


def test_an_unbatched_sequence_is_a_batch_of_one():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, num_layers=2)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 3, generator=g)  # (T, input): no batch dimension
    target = torch.randn(4, generator=g)

    def loss_of(out, state):
        return F.mse_loss(out[-1].reshape(-1), target) + state[-1].square().mean()

    _, expected = truth(copy.deepcopy(gru), x.unsqueeze(1), loss_of)
    _, (record,), _ = watch_steps(Net(gru, loss_of), x)
    for k in range(2):
        np.testing.assert_allclose(record.time_act_grad_norm[f"rnn.l{k}"], expected[k], rtol=RTOL)


def test_loss_scaling_is_divided_out_and_checkpointing_changes_nothing():
    """GradScaler's scale rides on the captured gradients: divided out like every ∂L/∂h. Under
    activation checkpointing the forward run again inside backward is not captured twice."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 2, 3, generator=g)
    target = torch.randn(2, 5, generator=g)
    loss_of = loss_for("last", False, target)
    _, expected = truth(copy.deepcopy(lstm), x, loss_of)

    class Checkpointed(Net):
        def forward(self, x, hx=None):
            return self.loss_of(*checkpoint(self.rnn, x, use_reentrant=False))

    for net in (Net(lstm, loss_of), Checkpointed(lstm, loss_of)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        channel = Channel(100)
        watcher = vgtui.watch(net, channel=channel, optimizer=opt, scaler=scaler, diagnose=False,
                              overhead_budget=None)
        scaler.scale(net(x)).backward()
        watcher.step(opt)
        scaler.step(opt)
        scaler.update()
        watcher.close()
        (record,) = [r for r in channel.drain() if isinstance(r, StepRecord)]
        for k in range(2):
            np.testing.assert_allclose(record.time_act_grad_norm[f"rnn.l{k}"], expected[k], rtol=RTOL)
