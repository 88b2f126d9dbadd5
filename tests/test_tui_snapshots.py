"""Snapshots of every screen and view at 80×24, 120×40 (and every view at 200×60), fed from the
fixed recordings in tests/data (no training thread, no clock, pinned theme): two MLP presets, a
24-block Llama (219 layers) and a resnet18 recorded with vgtui.watch, a tanh RNN for the
through-time view. Update with
`pytest tests/test_tui_snapshots.py --snapshot-update` and review the report before committing."""

from __future__ import annotations

import pytest

from tui_snapshot_app import (
    compare_app,
    replay_app,
    scripted_app,
    training_error,
    with_verdicts,
    without_verdicts,
)

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
ALL_SIZES = SIZES + [pytest.param((200, 60), id="200x60")]
VIEWS = {"dashboard": [], "heatmap": ["v"], "histogram": ["v", "v"], "activations": ["v", "v", "v"]}


@pytest.mark.parametrize("size", ALL_SIZES)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name", ["sigmoid-deep", "relu-30-xavier", "llama24", "resnet18"])
def test_view(snap_compare, name, view, size):
    """Every view of every model at every size; the third row (or block) selected."""
    assert snap_compare(scripted_app(name), press=["down", "down"] + VIEWS[view], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["relu-he", "exploding"])
def test_dashboard(snap_compare, name, size):
    assert snap_compare(scripted_app(name), terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_through_time(snap_compare, size):
    assert snap_compare(scripted_app("rnn"), press=["v", "v", "v", "v"], terminal_size=size)


def test_llama_with_a_block_open(snap_compare):
    """enter opens layers.1 in place (its nine layers, indented)."""
    assert snap_compare(scripted_app("llama24"), press=["down", "down", "enter"], terminal_size=(120, 40))


def test_llama_every_layer_heatmap(snap_compare):
    """219 layers in 31 text rows: half blocks, each cell the weakest of a group of layers, each
    row labelled with its first layer."""
    assert snap_compare(scripted_app("llama24"), press=["b", "v"], terminal_size=(120, 40))


def test_light_theme(snap_compare):
    async def light(pilot):
        pilot.app.theme = "textual-light"

    assert snap_compare(scripted_app("sigmoid-deep"), run_before=light, terminal_size=(120, 40))


@pytest.mark.parametrize("size", SIZES)
def test_preset_picker(snap_compare, size):
    assert snap_compare(scripted_app("sigmoid-deep"), press=["p"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, size):
    assert snap_compare(scripted_app("sigmoid-deep"), press=["question_mark"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_error_panel(snap_compare, size):
    app = scripted_app("sigmoid-deep", extra=[training_error()],
                       problems=["run.jsonl:7: skipped (Expecting value: line 1 column 1 (char 0))",
                                 "run.jsonl:12: truncated last line skipped"])
    assert snap_compare(app, terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_verdicts(snap_compare, size):
    assert snap_compare(scripted_app("sigmoid-deep", recs=with_verdicts("sigmoid-deep")), terminal_size=size)


def test_no_verdict_yet(snap_compare):
    assert snap_compare(scripted_app("sigmoid-deep", recs=without_verdicts("sigmoid-deep")),
                        terminal_size=(80, 24))


@pytest.mark.parametrize("size", SIZES)
def test_paused(snap_compare, size):
    assert snap_compare(scripted_app("relu-he"), press=["space"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_replay_seek(snap_compare, size):
    assert snap_compare(replay_app("sigmoid-deep"), press=["left"] * 10, terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_replay_first_nonfinite(snap_compare, size):
    assert snap_compare(replay_app("exploding"), press=["f"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
def test_compare(snap_compare, size):
    assert snap_compare(compare_app("sigmoid-deep", "relu-he"), terminal_size=size)


@pytest.mark.parametrize("view,keys", [("heatmap", ["v"]), ("histogram", ["v", "v", "down"])])
def test_compare_views(snap_compare, view, keys):
    assert snap_compare(compare_app("sigmoid-deep", "relu-he"), press=keys, terminal_size=(120, 40))


def test_mono(snap_compare):
    assert snap_compare(scripted_app("sigmoid-deep", mono=True), terminal_size=(80, 24))


def test_mono_heatmap(snap_compare):
    assert snap_compare(scripted_app("relu-30-xavier", mono=True), press=["v"], terminal_size=(80, 24))


def test_mono_llama_histograms(snap_compare):
    assert snap_compare(scripted_app("llama24", mono=True), press=["v", "v"], terminal_size=(120, 40))


def test_too_small(snap_compare):
    assert snap_compare(scripted_app("sigmoid-deep"), terminal_size=(36, 10))


@pytest.mark.parametrize("size", [pytest.param((120, 40), id="120x40"), pytest.param((200, 60), id="200x60")])
def test_activations_over_a_long_sigmoid_run(snap_compare, size):
    """Glorot & Bengio's picture: over 2,000 steps of sigmoid-deep the top hidden layer's band
    sinks from 0.5 toward 0 while the layers below stay near 0.5."""
    assert snap_compare(replay_app("sigmoid-deep-long"), press=["v", "v", "v"], terminal_size=size)
