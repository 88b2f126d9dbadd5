"""The training thread: controls, switching, errors delivered as records, determinism."""

import time

import numpy as np
import pytest

from vgtui.channel import Channel
from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.records import RunError, RunEvent, RunHeader, StepRecord
from vgtui.trainer import Trainer, TrainerController

TINY = {"depth": 2, "width": 32, "batch_size": 16}


def tiny(name="relu-he", **changes):
    return load_preset(name).replace(**{**TINY, **changes})


def steps_of(records):
    return [r for r in records if isinstance(r, StepRecord)]


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_runs_max_steps_and_finishes():
    channel = Channel(10_000)
    trainer = Trainer(tiny(), channel, max_steps=7)
    trainer.start()
    trainer.join(20)
    records = channel.drain()
    assert isinstance(records[0], RunHeader)
    assert [r.step for r in steps_of(records)] == list(range(7))
    assert any(isinstance(r, RunEvent) and r.kind == "finished" for r in records)


def test_sample_every_measures_every_nth_step():
    channel = Channel(10_000)
    trainer = Trainer(tiny(sample_every=3), channel, max_steps=10)
    trainer.start()
    trainer.join(20)
    assert [r.step for r in steps_of(channel.drain())] == [0, 3, 6, 9]


def test_pause_single_step_resume_stop():
    channel = Channel(10_000)
    trainer = Trainer(tiny(), channel, start_paused=True)
    trainer.start()
    assert wait_until(lambda: trainer.is_alive())
    time.sleep(0.3)
    assert trainer.step == 0  # paused from the start
    trainer.single_step()
    assert wait_until(lambda: trainer.step == 1)
    trainer.single_step()
    trainer.single_step()
    assert wait_until(lambda: trainer.step == 3)
    time.sleep(0.3)
    assert trainer.step == 3  # still paused after single steps
    trainer.resume()
    assert wait_until(lambda: trainer.step > 10)
    trainer.pause()
    assert wait_until(lambda: trainer.paused)
    time.sleep(0.1)
    frozen = trainer.step
    time.sleep(0.3)
    assert trainer.step == frozen
    started = time.monotonic()
    trainer.stop()
    trainer.join(5)
    assert not trainer.is_alive()
    kinds = [r.kind for r in channel.drain() if isinstance(r, RunEvent)]
    assert "paused" in kinds and "resumed" in kinds and kinds[-1] == "stopped"
    assert time.monotonic() - started < 5


def test_stop_while_running_returns_promptly():
    channel = Channel(100)
    trainer = Trainer(load_preset("sigmoid-deep"), channel)
    trainer.start()
    assert wait_until(lambda: trainer.step >= 1, 60)
    trainer.stop()
    trainer.join(5)
    assert not trainer.is_alive()


def test_switch_replaces_the_thread_and_replays_the_same_batches():
    channel = Channel(10_000)
    controller = TrainerController(channel, max_steps=3)
    first = controller.start(tiny("sigmoid-deep"))
    assert wait_until(lambda: not first.is_alive())
    second = controller.start(tiny("relu-he"))
    assert not first.is_alive() and second is not first
    second.join(20)
    records = channel.drain()
    headers = [r for r in records if isinstance(r, RunHeader)]
    assert [h.run_id for h in headers] == [1, 2]
    assert headers[1].preset["activation"] == "relu"
    # Same seed, same batches, whatever the preset: batch i is a pure function of (seed, i).
    a, b = SyntheticData(0, 16), SyntheticData(0, 16)
    for i in (0, 1, 57):
        assert (a.batch(i)[0] == b.batch(i)[0]).all() and (a.batch(i)[1] == b.batch(i)[1]).all()
    assert not (a.batch(0)[0] == a.batch(1)[0]).all()


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        channel = Channel(10_000)
        trainer = Trainer(tiny(), channel, max_steps=4)
        trainer.start()
        trainer.join(20)
        runs.append(steps_of(channel.drain()))
    for a, b in zip(*runs):
        assert a.loss == b.loss
        np.testing.assert_array_equal(a.layers["act_grad_norm"], b.layers["act_grad_norm"])


def test_exception_in_thread_becomes_a_record(tmp_path):
    channel = Channel(10_000)
    trainer = Trainer(tiny(data="fashion-mnist"), channel, max_steps=3, data_root=tmp_path)
    trainer.start()
    trainer.join(20)
    errors = [r for r in channel.drain() if isinstance(r, RunError)]
    assert len(errors) == 1
    assert "train-images-idx3-ubyte" in errors[0].message
    assert "Traceback" in errors[0].traceback


def test_exploding_names_where_nan_began():
    channel = Channel(10_000)
    trainer = Trainer(load_preset("exploding"), channel, max_steps=12)
    trainer.start()
    trainer.join(60)
    steps = steps_of(channel.drain())
    bad = [r for r in steps if r.nonfinite]
    assert bad, "the exploding preset must reach a non-finite value within 12 steps"
    first = bad[0]
    assert first.nonfinite[1] in ("forward", "backward")
    assert first.nonfinite[0] in ("output", "loss") or first.nonfinite[0].startswith("hidden")
    clipped = Trainer(load_preset("exploding-clipped"), channel, max_steps=12)
    clipped.start()
    clipped.join(60)
    steps = steps_of(channel.drain())
    assert all(r.nonfinite is None for r in steps)
    assert all(r.clipped for r in steps)


