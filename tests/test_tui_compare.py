"""The compare screen with recurrent and deep models: the through-time view side by side on one
log scale (a tanh RNN against an LSTM, recorded by tests/data/regenerate.py), blocks
that expand in place on both runs, and the selection across views and the layer/block toggle.
Snapshots: tests/__snapshots__/test_tui_compare/ (update with --snapshot-update, then look)."""

from __future__ import annotations

import numpy as np
import pytest

from vgtui.formatting import fmt
from vgtui.tui import render as R
from vgtui.tui import rows as rowplan
from vgtui.tui.app import Compare
from vgtui.tui.state import RunState

from tui_helpers import sync
from tui_snapshot_app import compare_app, records, screen_text

TANH, LSTM = "compare-rnn-tanh", "compare-lstm"
TO_TIME = ["v", "v", "v", "v"]  # dash → heatmap → histogram → activations → through time
SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40"),
         pytest.param((200, 60), id="200x60")]


def compare_screen(app) -> Compare:
    return next(s for s in app.screen_stack if isinstance(s, Compare))


def state_of(name: str) -> RunState:
    state = RunState()
    state.feed(records(name))
    return state


# -- through time -----------------------------------------------------------------------------

def test_both_runs_are_drawn_on_one_log_scale():
    """On its own scale the LSTM's near-flat curve (t=0/t=49 ≈ 0.6) fills the whole colour ramp,
    just like the tanh RNN's twelve-decade fall: side by side they would look alike. On the
    shared scale the LSTM's strip stays at the top shade and the RNN's fades toward t = 0."""
    tanh, lstm = state_of(TANH), state_of(LSTM)
    g_tanh = tanh.last.time_act_grad_norm["rnn_tanh1"]
    g_lstm = lstm.last.time_act_grad_norm["lstm1"]
    lo, hi = R.time_scale([tanh, lstm])
    every = np.log10(np.concatenate([g_tanh, g_lstm]))
    assert (lo, hi) == pytest.approx((every.min(), every.max()))
    assert g_tanh[0] / g_tanh[-1] < 1e-6 < 0.1 < g_lstm[0] / g_lstm[-1]

    def strip(state, name, scale):
        line = next(x for x in R.through_time(state, 80, 20, 0, True, scale=scale).plain.splitlines()
                    if x.startswith(name))
        return line[len(name):].strip()

    alone, shared = strip(lstm, "lstm1", None), strip(lstm, "lstm1", (lo, hi))
    assert shared.count("█") == len(shared)  # every column in the top decade of the pair
    assert alone.count("█") < len(alone) // 2  # its own scale spreads its 1.3 decades over the shades
    rnn = strip(tanh, "rnn_tanh1", (lo, hi))
    assert rnn[0] in " ░" and rnn[-1] == "█"  # t = 0 at the bottom of the scale, the last step at the top


@sync
async def test_through_time_of_two_recurrent_runs_side_by_side():
    app = compare_app(TANH, LSTM)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        assert screen.views()[-1] == "time"
        await pilot.press(*TO_TIME)
        assert screen.view == "time"
        text = screen_text(app)
        assert "rnn_tanh1" in text and "lstm1" in text
        lo, hi = R.time_scale([s.state for s in screen.sides])
        assert text.count(f"{R.exp_label(lo)}▕") == 2 and text.count(f"{R.exp_label(hi)}▕") == 2  # one axis
        ratios = [fmt(g[0] / g[-1], 0).strip() for g in
                  (s.state.last.time_act_grad_norm[n] for s, n in zip(screen.sides, ("rnn_tanh1", "lstm1")))]
        words = " ".join(text.split())
        assert f"{ratios[0]} (rnn-tanh, 50 steps) vs {ratios[1]} (lstm, 50 steps)" in words
        assert "lstm's is 9 decades closer to 1" in words  # 9.4e-11 against 20
        assert "loss at step 475 2.28 vs 0.462" in words  # and only the LSTM has learnt the task
        assert "vanishing" in text and "healthy" in text  # each run's verdict under its column
        await pilot.press("v")
        assert screen.view == "dash"


