"""Every step counted: the loss of every optimiser step reaches the next record's window by default
(trainer and ``vgtui.watch``, CPU included); the global gradient norm only where it is measured
anyway or asked for, and otherwise says so (None), never passing for a number."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui.channel import Channel
from vgtui.config import load_preset
from vgtui.diagnosis import Diagnoser, nonfinite_step
from vgtui.engine import WindowMeter, window_record
from vgtui.jsonl import JsonlWriter, RecordingIndex, read_recording
from vgtui.records import RunHeader, StepRecord, StepWindow

RTOL = 1e-5
SPIKE_AT = 25  # unsampled: records are taken every 2 steps, at even steps


def _trainer_run(monkeypatch, steps=30, **changes):
    """relu-he (small), measured every 2nd step, no overhead budget; the batch of SPIKE_AT has its
    inputs scaled by 50, so that step's loss jumps between two measured steps."""
    import vgtui.trainer as trainer

    real = trainer.make_data

    def make_data(*args, **kwargs):
        data = real(*args, **kwargs)
        batch = data.batch

        def spiked(index):
            x, y = batch(index)
            return (x * 50, y) if index == SPIKE_AT else (x, y)

        data.batch = spiked
        return data

    monkeypatch.setattr(trainer, "make_data", make_data)
    preset = load_preset("relu-he").replace(depth=3, width=32, batch_size=8, sample_every=2, momentum=0.0, lr=1e-3,
                                            **changes)
    records = trainer.run_to_completion(preset, steps)
    header = next(r for r in records if isinstance(r, RunHeader))
    return header, [r for r in records if isinstance(r, StepRecord)]


def test_trainer_on_the_cpu_counts_a_loss_spike_between_samples_by_default(monkeypatch):
    header, records = _trainer_run(monkeypatch)
    assert [r.step for r in records] == list(range(0, 30, 2))
    after = next(r for r in records if r.step == SPIKE_AT + 1)
    w = after.window
    assert (w.steps, w.first_step, w.loss_max_step) == (2, SPIKE_AT, SPIKE_AT)
    assert w.loss_last == pytest.approx(after.loss, rel=RTOL)  # the measured step is the window's last
    assert w.loss_max > 5 * max(r.loss for r in records if r.step <= SPIKE_AT - 1)
    # the norm of every step costs a read of every gradient on the CPU: not measured, and says so
    assert all(r.window.grad_norm_max is None and r.window.grad_norm_steps == 0 for r in records)
    assert nonfinite_step(after) is None  # not measured is not non-finite
    diagnoser = Diagnoser(header)
    verdicts = [diagnoser.update(r) for r in records if r.step <= SPIKE_AT + 1][-1]
    spikes = [v for v in verdicts if v.kind == "spike"]
    assert spikes and spikes[0].evidence["step"] == SPIKE_AT and spikes[0].evidence["sampled"] is False


def test_trainer_clip_by_norm_counts_the_norm_it_computes_anyway(monkeypatch):
    _, records = _trainer_run(monkeypatch, steps=6, clip="norm", clip_threshold=1e6)
    for r in records[1:]:
        assert r.window.grad_norm_steps == r.window.steps == 2
        assert r.window.grad_norm_last == pytest.approx(r.grad_norm_total, rel=RTOL)
        assert r.window.grad_norm_max >= r.window.grad_norm_min > 0


def test_trainer_window_false_turns_it_all_off():
    from vgtui.trainer import run_to_completion
    preset = load_preset("relu-he").replace(depth=2, width=16, batch_size=4, sample_every=2)
    records = [r for r in run_to_completion(preset, 4, window=False) if isinstance(r, StepRecord)]
    assert records and all(r.window is None for r in records)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _watch_run(steps=5, clip=None, **options):
    """A plain loop under ``vgtui.watch`` measured every 4th step; the loss of step 2 (unmeasured)
    is scaled by 50. Returns the records and, per step, the loop's own loss and global norm before
    clipping (computed here with torch.autograd.grad, independently of vgtui)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    channel = Channel()
    watcher = vgtui.watch(model, optimizer=opt, channel=channel, sample_every=4, overhead_budget=None,
                          diagnose=False, **options)
    g = torch.Generator().manual_seed(15)
    losses, norms = [], []
    for step in range(steps):
        loss = F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g))
        if step == 2:
            loss = loss * 50
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        norms.append(float(torch.stack([gr.norm() for gr in grads]).norm()))
        loss.backward()
        losses.append(float(loss.detach()))
        if clip == "watcher":
            watcher.clip_grad_norm_(1.0)
        elif clip in ("torch", "torch+note"):  # the user's own clip after before_clip
            watcher.before_clip()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if clip == "torch+note":
                watcher.note_grad_norm(total)
        watcher.step(opt, loss)
        opt.step()
        opt.zero_grad()
    watcher.close()
    return [r for r in channel.drain() if isinstance(r, StepRecord)], losses, norms


def test_watch_on_the_cpu_counts_every_loss_by_default():
    (first, second), losses, _ = _watch_run()
    assert (first.step, first.window.steps) == (0, 1) and (second.step, second.window.steps) == (4, 4)
    w = second.window
    assert (w.first_step, w.loss_max_step) == (1, 2)
    assert w.loss_max == pytest.approx(losses[2], rel=RTOL) and w.loss_min == pytest.approx(min(losses[1:]), rel=RTOL)
    assert w.loss_mean == pytest.approx(sum(losses[1:]) / 4, rel=RTOL)
    assert w.grad_norm_steps == 0 and w.grad_norm_max is None and w.grad_norm_max_step is None


@pytest.mark.parametrize("clip,options", [("watcher", {}), ("torch+note", {}), (None, {"window": True})])
def test_watch_counts_the_norm_where_clipping_returns_it_or_when_asked(clip, options):
    (_, second), _, norms = _watch_run(clip=clip, **options)
    w = second.window
    assert w.grad_norm_steps == 4 and w.grad_norm_max_step == 2
    assert w.grad_norm_max == pytest.approx(norms[2], rel=RTOL)
    assert w.grad_norm_min == pytest.approx(min(norms[1:]), rel=RTOL)
    assert w.grad_norm_mean == pytest.approx(sum(norms[1:]) / 4, rel=RTOL)
    assert w.grad_norm_last == pytest.approx(norms[4], rel=RTOL)


def test_watch_users_own_clip_leaves_the_norm_unmeasured():
    (_, second), losses, _ = _watch_run(clip="torch")
    assert second.window.grad_norm_steps == 0 and second.window.loss_max_step == 2


def test_device_and_host_accumulators_agree_when_the_norm_comes_and_goes():
    """The tensor path (CUDA's) run on CPU tensors against the float path, norms on some steps."""
    steps = [(1.0, None), (5.0, 2.0), (2.0, None), (3.0, 7.0), (float("nan"), 1.0), (0.5, None)]
    for upto in range(1, len(steps) + 1):
        host, device = WindowMeter(), WindowMeter()
        for i, (loss, norm) in enumerate(steps[:upto]):
            host.add(10 + i, torch.tensor(loss), None if norm is None else torch.tensor(norm))
            device._add_device(10 + i, torch.tensor(loss), None if norm is None else torch.tensor(norm))
            device.steps += 1
            device.norm_steps += norm is not None
        a, b = window_record(*host.take()), window_record(*_numpy(device.take()))
        for f in dataclasses.fields(StepWindow):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6, nan_ok=True), (upto, f.name)
        seen = [n for _, n in steps[:upto] if n is not None]
        assert a.grad_norm_steps == len(seen) and (a.grad_norm_max is None) == (not seen)