def test_channel_drops_oldest_and_counts():
    channel = Channel(3)
    for i in range(10):
        channel.put(i)
    assert channel.drain() == [7, 8, 9]
    assert channel.dropped == 7


def test_overhead_budget_widens_and_narrows_the_interval(monkeypatch):
    from vgtui import trainer as trainer_module

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock["now"])
    budget = trainer_module.OverheadBudget(0.02, floor=1)
    interval, probe_seconds = 1, 0.0
    # The probe takes 10% of each 0.1 s step: five times the budget.
    for _ in range(40):
        clock["now"] += 0.1
        probe_seconds += 0.01 / interval
        interval = budget.update(interval, probe_seconds)
    assert budget.share < 0.02 and interval >= 5
    # Now it costs nearly nothing: the interval comes back down to the user's floor.
    for _ in range(400):
        clock["now"] += 0.1
        interval = budget.update(interval, probe_seconds)
    assert interval == 1


def test_overhead_budget_keeps_up_with_slow_steps(monkeypatch):
    """2 s per step, the probe at 10 %: the interval must widen within a few windows, not wait
    for three intervals of slow steps each time."""
    from vgtui import trainer as trainer_module

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock["now"])
    budget = trainer_module.OverheadBudget(0.02, floor=1)
    interval, probe_seconds, history, windows = 1, 0.0, [], 0
    for step in range(40):
        clock["now"] += 2.0
        if step % interval == 0:
            probe_seconds += 0.2  # 10 % of a step, on sampled steps
        interval = budget.update(interval, probe_seconds)
        windows += budget._steps == 0  # a window closed and the share was re-measured
        history.append(interval)
    assert history[2] > 1  # first window: three steps
    assert budget.share <= 0.02 and interval >= 5
    assert windows >= 4  # one interval per window once 10 s have passed (3 intervals: only 2)


def test_slow_consumer_memory_is_bounded_and_newest_data_kept():
    """Nobody drains the channel while 300 steps train: it holds 50, counts the rest as dropped."""
    channel = Channel(50)
    trainer = Trainer(tiny(depth=1, width=8), channel, max_steps=300)
    trainer.start()
    trainer.join(60)
    records = channel.drain()
    assert len(records) == 50
    assert channel.dropped > 250
    assert max(r.step for r in steps_of(records)) == 299
    assert isinstance(records[-1], RunEvent) and records[-1].kind == "finished"


def test_out_of_memory_in_the_thread_is_delivered(monkeypatch):
    import torch

    from vgtui import trainer as trainer_module

    real_build = trainer_module.build_model

    def build_that_runs_out(preset, device):
        built = real_build(preset, device)

        def forward(x, taps=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

        built.model.forward = forward
        return built

    monkeypatch.setattr(trainer_module, "build_model", build_that_runs_out)
    channel = Channel(1000)
    trainer = Trainer(tiny(), channel, max_steps=5)
    trainer.start()
    trainer.join(30)
    errors = [r for r in channel.drain() if isinstance(r, RunError)]
    assert len(errors) == 1 and "out of memory" in errors[0].message
    assert not trainer.is_alive()


def test_probe_clock_counts_only_what_it_brackets():
    import torch

    from vgtui.trainer import ProbeClock

    clock = ProbeClock(torch.device("cpu"))
    clock.stop()  # nothing started: nothing counted
    assert clock.seconds() == 0.0
    before = time.perf_counter()
    clock.start()
    time.sleep(0.02)
    clock.stop()
    bracket = time.perf_counter() - before
    time.sleep(0.05)  # outside the bracket: not counted
    assert 0.02 <= clock.seconds() <= bracket


class CountingClock:
    """A stand-in for ProbeClock that records how it is driven."""

    def __init__(self):
        self.starts = self.stops = 0
        self.running = False

    def start(self):
        assert not self.running, "the clock was started twice without a stop"
        self.running = True
        self.starts += 1

    def stop(self):
        assert self.running
        self.running = False
        self.stops += 1

    def seconds(self):
        return 0.0


@pytest.mark.parametrize("clip", ["none", "norm"])
def test_the_probe_charges_its_own_work_on_sampled_steps_only(clip):
    import torch

    from vgtui.models import build_model, make_optimizer
    from vgtui.probe import Probe

    preset = tiny(clip=clip)
    built = build_model(preset)
    model, clock = built.model, CountingClock()
    optimizer = make_optimizer(model.parameters(), preset)
    probe = Probe(built.layers, list(model.parameters()), owns_backward=True, clock=clock)
    data = SyntheticData(0, 16)
    for step, sampled in enumerate([False, True]):
        before = clock.starts
        x, y = data.batch(step)
        probe.begin(sampled)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe.forward(model, x), y)
        probe.backward(loss)
        probe.after_backward()
        probe.clip(clip, 1.0)
        probe.count(step, loss)
        probe.before_step(optimizer)
        optimizer.step()
        probe.finish(step, loss, None, optimizer)
        with probe.timed():
            records = probe.poll()
        # unsampled: only the caller's own bracket; sampled: after_backward, before_step, finish,
        # the caller's, and clip when it only measures (clipping the user asked for is theirs)
        assert clock.starts - before == (4 + (clip == "none") if sampled else 1)
        assert clock.starts == clock.stops and not clock.running
        assert len(records) == int(sampled)