@sync
async def test_through_time_beside_a_run_without_recurrent_layers():
    app = compare_app(TANH, "sigmoid-deep")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = compare_screen(app)
        await pilot.press(*TO_TIME)
        assert screen.view == "time"
        text = screen_text(app)
        assert "rnn_tanh1" in text
        assert "sigmoid-deep has no recurrent layer:" in text
        assert "nothing to measure through time." in text  # whole words, within its half
        assert "no recurrent layer (sigmoid-deep)" in " ".join(text.split())


@sync
async def test_through_time_is_not_offered_when_neither_run_is_recurrent():
    app = compare_app("sigmoid-deep", "relu-he")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = compare_screen(app)
        seen = set()
        for _ in range(6):
            await pilot.press("v")
            seen.add(screen.view)
        assert seen == {"dash", "heatmap", "hist", "acts"}


@sync
async def test_through_time_moves_among_the_recurrent_layers_of_either_run():
    """rnn has two recurrent layers (rnn1, rnn2, head), the LSTM one (lstm1, output): the second
    recurrent layer of the left is selected; the right, which has none there, keeps its own."""
    app = compare_app("rnn", LSTM)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        left, right = screen.sides
        await pilot.press(*TO_TIME)
        assert screen.view == "time" and left.selected == right.selected == 0
        await pilot.press("down")
        assert left.state.layer_names[left.selected] == "rnn2"
        assert right.state.layer_names[right.selected] == "lstm1"
        await pilot.press("down")  # head is no recurrent layer: it stays at rnn2
        assert screen.selected == 1
        await pilot.press("up")
        assert screen.selected == 0


@sync
async def test_live_runs_that_lose_their_recurrent_layers_leave_the_through_time_view():
    """Live, the runs can be replaced (p / P, r): through time stays while one of the new runs
    is recurrent and goes back to the layer rows once neither is."""
    from scripted_source import ScriptedSource
    from vgtui.tui.app import make_app
    from tui_helpers import wait_for

    a, b = ScriptedSource(records(TANH), label="a"), ScriptedSource(records(LSTM), label="b")
    app = make_app(compare=(a, b))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        await wait_for(pilot, lambda: all(s.state.last is not None for s in screen.sides))
        await pilot.press(*TO_TIME)
        assert screen.view == "time"
        b.records = records("relu-he")
        await pilot.press("r")
        await wait_for(pilot, lambda: screen.sides[1].state.preset_name == "relu-he")
        assert screen.view == "time" and "relu-he has no recurrent layer" in screen_text(app)
        a.records = records("sigmoid-deep")
        await pilot.press("r")
        await wait_for(pilot, lambda: screen.view == "dash")
        assert screen.sides[0].state.preset_name == "sigmoid-deep"


# -- blocks -------------------------------------------------------------------------------------

@sync
async def test_the_same_block_opens_and_closes_on_both_runs_that_share_the_layout():
    app = compare_app("llama24", "llama24")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        assert screen.by_block and all(len(s.rows) == 27 for s in screen.sides)  # deep: blocks
        await pilot.press("down")  # embed_tokens → layers.0
        assert screen.sides[0].rows[rowplan.row_of(screen.sides[0].rows, screen.selected)].label == "model.layers.0"
        await pilot.press("enter")
        assert all(s.expanded == {"model.layers.0"} and len(s.rows) == 27 + 9 for s in screen.sides)
        assert screen.sides[0].state.layer_names[screen.selected] == "model.layers.0.input_layernorm"
        assert screen_text(app).count("  self_attn.q_proj") == 2  # named below its block
        await pilot.press("e")  # closes the block the selected layer is in, on both
        assert not any(s.expanded for s in screen.sides)
        assert screen.sides[0].state.layer_names[screen.selected] == "model.layers.0.mlp.down_proj"
        await pilot.press("b")
        assert not screen.by_block and all(len(s.rows) == 219 for s in screen.sides)


