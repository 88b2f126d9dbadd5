"""Deep models on screen: blocks, names, the layer/block toggle, the selection across views, not
measured vs not finite, the through-time view, and the pause at the first non-finite step. Fed
from recordings of real models watched with vgtui.watch (tests/data/regenerate_models.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from vgtui.diagnosis import EXPLODE_ENTER, VANISH_ENTER
from vgtui.records import StepRecord
from vgtui.tui import render as R
from vgtui.tui import rows as rowplan
from vgtui.tui.app import make_app
from vgtui.tui.sources import ReplaySource
from vgtui.tui.state import RunState

from tui_helpers import dashboard, sync
from tui_snapshot_app import recording, records, scripted_app, screen_text


def test_names_shorten_from_the_middle_and_keep_the_end():
    assert rowplan.shorten("transformer.h.11.attn.c_attn", 19) == "t….h.11.attn.c_attn"
    assert rowplan.shorten("hidden1", 10) == "hidden1"
    assert len(rowplan.shorten("layer1.0.downsample.0", 12)) == 12
    names = [f"transformer.h.{i}.mlp.c_fc" for i in range(3)] + ["transformer.wte", "lm_head"]
    assert rowplan.common_prefix(names) == "transformer."  # not "transformer.h.": "h.3" stays
    assert rowplan.common_prefix(["hidden1", "hidden2", "output"]) == ""


def test_blocks_are_the_repeated_containers():
    names = records("llama24")[0].layers
    assert len(names) == 219  # embed_tokens, 24 blocks of 9, the final norm, lm_head
    blocks = rowplan.blocks(names)
    assert [b.label for b in blocks if b.block][:2] == ["model.layers.0", "model.layers.1"]
    assert sum(b.block for b in blocks) == 24 and all(b.last - b.first == 8 for b in blocks if b.block)
    assert [b.label for b in blocks if not b.block] == ["model.embed_tokens", "model.norm", "lm_head"]
    assert rowplan.common_prefix(names) == "model."  # dropped once; "layers.3" keeps its container
    resnet = records("resnet18")[0].layers
    labels = [b.label for b in rowplan.blocks(resnet) if b.block]
    assert labels == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                      "layer4.0", "layer4.1"]
    assert rowplan.block_key("encoder.layers.3.linear1") == "encoder.layers.3"
    assert rowplan.block_key("blocks.7.attn.qkv") == "blocks.7"
    assert rowplan.block_key("fc") is None


def test_layers_in_an_open_block_are_named_below_it_and_packed_lines_name_what_they_hold():
    names = records("llama24")[0].layers
    rows = rowplan.plan(names, True, frozenset({"model.layers.0"}))
    assert rowplan.row_label(rows[1], "model.", 20, frozenset({"model.layers.0"})) == "▾ layers.0 (9)"
    assert [rowplan.row_label(r, "model.", 30) for r in rows[2:4]] == ["  input_layernorm", "  self_attn.q_proj"]
    blocks = rowplan.plan(names, True)
    assert rowplan.span_label(blocks, 1, 2, "model.", 20) == "layers.0–1"  # two blocks on one line
    assert rowplan.span_label(blocks, 0, 1, "model.", 20) == "embed_tokens +1"
    layers = rowplan.plan(names, False)
    assert rowplan.span_label(layers, 7, 13, "model.", 20) == "layers.0–1 (7)"  # 7 layers, 2 blocks
    state = RunState()
    state.feed(records("llama24"))
    view = R.heatmap(state, 120, 38, "act_grad_norm", False, R.Ctx(state))
    assert "219 layers, ≈" in view.plain and "per line (weakest shown)" in view.plain


def test_a_block_is_the_root_sum_square_of_its_weights_and_its_output_gradient():
    rows = [rowplan.Row("b", 0, 2, True), rowplan.Row("head", 3, 3, False)]
    w = np.array([3.0, 4.0, 12.0, 1.0])[:, None]
    assert rowplan.aggregate(w, rows, "weight_grad_norm")[0, 0] == 13.0  # sqrt(9 + 16 + 144)
    h = np.array([1.0, 2.0, np.nan, 5.0])[:, None]
    measured = np.array([True, True, False, True])[:, None]
    # the output's: the last layer of the block that was measured
    assert rowplan.aggregate(h, rows, "act_grad_norm", measured)[0, 0] == 2.0
    assert np.isnan(rowplan.aggregate(h, rows, "act_grad_norm")[0, 0])  # a real NaN stays


def test_the_first_last_words_follow_the_diagnosis_thresholds():
    assert "vanishing" in R.ratio_verdict(VANISH_ENTER * 0.5)  # 0.05: the diagnosis says vanishing
    assert "healthy" in R.ratio_verdict(VANISH_ENTER * 2)
    assert "exploding" in R.ratio_verdict(EXPLODE_ENTER * 2)
    assert "not" in R.ratio_verdict(float("nan"))


def _with_marks(name: str) -> RunState:
    """The newest record with layer 1's ‖∂L/∂h‖ not measured and layer 2's a real NaN."""
    recs = records(name)
    last = max(i for i, r in enumerate(recs) if isinstance(r, StepRecord))
    r = recs[last]
    h = r.layers["act_grad_norm"].copy()
    h[1] = h[2] = np.nan
    mask = np.zeros(len(h), dtype=bool)
    mask[1] = True
    recs[last] = dataclasses.replace(r, layers={**r.layers, "act_grad_norm": h},
                                     unmeasured={"act_grad_norm": mask})
    state = RunState()
    state.feed(recs)
    return state


def test_not_measured_is_drawn_apart_from_not_finite():
    state = _with_marks("sigmoid-deep")
    lines = R.layer_rows(state, 120, ["act_grad_norm"], 0, False).plain.splitlines()
    row1 = next(line for line in lines if line.startswith("hidden2"))
    row2 = next(line for line in lines if line.startswith("hidden3"))
    assert "not meas." in row1 and row1.rstrip().endswith("·")  # the words, and the glyph
    assert "✗" in row2 and "not meas." not in row2


@sync
async def test_deep_models_open_as_blocks_that_expand_in_place_and_toggle():
    app = make_app(ReplaySource(recording("llama24")))
    async with app.run_test(size=(120, 40)) as pilot:
        dash = dashboard(app)
        assert dash.by_block and len(dash.rows) == 27  # embed_tokens, 24 blocks, norm, lm_head
        text = screen_text(app)
        assert "layers.0 (9)" in text and "model.layers" not in text  # the prefix shown once, above
        assert "embed_tokens ⇄" in text  # tied to lm_head
        await pilot.press("down")  # embed_tokens → layers.0
        row = dash.rows[rowplan.row_of(dash.rows, dash.selected)]
        assert row.label == "model.layers.0"
        await pilot.press("enter")
        assert "model.layers.0" in dash.expanded and len(dash.rows) == 27 + 9
        assert dash.state.layer_names[dash.selected] == "model.layers.0.input_layernorm"
        assert "self_attn.q_proj" in screen_text(app)
        await pilot.press("enter")  # closes the block the selected layer is in
        assert not dash.expanded and dash.state.layer_names[dash.selected] == "model.layers.0.mlp.down_proj"
        await pilot.press("b")
        assert not dash.by_block and len(dash.rows) == 219
        for _ in range(4):  # every view follows the toggle
            await pilot.press("v")
            assert "219 layers" in screen_text(app) or dash.view in ("hist", "acts", "dash")
        await pilot.press("b")
        assert dash.by_block


@sync
async def test_the_selection_keeps_its_layer_across_views():
    app = make_app(ReplaySource(recording("resnet18")))
    async with app.run_test(size=(120, 40)) as pilot:
        dash = dashboard(app)
        await pilot.press("b")  # layers
        await pilot.press(*["down"] * 7)
        name = dash.state.layer_names[dash.selected]
        for _ in range(4):
            await pilot.press("v")
            assert dash.state.layer_names[dash.selected] == name
            assert f"▸ {name}" in screen_text(app)  # the full name, in every view
        assert dash.view == "dash"


@sync
async def test_through_time_only_for_recurrent_runs():
    app = make_app(ReplaySource(recording("sigmoid-deep")))
    async with app.run_test(size=(100, 30)) as pilot:
        dash = dashboard(app)
        seen = set()
        for _ in range(5):
            await pilot.press("v")
            seen.add(dash.view)
        assert "time" not in seen
    app = make_app(ReplaySource(recording("rnn")))
    async with app.run_test(size=(100, 30)) as pilot:
        dash = dashboard(app)
        await pilot.press("v", "v", "v", "v")
        assert dash.view == "time"
        text = screen_text(app)
        assert "through time" in text and "per step back" in text
        await pilot.press("down")
        assert dash.state.layer_names[dash.selected] == "rnn2"


@sync
async def test_live_pauses_at_the_first_nonfinite_step_unless_told_not_to():
    for on in (True, False):
        app = scripted_app("exploding")
        app.break_on_nonfinite = on
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.2)
            dash = dashboard(app)
            assert dash.state.nonfinite is not None
            assert (("pause",) in dash.source.calls) is on
            if on:
                await pilot.press("exclamation_mark")
                assert not dash.break_on_nonfinite


@sync
async def test_smoothing_toggles():
    app = make_app(ReplaySource(recording("sigmoid-deep")))
    async with app.run_test(size=(100, 30)) as pilot:
        assert "(EMA)" in screen_text(app)
        await pilot.press("s")
        await pilot.pause(0.1)
        assert "(EMA)" not in screen_text(app)


@sync
async def test_loss_chart_draws_the_band_between_samples_and_held_out_loss():
    from vgtui.records import RunHeader, StepWindow

    recs = []
    for r in records("sigmoid-deep"):
        if isinstance(r, StepRecord):
            window = StepWindow(steps=5, first_step=r.step - 4, loss_min=r.loss * 0.9, loss_max=r.loss * 1.2,
                                loss_mean=r.loss, loss_last=r.loss, loss_max_step=r.step - 2,
                                grad_norm_min=1.0, grad_norm_max=2.0, grad_norm_mean=1.5,
                                grad_norm_last=1.5, grad_norm_max_step=r.step)
            r = dataclasses.replace(r, window=window,
                                    heldout_loss=r.loss * 1.1 if r.step % 10 == 0 else float("nan"))
        recs.append(r)
    assert isinstance(recs[0], RunHeader)
    app = make_app(ReplaySource(records=recs))
    async with app.run_test(size=(120, 40)):
        text = screen_text(app)
        assert "max between samples" in text and "held-out" in text


def test_stacked_layers_of_one_fused_module_appear_in_the_through_time_view():
    """vgtui.watch names the stacked layers of one nn.LSTM `lstm.l0`, `lstm.l1` (one header
    layer): the view lists them, in order, under the layer they belong to."""
    first = records("rnn")
    header = first[0]
    steps = [r for r in first if isinstance(r, StepRecord)]
    last = steps[-1]
    name = header.layers[0]
    series = last.time_act_grad_norm[name]
    stacked = dataclasses.replace(last, time_act_grad_norm={f"{name}.l1": series * 2, f"{name}.l0": series})
    state = RunState()
    state.feed([header, *steps[:-1], stacked])
    assert state.time_layers == [f"{name}.l0", f"{name}.l1"]
    assert {state.time_layer(s) for s in state.time_layers} == {name}
    text = R.through_time(state, 100, 30, 0, mono=True).plain
    assert f"{name}.l0" in text and f"{name}.l1" in text


def test_the_long_sigmoid_recording_shows_the_top_layer_sinking():
    """What the activations snapshot of sigmoid-deep-long is there to show, checked on the
    recorded percentiles: the top hidden layer's median falls from 0.5 toward 0, the rest stay."""
    recs = [r for r in records("sigmoid-deep-long") if isinstance(r, StepRecord)]
    first, last = recs[0].layers["act_p50"], recs[-1].layers["act_p50"]
    assert recs[-1].step >= 1900 and abs(first[4] - 0.5) < 0.02 and last[4] < 0.2
    assert np.all(np.abs(last[:3] - 0.5) < 0.05)  # hidden1-3 stay near 0.5