def _numpy(taken):
    values, meta = taken
    return values.double().numpy(), meta


def _window(**norm):
    base = dict(steps=3, first_step=7, loss_min=0.5, loss_max=4.0, loss_mean=1.5, loss_last=0.5, loss_max_step=8)
    return StepWindow(**base, **norm)


def _record(step, window):
    from vgtui.records import LAYER_METRICS
    import numpy as np
    layers = {m: np.array([1.0, 2.0]) for m in LAYER_METRICS}
    return StepRecord(step=step, loss=0.5, accuracy=float("nan"), grad_norm_total=1.0, grad_norm_clipped=1.0,
                      clipped=False, layers=layers, hist=None, window=window)


UNMEASURED = dict(grad_norm_min=None, grad_norm_max=None, grad_norm_mean=None, grad_norm_last=None,
                  grad_norm_max_step=None, grad_norm_steps=0)
MEASURED = dict(grad_norm_min=1.0, grad_norm_max=float("inf"), grad_norm_mean=2.0, grad_norm_last=1.0,
                grad_norm_max_step=9, grad_norm_steps=3)


@pytest.mark.parametrize("name,version", [("run.jsonl", 2), ("run.jsonl", 1), ("run.jsonl.gz", 2)])
def test_windows_with_and_without_the_norm_round_trip(tmp_path, name, version):
    header = RunHeader(preset={}, layers=["a", "b"], layer_kinds=["linear", "linear"], device="cpu")
    written = [_record(9, _window(**UNMEASURED)), _record(12, _window(**MEASURED))]
    path = tmp_path / name
    with JsonlWriter(path, version=version) as writer:
        writer.write_all([header, *written])
    for read in (lambda: read_recording(path).records, lambda: list(RecordingIndex(path))):
        _, unmeasured, measured = read()
        assert unmeasured.window == written[0].window
        assert measured.window.grad_norm_max == math.inf and measured.window.grad_norm_steps == 3
        assert nonfinite_step(unmeasured) is None and nonfinite_step(measured) == 9


def test_recordings_from_before_the_norm_could_be_left_out_read_as_measured(tmp_path):
    """A version-2 file whose header lists the window fields without ``grad_norm_steps``."""
    header = RunHeader(preset={}, layers=["a", "b"], layer_kinds=["linear", "linear"], device="cpu")
    path = tmp_path / "old.jsonl"
    with JsonlWriter(path, version=2) as writer:
        writer.write_all([header, _record(9, _window(**MEASURED))])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for data in lines:
        if "window_fields" in data:
            data["window_fields"].remove("grad_norm_steps")
        if isinstance(data.get("window"), list):
            data["window"].pop()
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    _, record = read_recording(path).records
    assert record.window.grad_norm_steps == 3 and record.window.grad_norm_max_step == 9


def test_accelerate_clip_grad_norm_hands_its_norm_to_the_window():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from vgtui.integrations.accelerate import watch

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        net = _mlp()
        model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.01))
        channel = Channel()
        watcher = watch(accelerator, model, optimizer, channel=channel, sample_every=3, overhead_budget=None,
                        diagnose=False)
        g = torch.Generator().manual_seed(3)
        norms = []
        for _ in range(4):
            loss = F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 2, generator=g))
            grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
            norms.append(float(torch.stack([gr.norm() for gr in grads]).norm()))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
            watcher.step(optimizer, loss)
            optimizer.step()
            optimizer.zero_grad()
        watcher.close()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    first, second = [r for r in channel.drain() if isinstance(r, StepRecord)]
    w = second.window
    assert (second.step, w.steps, w.grad_norm_steps) == (3, 3, 3)
    assert w.grad_norm_max == pytest.approx(max(norms[1:]), rel=RTOL)
    assert w.grad_norm_min == pytest.approx(min(norms[1:]), rel=RTOL)
    assert w.grad_norm_last == pytest.approx(norms[3], rel=RTOL)