@sync
async def test_runs_with_different_layouts_each_open_their_own_block():
    """llama24 (219 layers) leads the selection; resnet18 opens the block that holds the same
    layer index in its own layout, each run's rows stay its own plan, and enter closes both."""
    app = compare_app("resnet18", "llama24")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        resnet, llama = screen.sides
        assert screen._lead() is llama and screen.by_block
        await pilot.press("down", "down")  # embed_tokens → layers.0 → layers.1: layer 18, its last
        assert screen.selected == 18
        await pilot.press("enter")  # the selection goes to layers.1's first layer, 10: layer2.0 on the left
        assert llama.expanded == {"model.layers.1"} and screen.selected == 10
        assert resnet.expanded == {"layer2.0"}
        assert "  conv1" in screen_text(app) and "  self_attn.q_proj" in screen_text(app)
        for side in screen.sides:
            assert side.rows == rowplan.plan(side.state.layer_names, True, side.expanded)
            assert side.expanded <= {r.label for r in rowplan.blocks(side.state.layer_names) if r.block}
        await pilot.press("enter")
        assert not llama.expanded and not resnet.expanded


@sync
async def test_the_selection_keeps_its_layer_across_views_and_blocks():
    app = compare_app("resnet18", "resnet18")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = compare_screen(app)
        side = screen.sides[0]
        if screen.by_block:
            await pilot.press("b")
        assert not screen.by_block
        await pilot.press(*["down"] * 7)
        name = side.state.layer_names[screen.selected]
        for _ in range(4):
            await pilot.press("v")
            assert side.state.layer_names[side.selected] == name
        assert screen.view == "dash"
        await pilot.press("b")  # blocks: the selected row is the block that holds the layer
        assert screen.by_block and side.state.layer_names[side.selected] == name
        row = side.rows[rowplan.row_of(side.rows, side.selected)]
        assert row.block and row.first <= screen.selected <= row.last
        await pilot.press("v", "v")
        assert side.state.layer_names[side.selected] == name
        await pilot.press("b")
        assert side.state.layer_names[side.selected] == name


# -- snapshots ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_through_time_snapshot(snap_compare, size):
    """A tanh RNN beside an LSTM, one scale: the RNN's gradient fades toward t = 0, the LSTM's
    does not."""
    assert snap_compare(compare_app(TANH, LSTM), press=TO_TIME, terminal_size=size)


def test_through_time_beside_an_mlp_snapshot(snap_compare):
    assert snap_compare(compare_app(TANH, "sigmoid-deep"), press=TO_TIME, terminal_size=(120, 40))


def test_llama_block_open_on_both_snapshot(snap_compare):
    assert snap_compare(compare_app("llama24", "llama24"), press=["down", "enter"], terminal_size=(120, 40))


# -- the command line ---------------------------------------------------------------------------

def test_compare_opens_two_recordings_and_refuses_one_of_each(monkeypatch, capsys, tmp_path):
    import vgtui.tui
    from vgtui.cli import build_parser, cmd_compare, main
    from tui_snapshot_app import recording

    opened = []
    monkeypatch.setattr(vgtui.tui, "run_compare_recordings", lambda a, b, mono=False: opened.append((a, b)) or 0)
    a, b = recording(TANH), recording(LSTM)
    assert cmd_compare(build_parser().parse_args(["compare", str(a), str(b)])) == 0
    assert opened == [(a, b)]
    assert main(["compare", str(a), "lstm"]) == 2
    assert "two presets (trained side by side) or two recordings" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "gone.jsonl"), str(b)]) == 2
    assert "gone.jsonl: no such recording" in capsys.readouterr().err
