"""The loss chart's points stay put: fixed step ranges, axes that move only when the run outgrows
them, so a replot between growths changes (and sends over SSH) only the newest columns."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from textual.app import App
from tui_helpers import sync
from tui_snapshot_app import records

from vgtui.records import RunHeader, StepRecord, StepWindow
from vgtui.tui.state import RunState
from vgtui.tui.widgets import (FINE_BINS, ChartSlice, LossBins, LossPlot, cell_changed_regions, ema,
                               nice_ticks, one_per_row, snap_out)

RECORDED = records("sigmoid-deep")
HEADER = next(r for r in RECORDED if isinstance(r, RunHeader))
BASE = next(r for r in RECORDED if isinstance(r, StepRecord))


def loss_at(step: int) -> float:
    """A noisy, falling loss (deterministic)."""
    return 2.3 * math.exp(-step / 400) + 0.1 + 0.05 * math.sin(step * 1.7)


def record(step: int, loss: float | None = None, *, every: int = 1, held: float = float("nan"),
           accuracy: float = float("nan")) -> StepRecord:
    loss = loss_at(step) if loss is None else loss
    window = None
    if every > 1:
        window = StepWindow(every, step - every + 1, loss * 0.9, loss * 1.3, loss, loss, step,
                            None, None, None, None, None)
    return dataclasses.replace(BASE, step=step, loss=loss, window=window, heldout_loss=held,
                               accuracy=accuracy)


def run(steps, **kwargs) -> list[StepRecord]:
    return [record(s, **kwargs) for s in steps]


def state_of(recs: list) -> RunState:
    state = RunState()
    state.feed([HEADER, *recs])
    return state


def braille_columns(lines) -> list[int]:
    """Columns holding a plotted dot, right of the legend (its swatches are braille too)."""
    columns = set()
    for line in lines:
        legend = re.search(r"[L⅃] \S\S [^\u2800-\u28ff]*", line.plain)
        start = legend.end() if legend else 0
        columns |= {x for x, ch in enumerate(line.plain) if x >= start and "\u2800" < ch <= "\u28ff"}
    return sorted(columns)


class ChartApp(App):
    def compose(self):
        yield LossPlot(id="loss")


# -- fixed bins ------------------------------------------------------------------------------------


def test_bins_fed_in_pieces_equal_bins_fed_at_once_across_growths():
    recs = run(range(0, 3000, 3), every=3, held=1.0, accuracy=0.5)
    whole = LossBins.for_records(recs[:10])
    whole.add(recs[10:])
    pieces = LossBins.for_records(recs[:10])
    for i in range(10, len(recs), 37):
        pieces.add(recs[i:i + 37])
    assert whole.span == pieces.span >= 3000 and whole.x0 == pieces.x0 == 0
    for name in whole.a:
        np.testing.assert_allclose(whole.a[name], pieces.a[name], err_msg=name)
    assert whole.a["n"].sum() == len(recs)
    assert whole.a["bmax"].max() == max(r.window.loss_max for r in recs)


def test_finished_columns_never_change_between_growths():
    bins = LossBins.for_records(run(range(0, 300)))
    assert bins.span >= 300  # room to grow
    before = bins.columns(bins.x0, bins.x0 + bins.span, 200, logscale=False)
    span = bins.span
    bins.add(run(range(300, 330)))
    assert bins.span == span
    after = bins.columns(bins.x0, bins.x0 + bins.span, 200, logscale=False)
    last = int(0.5 + 199 * 299 / span)  # the column of the last step before: may still fill
    np.testing.assert_array_equal(before["loss"][:last], after["loss"][:last])
    assert np.isfinite(after["loss"][last + 1:int(0.5 + 199 * 329 / span)]).any()


def test_a_run_starting_late_gets_an_x_range_of_its_own():
    bins = LossBins.for_records(run(range(4000, 5000)))
    assert 3000 < bins.x0 <= 4000 and bins.x0 + bins.span > 4999
    assert bins.span <= 2 * 1000 * 1.25


def test_ema_keeps_past_values_and_decays_over_gaps():
    values = np.array([1.0, 2.0, np.nan, np.nan, 4.0, 3.0])
    full = ema(values, 4)
    np.testing.assert_array_equal(ema(values[:5], 4), full[:5])
    assert np.isnan(full[2]) and np.isnan(full[3])
    alpha = 2 / 5
    acc = 1.0 + alpha * (2.0 - 1.0)
    for _ in range(3):  # a gap of two empty columns weighs the next value as three steps would
        acc += alpha * (4.0 - acc)
    assert math.isclose(full[4], acc)


def test_axis_ticks_are_round_numbers():
    assert snap_out(0.13, 2.41, 4) == (0.0, 3.0)
    assert snap_out(2.21, 2.38, 4) == (2.2, 2.4)
    step, ticks, labels = nice_ticks(0, 1280, 6)
    assert step == 500 and labels == ["0", "500", "1000"]
    assert nice_ticks(2.2, 2.4, 4)[2] == ["2.20", "2.25", "2.30", "2.35", "2.40"]
    assert nice_ticks(0, 40_000, 4)[2] == ["0", "10k", "20k", "30k", "40k"]
    # two labels on one text row: plotext would print either, varying between runs
    assert one_per_row([2.302, 2.303], ["2.302", "2.303"], 2.302, 2.3035, 1) == ([2.302], ["2.302"])
    assert one_per_row([0, 0.5, 1], ["0", "0.5", "1"], 0, 1, 2) == ([0, 1], ["0", "1"])
    assert one_per_row([0, 0.5, 1], ["0", "0.5", "1"], 0, 1, 5) == ([0, 0.5, 1], ["0", "0.5", "1"])


# -- the chart -------------------------------------------------------------------------------------


def render(plot) -> list:
    return plot.chart_text().split("\n", allow_blank=True)


@sync
async def test_a_replot_between_growths_changes_only_the_newest_columns():
    app = ChartApp()
    async with app.run_test(size=(120, 16)):
        plot = app.query_one(LossPlot)
        recs = run(range(0, 900), every=1, held=2.0, accuracy=0.4)
        state = state_of(recs[:700])
        plot.replot([("", state)])
        before = render(plot)
        span = next(iter(plot._feeds.values())).bins.span
        state.feed(recs[700:712])
        refreshed = []
        for piece in plot.query(ChartSlice):
            piece.refresh = lambda *regions, piece=piece, **kw: refreshed.append((piece, regions))
        plot.replot([("", state)])
        after = render(plot)
        assert next(iter(plot._feeds.values())).bins.span == span  # no growth in between
        regions = cell_changed_regions(before, after, 120)
        old_end, new_end = braille_columns(before)[-1], braille_columns(after)[-1]
        assert new_end > old_end > 40
        assert regions, "the newest steps are drawn"
        for region in regions:
            assert old_end - 1 <= region.x and region.x + region.width <= new_end + 1, region
        assert sum(r.width for r in regions) <= 5 * (new_end - old_end + 3)
        # Textual sends a changed cell from its widget's left edge: only the slices that hold the
        # newest columns are refreshed, and only on their changed lines
        left = plot.content_region.x
        assert refreshed and all(regions for _, regions in refreshed)
        for piece, _ in refreshed:
            x = piece.region.x - left
            assert x + piece.size.width > old_end - 1 and x <= new_end + 1
            assert piece.size.width <= 120 // LossPlot.SLICES + 1


@sync
async def test_a_finished_run_fills_the_width():
    app = ChartApp()
    async with app.run_test(size=(100, 14)):
        plot = app.query_one(LossPlot)
        state = state_of(run(range(0, 1300)))  # just past a growth: half the live range is empty
        plot.replot([("", state)])
        live_end = braille_columns(render(plot))[-1]
        plot.replot([("", state)], fit=True)
        fitted = render(plot)
        end = braille_columns(fitted)[-1]
        right_axis = max(x for line in fitted for x, ch in enumerate(line.plain) if ch in "│┤├")
        assert end >= right_axis - 2 > live_end + 20
        assert braille_columns(fitted)[0] <= 8


@sync
async def test_what_the_chart_says():
    app = ChartApp()
    async with app.run_test(size=(100, 14)):
        plot = app.query_one(LossPlot)
        plot.replot([("", state_of(run(range(0, 50), loss=float("nan"))))])
        assert "no finite values yet" in plot.chart_text().plain
        exploding = run(range(0, 60)) + [record(s, loss=10.0 ** (s - 55)) for s in range(60, 80)]
        plot.replot([("", state_of(exploding))])
        assert "log10 loss (EMA)" in plot.chart_text().plain
        state = state_of(run(range(0, 80), every=4, held=2.0, accuracy=0.5))
        plot.replot([("", state)], smooth=False)
        text = plot.chart_text().plain
        assert "max between samples" in text and "held-out" in text and "acc" in text
        assert "loss (EMA)" not in text and "loss" in text
        plot.replot([("a ", state), ("b ", state_of(run(range(0, 40))))])
        text = plot.chart_text().plain
        assert "a loss (EMA)" in text and "b loss (EMA)" in text and "held-out" not in text


@sync
async def test_the_chart_follows_a_new_run_and_a_seek():
    app = ChartApp()
    async with app.run_test(size=(100, 14)):
        plot = app.query_one(LossPlot)
        state = state_of([])
        for start in range(0, 3000, 500):  # the screen keeps the newest 1000 records
            state.feed(run(range(start, start + 500)))
            plot.replot([("", state)])
        assert next(iter(plot._feeds.values())).bins.a["n"].sum() == 3000  # more than the history keeps
        state.feed([HEADER, *run(range(0, 20), loss=5.0)])  # restarted: the old run's bins go
        plot.replot([("", state)])
        bins = next(iter(plot._feeds.values())).bins
        assert bins.a["n"].sum() == 20 and bins.span <= 50
        assert FINE_BINS % 2 == 0


def y_labels(lines) -> list[str]:
    return [line.plain.split("┤")[0].strip() for line in lines if "┤" in line.plain[:8]]


@sync
async def test_the_loss_axis_holds_until_the_data_leaves_it():
    app = ChartApp()
    async with app.run_test(size=(100, 16)):
        plot = app.query_one(LossPlot)
        state = state_of([record(s, 2.3 + 0.05 * math.sin(s)) for s in range(0, 500)])
        plot.replot([("", state)])
        first = y_labels(render(plot))
        assert first and all(float(label) == round(float(label), 2) for label in first)
        state.feed([record(s, 2.3 + 0.05 * math.sin(s)) for s in range(500, 520)])
        plot.replot([("", state)])
        assert y_labels(render(plot)) == first  # new data inside the range: the axis stays
        state.feed([record(520, 3.1)])
        plot.replot([("", state)])
        widened = y_labels(render(plot))
        assert float(widened[0]) >= 3.1 > float(first[0]) and float(widened[-1]) <= float(first[-1])
        right = [line.plain.rsplit("├", 1)[1].strip() for line in render(plot) if "├" in line.plain[-6:]]
        assert right == []  # no accuracy, no right axis labels
        state.feed([record(521, accuracy=0.3)])
        plot.replot([("", state)])
        right = [line.plain.rsplit("├", 1)[1].strip() for line in render(plot) if "├" in line.plain[-6:]]
        assert right == ["1", "0.5", "0"]  # accuracy: a fixed 0–1 axis
