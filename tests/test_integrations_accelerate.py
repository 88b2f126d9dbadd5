"""vgtui.integrations.accelerate in an accelerate loop (prepared model and optimizer, accumulation,
accelerator.clip_grad_norm_), checked against autograd on a copy of the network."""

from __future__ import annotations

import copy
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from vgtui.channel import Channel
from vgtui.integrations.accelerate import watch
from vgtui.jsonl import iter_steps, read_recording
from vgtui.records import RunHeader, StepRecord

STEPS, ACCUM, CLIP = 8, 2, 1.0
LAYERS = ["0", "2", "4"]


def make_net() -> nn.Sequential:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        net[4].weight.mul_(3.0)  # global norms on both sides of the clip
    return net


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: a Trainer that ran earlier in this
    process would leave its own gradient-accumulation settings in them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_loop_with_prepared_optimizer_and_clip(tmp_path, fresh_accelerate_state):
    accelerator = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    net = make_net()
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.3))
    assert isinstance(optimizer, AcceleratedOptimizer)
    channel = Channel(maxlen=10_000)
    watcher = watch(accelerator, model, optimizer, channel=channel, record=tmp_path / "run.jsonl")
    g = torch.Generator().manual_seed(1)
    batches, snapshots = [], []
    for i in range(STEPS * ACCUM):
        x = torch.randn(6, 5, generator=g) * (1 + i / 4)
        y = torch.randint(0, 4, (6,), generator=g)
        batches.append((x, y))
        if i % ACCUM == 0:
            snapshots.append(copy.deepcopy(net.state_dict()))
        with accelerator.accumulate(model):
            out = model(x)
            loss = F.cross_entropy(out, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            watcher.step(optimizer, loss, accuracy=(out.argmax(1) == y).float().mean())
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    assert "clip_grad_norm_" not in accelerator.__dict__  # restored

    records = channel.drain()
    header = next(r for r in records if isinstance(r, RunHeader))
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert header.layers == LAYERS and [r.step for r in steps] == list(range(STEPS))
    assert header.preset["integration"] == "accelerate" and header.preset["grad_norm_measured"] == "before_clip"
    assert header.preset["clip"] == "norm" and header.preset["clip_threshold"] == CLIP
    clipped = []
    for record in steps:
        copy_ = make_net()
        copy_.load_state_dict(snapshots[record.step])
        micro = batches[record.step * ACCUM:(record.step + 1) * ACCUM]
        outs = [copy_(x) for x, _ in micro]
        loss = sum(F.cross_entropy(o, y) for o, (_, y) in zip(outs, micro)) / ACCUM
        accuracy = np.mean([(o.argmax(1) == y).float().mean().item() for o, (_, y) in zip(outs, micro)])
        params = list(copy_.parameters())
        grads = dict(zip(params, torch.autograd.grad(loss, params)))
        # ‖∂L/∂W‖ of a layer: every parameter it owns (weight and bias) as one vector
        per_layer = [torch.linalg.vector_norm(torch.stack([grads[p].norm() for p in copy_[int(name)].parameters()])).item()
                     for name in LAYERS]
        total = torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads.values()])).item()
        assert record.loss == pytest.approx(loss.item(), rel=1e-5)
        assert record.accuracy == pytest.approx(accuracy)
        np.testing.assert_allclose(record.layers["weight_grad_norm"], per_layer, rtol=1e-5)
        assert record.grad_norm_total == pytest.approx(total, rel=1e-5)
        assert record.grad_norm_clipped == pytest.approx(total * min(1.0, CLIP / (total + 1e-6)), rel=1e-5)
        assert record.clipped == (total > CLIP)
        clipped.append(record.clipped)
        # The prepared optimizer's step was seen: on detail steps (every 10th measured one) the
        # update ratio is ‖W_after - W_before‖ / ‖W_after‖ over each layer's parameters.
        assert record.measured("update_ratio").all() == (record.step % 10 == 0)
        if record.measured("update_ratio").all() and record.step + 1 < STEPS:
            after = snapshots[record.step + 1]
            before = snapshots[record.step]
            want = [torch.linalg.vector_norm(torch.stack([(after[k] - before[k]).norm() for k in after if k.startswith(f"{name}.")]))
                    / torch.linalg.vector_norm(torch.stack([after[k].norm() for k in after if k.startswith(f"{name}.")]))
                    for name in LAYERS]
            np.testing.assert_allclose(record.layers["update_ratio"], want, rtol=1e-4)
    assert any(clipped) and not all(clipped)


def test_example_accelerate_loop_runs(tmp_path, monkeypatch, fresh_accelerate_state):
    """examples/accelerate_loop.py, shortened: it trains and writes a recording with finite losses."""
    path = tmp_path / "run.jsonl"
    monkeypatch.setattr(sys, "argv", ["accelerate_loop.py", "--steps", "6", "--record", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(Path(__file__).parents[1] / "examples" / "accelerate_loop.py"), run_name="__main__")
    steps = list(iter_steps(read_recording(path).records))
    assert [s.step for s in steps] == [0, 5] and all(np.isfinite(s.loss) for s in steps)


def test_a_fault_inside_vgtui_is_reported_once_and_training_goes_on(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    net = make_net()
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    watcher = watch(accelerator, model, optimizer)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    watcher.watcher.step = broken
    before = net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="measuring stopped after RuntimeError: disk on fire") as caught:
        for _ in range(3):
            loss = F.cross_entropy(model(torch.randn(4, 5)), torch.randint(0, 4, (4,)))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
            watcher.step(optimizer, loss)
            optimizer.step()
            optimizer.zero_grad()
    assert len([w for w in caught if "vgtui" in str(w.message)]) == 1
    assert not torch.equal(before, net[0].weight)  # the loop trained on
    assert "clip_grad_norm_" not in accelerator.__dict__  # vgtui took itself out
    watcher.close()
