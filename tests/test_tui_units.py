"""Fast TUI tests with no training thread: replay seeking, bad recordings, palette, errors,
renderers, and that textual stays out of the core import path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from vgtui.records import StepRecord
from vgtui.tui import render as R
from vgtui.tui.app import make_app
from vgtui.tui.sources import ReplaySource
from vgtui.tui.state import RunState

from tui_helpers import dashboard, sync, wait_for
from tui_snapshot_app import recording, records, scripted_app, screen_text, training_error


@sync
async def test_replay_seeking():
    source = ReplaySource(recording("exploding"))
    app = make_app(source)
    async with app.run_test(size=(80, 24)) as pilot:
        dash = dashboard(app)
        last = len(source.step_index) - 1
        assert dash.position == last and dash.state.last.step == 19
        await pilot.press("left", "left")
        assert dash.state.last.step == 17
        await pilot.press("home")
        assert dash.state.last.step == 0 and len(dash.state.steps) == 1
        await pilot.press("right")
        assert dash.state.last.step == 1
        await pilot.press("f")
        assert dash.state.last.nonfinite is not None
        assert dash.state.last.step == dash.state.nonfinite[0]
        previous = source.records[source.step_index[dash.position - 1]]
        assert previous.nonfinite is None
        await pilot.press("end")
        assert dash.state.last.step == 19
        await pilot.press("n")  # at the end: stays
        assert dash.position == last
        footer = screen_text(app).splitlines()[-1]
        assert "play" in footer and "pause" not in footer  # space plays a replay
        await pilot.press("space")  # at the end: plays from the start
        assert dash.cursor.playing and dash.position < last  # restarted from the first step
        await pilot.press("space")
        assert not dash.cursor.playing
        await pilot.press("r")  # not available in replay: the app says so and carries on
        await pilot.press("q")


@sync
async def test_help_key_stays_in_the_footer_down_to_the_minimum_width():
    from textual.widgets._footer import FooterKey

    app = make_app(ReplaySource(recording("exploding")))
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.pause(0.1)
        keys = [key for key in dashboard(app).query(FooterKey) if key.region.width]
        assert keys and keys[0].action == "help" and keys[0].region.right <= 40


@sync
async def test_bad_lines_are_reported(tmp_path):
    lines = recording("relu-he").read_text().splitlines()
    lines[3] = "{not json"
    lines[7] = '{"type": "step", "step": "x"}'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines[:20]) + "\n" + lines[20][:50])
    source = ReplaySource(path)
    assert len(source.problems) == 3
    app = make_app(source)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "3 bad line(s) skipped" in text
        assert "line 4, 8, 21" in text
        await pilot.press("q")


@sync
async def test_error_panel_and_switch_after_error():
    app = scripted_app("sigmoid-deep", extra=[training_error()])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "training failed at step 60" in text and "failed" in text.splitlines()[0]
        await pilot.press("2")
        assert ("switch", "relu-he") in app.source.calls
        await pilot.press("x")


@sync
async def test_command_palette_switches_preset():
    app = scripted_app("sigmoid-deep")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"relu-30-he")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert ("switch", "relu-30-he") in app.source.calls


@sync
async def test_keys_reach_the_source():
    app = scripted_app("relu-he")
    async with app.run_test(size=(80, 24)) as pilot:
        dash = dashboard(app)
        await pilot.press("space")
        await wait_for(pilot, lambda: dash.state.paused)
        await pilot.press("space", "n", "plus", "plus", "minus", "r")
        calls = app.source.calls
        assert ("pause",) in calls and ("resume",) in calls and ("step",) in calls
        assert [c for c in calls if c[0] == "sample_every"] == [("sample_every", 2), ("sample_every", 5),
                                                                  ("sample_every", 2)]
        assert ("restart",) in calls
        await wait_for(pilot, lambda: dash.state.n_layers > 0)
        for _ in range(4):
            await pilot.press("v")
        assert dash.view == "dash"
        await pilot.press("down", "down", "down")
        assert dash.selected == 3
        await pilot.press("question_mark")
        assert "vgtui — keys" in screen_text(app)
        await pilot.press("escape")
        await pilot.press("q")


@sync
async def test_help_is_built_once_and_rewrapped_when_the_terminal_changes():
    from textual.widgets import Static

    from vgtui.tui.app import HelpScreen

    app = scripted_app("sigmoid-deep")
    async with app.run_test(size=(60, 30)) as pilot:
        await pilot.press("question_mark")
        first = app.screen
        assert isinstance(first, HelpScreen)
        narrow = str(first.query_one(Static).render())
        await pilot.press("escape")
        await pilot.resize_terminal(120, 30)
        await pilot.pause()
        await pilot.press("question_mark")
        assert app.screen is first  # the same screen, kept
        wide = str(first.query_one(Static).render())
        assert narrow.count("\n") > wide.count("\n")  # the preset list took fewer lines
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@sync
async def test_compare_switches_one_side_and_restarts_both_on_the_same_seed():
    from vgtui.config import load_preset
    from vgtui.tui.app import Compare
    from scripted_source import ScriptedSource

    a, b = ScriptedSource(records("sigmoid-deep")), ScriptedSource(records("relu-he"))
    a.preset, b.preset = load_preset("sigmoid-deep").replace(seed=7), load_preset("relu-he").replace(seed=7)
    app = make_app(compare=(a, b))
    async with app.run_test(size=(120, 40)) as pilot:
        compare = next(s for s in app.screen_stack if isinstance(s, Compare))
        await wait_for(pilot, lambda: compare.sides[1].state.n_layers > 0)
        compare.switch_side(1, "sigmoid-batchnorm")
        assert b.calls[-1] == ("switch", "sigmoid-batchnorm") and b.preset.seed == 7
        assert a.calls[-1] == ("restart",)
        await wait_for(pilot, lambda: compare.sides[0].state.n_layers > 0)
        await pilot.press("v", "v", "down")
        assert compare.view == "hist" and compare.selected == 1
        await pilot.press("p")
        await pilot.pause(0.1)
        assert type(app.screen).__name__ == "PresetPicker"
        await pilot.press("escape")
        await pilot.press("q")


@sync
async def test_too_small_then_big_again():
    app = scripted_app("sigmoid-deep")
    async with app.run_test(size=(30, 8)) as pilot:
        await pilot.pause()
        assert "terminal too small" in screen_text(app)
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert "terminal too small" not in screen_text(app)
        assert "hidden1" in screen_text(app)


def test_no_color_means_mono(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = scripted_app("sigmoid-deep")
    assert app.mono


def test_core_imports_stay_free_of_textual():
    code = ("import sys, vgtui, vgtui.cli, vgtui.tui, vgtui.trainer, vgtui.jsonl; "
            "vgtui.cli.build_parser(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext', 'plotext'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def test_state_ignores_stragglers_and_bounds_history():
    recs = records("relu-he")
    state = RunState(maxlen=10)
    state.feed(recs)
    assert len(state.steps) == 10 and state.last.step == 59
    straggler = next(r for r in recs if isinstance(r, StepRecord))
    straggler.run_id = 99
    assert not state.feed([straggler])


def test_renderers_fit_their_width():
    recs = records("relu-30-xavier")
    state = RunState()
    state.feed(recs)
    for width in (40, 80, 200):
        for text in (R.layer_rows(state, width, ["act_grad_norm", "weight_grad_norm"], 0, False),
                     R.heatmap(state, width, 20, "act_grad_norm", False),
                     R.histogram(state, 0, width, 14, False),
                     R.activations(state, width, 0, False)):
            assert max(len(line) for line in text.plain.splitlines()) <= max(width, 52)


def test_heatmap_groups_many_layers():
    logged = np.log10(np.abs(np.random.default_rng(0).normal(size=(120, 50))) + 1e-3)
    cells, groups = R.bin_rows(logged, 30)
    assert cells.shape == (30, 50) and groups[0][0] == 0 and groups[-1][1] == 119
    logged[5, 3] = np.nan
    assert np.isnan(R.bin_columns(logged, 10)[5]).any()


def test_follow_source_survives_a_truncating_writer(tmp_path):
    from vgtui.jsonl import JsonlWriter
    from vgtui.records import RunHeader
    from vgtui.tui.sources import FollowSource

    path = tmp_path / "run.jsonl"
    source = FollowSource(path)
    assert source.poll() == []  # no file yet
    recs = records("exploding")
    with JsonlWriter(path) as out:
        out.write_all(recs)
    first = source.poll()
    assert isinstance(first[0], RunHeader) and len(first) == len(recs)
    with JsonlWriter(path) as out:  # a new run rewrites the file from the start
        out.write_all(recs[:5])
    again = source.poll()
    assert source.restarts == 1 and isinstance(again[0], RunHeader) and len(again) == 5
    assert not source.problems


@sync
async def test_resized_repeatedly_in_every_view():
    """Down to 40×12 and below, in every view, over and over: no crash, and a clear message when
    the terminal is too small."""
    app = scripted_app("relu-30-xavier")
    sizes = [(120, 40), (40, 12), (39, 11), (200, 50), (80, 24), (41, 13), (25, 6), (100, 30)]
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for view in range(4):
            for width, height in sizes:
                await pilot.resize_terminal(width, height)
                await pilot.pause()
                text = screen_text(app)
                too_small = width < 40 or height < 12
                assert ("terminal too small" in text) == too_small, (view, width, height)
            await pilot.press("v")
        await pilot.press("q")
