"""Pilot tests against a real training thread (a tiny network), and attach following a file that
a writer thread appends to. No wall-clock thresholds: waits only bound how long a failure takes."""

from __future__ import annotations

import threading

import pytest

from vgtui.config import load_preset
from vgtui.jsonl import JsonlWriter
from vgtui.records import RunHeader, StepRecord
from vgtui.tui.app import make_app
from vgtui.tui.sources import FollowSource, LiveSource

from tui_helpers import dashboard, sync, wait_for
from tui_snapshot_app import records, screen_text

SIZE = (100, 30)


def tiny(name: str = "shallow"):
    return load_preset(name).replace(depth=2, width=32, batch_size=20)


def trainer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vgtui-trainer") and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    for thread in trainer_threads():
        thread.join(10)
    assert not trainer_threads()


@sync
async def test_pause_resume_and_single_step():
    source = LiveSource(tiny(), paused=True)
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        dash = dashboard(app)
        await wait_for(pilot, lambda: dash.state.header is not None and dash.state.paused)
        assert source.trainer.step == 0 and dash.state.last is None
        await pilot.press("n")
        await wait_for(pilot, lambda: dash.state.last is not None)
        assert dash.state.last.step == 0
        await pilot.press("n")
        await wait_for(pilot, lambda: dash.state.last.step == 1)
        await pilot.pause(0.3)
        assert source.trainer.step == 2  # paused: two single steps, no more
        assert "paused" in screen_text(app)
        await pilot.press("space")  # resume
        await wait_for(pilot, lambda: dash.state.last.step >= 5 and not dash.state.paused)
        await pilot.press("space")  # pause again
        await wait_for(pilot, lambda: dash.state.paused)
        await pilot.pause(0.2)
        frozen = source.trainer.step
        await pilot.pause(0.3)
        assert source.trainer.step == frozen
        await pilot.press("plus")
        assert source.sample_every == 2
        await pilot.press("q")
    assert not source.controller.alive


@sync
async def test_switch_preset_with_number_key_and_picker(monkeypatch):
    import vgtui.tui.app as tui_app

    # the number keys and the picker load presets by name: keep them tiny here
    real_load = tui_app.__dict__.get("load_preset")
    from vgtui import config

    monkeypatch.setattr(config, "load_preset", lambda name: tiny(name) if isinstance(name, str)
                        and "/" not in name else real_load(name))
    source = LiveSource(tiny())
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        dash = dashboard(app)
        await wait_for(pilot, lambda: dash.state.last is not None)
        first = source.trainer
        await pilot.press("2")  # relu-he
        assert not first.is_alive()
        assert source.preset.name == "relu-he" and source.trainer is not first
        await wait_for(pilot, lambda: dash.state.preset_name == "relu-he" and dash.state.last is not None)
        second = source.trainer
        await pilot.press("p")
        await pilot.pause()
        await pilot.press("down", "down", "enter")  # from relu-he to sigmoid-residual
        await wait_for(pilot, lambda: source.preset.name == "sigmoid-residual")
        assert not second.is_alive()
        await wait_for(pilot, lambda: dash.state.preset_name == "sigmoid-residual")
        assert len(trainer_threads()) == 1
    assert not source.controller.alive
    assert not trainer_threads()


@sync
async def test_quit_stops_the_trainer():
    source = LiveSource(tiny())
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        dash = dashboard(app)
        await wait_for(pilot, lambda: dash.state.last is not None and dash.state.last.step > 2)
        thread = source.trainer
        await pilot.press("q")
    assert not thread.is_alive()
    assert not trainer_threads()


@sync
async def test_attach_follows_a_growing_file(tmp_path):
    path = tmp_path / "run.jsonl"
    recs = records("relu-he")
    steps = [r for r in recs if isinstance(r, StepRecord)]
    go = threading.Event()
    release = threading.Event()

    def writer():
        go.wait(30)
        with JsonlWriter(path) as out:
            for record in recs:
                out.write(record)
                if isinstance(record, StepRecord) and record.step == 20:
                    release.wait(30)  # the writer pauses mid-run
        # and finishes with a torn last line, as a killed writer would leave it
        with open(path, "a") as handle:
            handle.write('{"type": "step", "ste')

    thread = threading.Thread(target=writer)
    thread.start()
    source = FollowSource(path)
    app = make_app(source)
    try:
        async with app.run_test(size=SIZE) as pilot:
            dash = dashboard(app)
            await pilot.pause(0.2)
            assert "waiting for" in screen_text(app)  # the file does not exist yet
            go.set()
            await wait_for(pilot, lambda: dash.state.last is not None and dash.state.last.step == 20)
            assert isinstance(dash.state.header, RunHeader)
            release.set()
            await wait_for(pilot, lambda: dash.state.last.step == steps[-1].step)
            assert dash.state.finished == "finished"
            await pilot.press("q")
    finally:
        go.set()
        release.set()
        thread.join(10)
    assert not source.problems  # the torn line is still "partial", never a false problem


@sync
async def test_training_error_is_shown_and_the_app_stays_usable(tmp_path, monkeypatch):
    from vgtui import config

    real_load = config.load_preset
    monkeypatch.setattr(config, "load_preset", lambda name: tiny(name) if isinstance(name, str)
                        and "/" not in name else real_load(name))
    # MNIST with an empty data folder and no download: the trainer thread fails at once
    source = LiveSource(tiny().replace(data="mnist"), data_root=tmp_path)
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        dash = dashboard(app)
        await wait_for(pilot, lambda: dash.state.errors)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "training failed" in text and "press r to restart or p to pick another preset" in text
        await pilot.press("1")  # another preset: a fresh run, the error is gone
        await wait_for(pilot, lambda: dash.state.last is not None)
        assert not dash.state.errors and "training failed" not in screen_text(app)
        await pilot.press("q")
    assert not source.controller.alive
