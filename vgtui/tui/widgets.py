"""Cheap widgets: each renders one of the pure renderers, cached on (state version, size, view
options), so a repaint that changes nothing costs a dict lookup. One plotext chart (the loss),
replotted by its owner at a modest rate and cached the same way."""

from __future__ import annotations

import math

import numpy as np

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual_plotext import PlotextPlot

from . import render as R
from .state import RunState



def _cached_strip(widget, lines: list, cache: dict, y: int) -> Strip:
    """Row ``y`` of ``lines`` (Rich Text) as a Strip the widget's width, made once per drawing."""
    strip = cache.get(y)
    if strip is None:
        width, style = widget.size.width, widget.rich_style
        if y < len(lines):
            segments = list(lines[y].render(widget.app.console))
            strip = Strip(segments).crop_extend(0, width, style).apply_style(style)
        else:
            strip = Strip.blank(width, style)
        cache[y] = strip
    return strip

class View(Widget):
    """Renders ``self.draw(width, height)``; the owner supplies state and options."""

    DEFAULT_CSS = """
    View { height: 1fr; }
    """

    def __init__(self, owner, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.owner = owner
        self._key = None
        self._text: Text | None = None
        self._rows_of: Text | None = None
        self._rows: list[Text] = []
        self._strips: dict[int, Strip] = {}

    @property
    def state(self) -> RunState:
        return self.owner.state

    def options(self) -> tuple:
        owner = self.owner
        return (owner.selected, owner.metric_mode, owner.mono, getattr(owner, "by_block", False),
                getattr(owner, "expanded", frozenset()), getattr(owner, "row_lines", 1))

    def ctx(self) -> R.Ctx:
        owner = self.owner
        return R.Ctx(self.state, getattr(owner, "by_block", False), getattr(owner, "expanded", frozenset()),
                     owner.selected, owner.mono)

    def draw(self, width: int, height: int) -> Text:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self) -> Text:
        key = (self.state.version, id(self.state), self.size.width, self.size.height, self.options())
        if key != self._key or self._text is None:
            self._text = self.draw(self.size.width, self.size.height)
            self._key = key
        return self._text

    def render_line(self, y: int) -> Strip:
        """Line API: each text row becomes segments once per drawing, and only the rows on
        screen. Handing Textual a whole Text converts it span by span, on every frame, in the
        thread that shares the GIL with training (the figures: docs/BENCHMARKS.md, TUI)."""
        text = self.render()  # cached on (state version, size, options)
        if self._rows_of is not text:
            self._rows_of, self._rows, self._strips = text, text.split("\n", allow_blank=True), {}
        return _cached_strip(self, self._rows, self._strips, y)

    def changed(self) -> bool:
        key = (self.state.version, id(self.state), self.size.width, self.size.height, self.options())
        return key != self._key

    def redraw(self, layout: bool = False) -> None:
        """Refresh only the lines whose text changed since the last drawing: the terminal is sent
        those lines alone (a steady picture costs next to nothing over SSH)."""
        before = self._rows if self._rows_of is self._text else None
        if layout or before is None or not self.size.width:
            self.refresh(layout=layout)
            return
        text = self.render()
        after = text.split("\n", allow_blank=True)
        self._rows_of, self._rows, self._strips = text, after, {}
        regions = changed_regions(before, after, self.size.width)
        if regions:
            self.refresh(*regions)


def changed_regions(before: list[Text], after: list[Text], width: int) -> list[Region]:
    """The regions of a redrawn text that differ from what is on screen: per line, from its first
    to its last changed character when only characters changed, the whole line when its styles
    or length changed. One region per line: Textual sends each region of a line from the start
    of the widget's segment on that line, so several would send the line's start several times."""
    regions = []
    for y in range(max(len(before), len(after))):
        if y >= len(before) or y >= len(after):
            regions.append(Region(0, y, width, 1))
            continue
        old, new = before[y], after[y]
        if old == new:
            continue
        span = _changed_span(old, new)
        regions.append(Region(0, y, width, 1) if span is None else Region(span[0], y, span[1] - span[0], 1))
    return regions


def _changed_span(old: Text, new: Text) -> tuple[int, int] | None:
    """[start, end) columns where two one-line texts differ, when only characters changed (same
    length, same styles); None when the styles differ."""
    a, b = old.plain, new.plain
    if len(a) != len(b) or old.spans != new.spans:
        return None
    start = next((i for i in range(len(a)) if a[i] != b[i]), None)
    if start is None:
        return None
    end = next(i for i in range(len(a), 0, -1) if a[i - 1] != b[i - 1])
    return start, end


def cell_changed_regions(before: list[Text], after: list[Text], width: int) -> list[Region]:
    """Per line, the columns from the first to the last cell whose character or style changed.
    A chart's lines are runs of coloured cells, so a line whose points moved still keeps its
    axis labels and the empty canvas around the points; those cells are not resent."""
    regions = []
    for y in range(max(len(before), len(after))):
        if y >= len(before) or y >= len(after):
            regions.append(Region(0, y, width, 1))
            continue
        old, new = before[y], after[y]
        if old == new:
            continue
        a, b = _cells(old), _cells(new)
        if len(a) != len(b):
            regions.append(Region(0, y, width, 1))
            continue
        start = next(i for i in range(len(a)) if a[i] != b[i])
        end = next(i for i in range(len(a), 0, -1) if a[i - 1] != b[i - 1])
        regions.append(Region(start, y, end - start, 1))
    return regions


def _cells(line: Text) -> list[tuple]:
    """(character, styles applied to it) for each cell of a one-line text of single-width
    characters."""
    styles: list[tuple] = [()] * len(line.plain)
    for span in line.spans:
        for i in range(span.start, min(span.end, len(styles))):
            styles[i] = styles[i] + (span.style,)
    return list(zip(line.plain, styles))


class TextLines(Widget):
    """A few lines of text (the status bar) that send the terminal only what changed."""

    DEFAULT_CSS = """
    TextLines { height: auto; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._lines: list[Text] = []
        self._strips: dict[int, Strip] = {}

    def set(self, text: Text) -> None:
        lines = text.split("\n", allow_blank=True)
        before, self._lines, self._strips = self._lines, lines, {}
        if len(lines) != len(before) or not self.size.width:
            self.refresh(layout=True)
        else:
            regions = changed_regions(before, lines, self.size.width)
            if regions:
                self.refresh(*regions)

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(1, len(self._lines))

    def render_line(self, y: int) -> Strip:
        return _cached_strip(self, self._lines, self._strips, y)


class LayerRows(View):
    DEFAULT_CSS = """
    LayerRows { height: auto; }
    """

    def __init__(self, owner, *, metrics: list[str] | None = None, id=None, classes=None):
        super().__init__(owner, id=id, classes=classes)
        self.fixed_metrics = metrics

    def metrics(self) -> list[str]:
        if self.fixed_metrics:
            return self.fixed_metrics
        mode = self.owner.metric_mode
        if mode == "h":
            return ["act_grad_norm"]
        if mode == "W":
            return ["weight_grad_norm"]
        return ["act_grad_norm", "weight_grad_norm"]

    def wanted_height(self) -> int:
        if not self.state.n_layers:
            return 1
        rows = self.state.plan(getattr(self.owner, "by_block", False), getattr(self.owner, "expanded", frozenset()))
        return R.rows_height(len(rows), getattr(self.owner, "row_lines", 1))

    def get_content_height(self, container, viewport, width: int) -> int:
        return self.wanted_height()

    def draw(self, width: int, height: int) -> Text:
        return R.layer_rows(self.state, width, self.metrics(), self.owner.selected, self.owner.mono,
                            self.ctx(), getattr(self.owner, "row_lines", 1))


class Heatmap(View):
    def draw(self, width: int, height: int) -> Text:
        metric = "weight_grad_norm" if self.owner.metric_mode == "W" else "act_grad_norm"
        return R.heatmap(self.state, width, height, metric, self.owner.mono, self.ctx())


class Histogram(View):
    def draw(self, width: int, height: int) -> Text:
        return R.histogram(self.state, self.owner.selected, width, height, self.owner.mono, self.ctx())


class Activations(View):
    def draw(self, width: int, height: int) -> Text:
        return R.activations(self.state, width, self.owner.selected, self.owner.mono, height, self.ctx())


class ThroughTime(View):
    def draw(self, width: int, height: int) -> Text:
        return R.through_time(self.state, width, height, self.owner.selected, self.owner.mono)


FINE_BINS = 4096  # fixed step ranges per x range: finer than any plot's braille columns
MIN_SPAN = 10  # steps: the smallest x range
# 256-colour indices of the chart's lines, shared by plotext and the key line above the chart
LINE_COLOURS = {"loss": 75, "other": 176, "raw": 242, "band": 246, "held": 214, "acc": 114}
# --mono: no colour, so the lines differ by their marks (the raw values are left out)
MONO_MARKS = {"loss": "braille", "other": "•", "band": "·", "held": "o", "acc": "+"}
EMA_SPAN = 1 / 20  # of the x range: the smoothing window, fixed between growths of the range
# Per step range: loss count, sum and sum of log10|loss|; the band between samples (the records'
# windows) count and extremes, linear and log10; held-out loss count, sum, log sum; accuracy.
_SUMS = ("n", "sum", "lsum", "bn", "hn", "hsum", "hlsum", "an", "asum")
_MINS = ("bmin", "blmin")
_MAXS = ("bmax", "blmax")


def nice_ceil(x: float) -> float:
    """The smallest 1, 2 or 5 × 10^k that is ≥ ``x``."""
    if not x > 0:
        return 1.0
    exp = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10.0 ** exp >= x * (1 - 1e-9):
            return m * 10.0 ** exp
    return 10.0 ** (exp + 1)


def _log(values: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(np.abs(values), 1e-300))


class LossBins:
    """One run's loss history, accumulated into FINE_BINS fixed step ranges over ``[x0, x0 +
    span)``: a record lands in the range of its step, so a range the run has passed never changes
    and neither does anything drawn from it. When the run reaches the end the span doubles and
    neighbouring ranges merge exactly (sums, counts, extremes): the one moment old points move.
    Memory stays fixed however long the run (the screen's history keeps only recent records)."""

    def __init__(self, x0: float, span: float):
        self.x0, self.span = float(x0), float(span)
        self.a = {f: np.zeros(FINE_BINS) for f in _SUMS}
        self.a.update({f: np.full(FINE_BINS, np.inf) for f in _MINS})
        self.a.update({f: np.full(FINE_BINS, -np.inf) for f in _MAXS})
        self.first: int | None = None  # steps of the first and last record binned
        self.last: int | None = None
        self.absmin, self.absmax = np.inf, 0.0  # of the nonzero finite |loss| (log scale or not)

    @classmethod
    def for_records(cls, records: list) -> "LossBins":
        first, last = records[0].step, records[-1].step
        span = max(MIN_SPAN, nice_ceil((last - first) * 1.25))
        grid = span / 10
        bins = cls(math.floor(first / grid) * grid, span)
        bins.add(records)
        return bins

    def _grow(self) -> None:
        half = FINE_BINS // 2
        for f, arr in self.a.items():
            pairs = arr.reshape(half, 2)
            if f in _MINS:
                arr[:half], arr[half:] = pairs.min(1), np.inf
            elif f in _MAXS:
                arr[:half], arr[half:] = pairs.max(1), -np.inf
            else:
                arr[:half], arr[half:] = pairs.sum(1), 0.0
        self.span *= 2

    def add(self, records: list) -> None:
        if not records:
            return
        steps = np.array([r.step for r in records], dtype=float)
        loss = np.array([r.loss for r in records], dtype=float)
        wins = [r.window if r.window is not None and r.window.steps > 1 else None for r in records]
        wmin = np.array([w.loss_min if w else np.nan for w in wins], dtype=float)
        wmax = np.array([w.loss_max if w else np.nan for w in wins], dtype=float)
        held = np.array([r.heldout_loss for r in records], dtype=float)
        acc = np.array([r.accuracy for r in records], dtype=float)
        while steps.max() >= self.x0 + self.span:
            self._grow()
        idx = np.clip(((steps - self.x0) * FINE_BINS / self.span).astype(int), 0, FINE_BINS - 1)
        a = self.a
        ok = np.isfinite(loss)
        if ok.any():
            np.add.at(a["n"], idx[ok], 1)
            np.add.at(a["sum"], idx[ok], loss[ok])
            np.add.at(a["lsum"], idx[ok], _log(loss[ok]))
            nonzero = np.abs(loss[ok])[loss[ok] != 0]
            if nonzero.size:
                self.absmin = min(self.absmin, float(nonzero.min()))
                self.absmax = max(self.absmax, float(nonzero.max()))
        band = np.isfinite(wmin) & np.isfinite(wmax)
        if band.any():
            i = idx[band]
            np.add.at(a["bn"], i, 1)
            np.minimum.at(a["bmin"], i, wmin[band])
            np.maximum.at(a["bmax"], i, wmax[band])
            np.minimum.at(a["blmin"], i, _log(wmin[band]))
            np.maximum.at(a["blmax"], i, _log(wmax[band]))
        ok = np.isfinite(held)
        if ok.any():
            np.add.at(a["hn"], idx[ok], 1)
            np.add.at(a["hsum"], idx[ok], held[ok])
            np.add.at(a["hlsum"], idx[ok], _log(held[ok]))
        ok = np.isfinite(acc)
        if ok.any():
            np.add.at(a["an"], idx[ok], 1)
            np.add.at(a["asum"], idx[ok], acc[ok])
        if self.first is None:
            self.first = int(steps[0])
        self.last = int(steps.max())

    def columns(self, lo: float, hi: float, columns: int, logscale: bool) -> dict[str, np.ndarray]:
        """Per braille column of a plot whose x range is ``[lo, hi]``: the mean loss, the band's
        extremes, held-out loss and accuracy (nan where a column has none). A step range goes to
        the column plotext puts its centre in, so a column fed by finished ranges never changes."""
        centres = self.x0 + (np.arange(FINE_BINS) + 0.5) * self.span / FINE_BINS
        col = np.floor(0.5 + (columns - 1) * (centres - lo) / (hi - lo)).astype(int)
        col = np.clip(col, 0, columns - 1)
        a = self.a

        def total(name):
            return np.bincount(col, weights=a[name], minlength=columns)

        def extreme(name, ufunc, empty):
            out = np.full(columns, empty)
            starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
            out[col[starts]] = ufunc.reduceat(a[name], starts)
            return out

        with np.errstate(invalid="ignore", divide="ignore"):
            n, hn, an = total("n"), total("hn"), total("an")
            out = {
                "loss": total("lsum" if logscale else "sum") / n,
                "held": total("hlsum" if logscale else "hsum") / hn,
                "acc": total("asum") / an,
            }
            low = extreme("blmin" if logscale else "bmin", np.minimum, np.inf)
            high = extreme("blmax" if logscale else "bmax", np.maximum, -np.inf)
        out["band_min"] = np.where(np.isfinite(low), low, np.nan)
        out["band_max"] = np.where(np.isfinite(high), high, np.nan)
        return out

    def extent(self, logscale: bool, band: bool) -> tuple[float, float] | None:
        """(min, max) of what the chart draws from these bins, at the bins' own resolution."""
        a = self.a
        with np.errstate(invalid="ignore", divide="ignore"):
            parts = [(a["lsum"] if logscale else a["sum"]) / a["n"],
                     (a["hlsum"] if logscale else a["hsum"]) / a["hn"]]
            if band:
                parts += [a["blmin"] if logscale else a["bmin"], a["blmax"] if logscale else a["bmax"]]
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        if not values.size:
            return None
        return float(values.min()), float(values.max())


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average over equally spaced columns, nan where a column is empty; a gap
    of k columns decays the average as k steps would. Each value depends only on the columns up
    to it, so a finished column's average never changes."""
    alpha = 2.0 / (max(span, 1.0) + 1)
    keep = 1.0 - alpha
    out = np.full(len(values), np.nan)
    acc, gap = None, 0
    for i, v in enumerate(values.tolist()):
        if v != v:
            gap += 1
            continue
        acc = v if acc is None else acc + (1.0 - keep ** (gap + 1)) * (v - acc)
        gap = 0
        out[i] = acc
    return out


def _tick_label(value: float, decimals: int) -> str:
    if decimals == 0 and abs(value) >= 10_000 and value % 1000 == 0:
        return f"{value / 1000:.0f}k"
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def nice_ticks(lo: float, hi: float, count: int) -> tuple[float, list[float], list[str]]:
    """(step, ticks, labels): about ``count`` ticks at a 1-2-5 step between ``lo`` and ``hi``."""
    step = nice_ceil((hi - lo) / max(1, count))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    start = math.ceil(lo / step - 1e-9)
    ticks = [round(k * step, 12) for k in range(start, math.floor(hi / step + 1e-9) + 1)]
    return step, ticks, [_tick_label(t, decimals) for t in ticks]


def one_per_row(ticks: list[float], labels: list[str], low: float, high: float,
                rows: int) -> tuple[list[float], list[str]]:
    """Every other tick dropped until no two fall on one text row (plotext would print either
    label there, varying from run to run)."""
    def row(value):
        return math.floor(0.5 + (rows - 1) * (value - low) / (high - low)) if rows > 1 else 0

    while len(ticks) > 1 and len({row(t) for t in ticks}) < len(ticks):
        ticks, labels = ticks[::2], labels[::2]
    return ticks, labels


def snap_out(low: float, high: float, count: int) -> tuple[float, float]:
    """``[low, high]`` widened to the 1-2-5 grid of about ``count`` steps."""
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    step = nice_ceil((high - low) / max(1, count))
    return round(math.floor(low / step + 1e-9) * step, 12), round(math.ceil(high / step - 1e-9) * step, 12)


class _Feed:
    """Which records of a RunState are already in its bins."""

    def __init__(self, state: RunState):
        self.header = state.header
        self.bins = LossBins.for_records(list(state.steps))
        self.last = state.steps[-1]

    def update(self, state: RunState) -> bool:
        """Bin the records that arrived since; False when the history is not the one binned (a
        new run, a seek, more records than the history keeps)."""
        if state.header is not self.header:
            return False
        new = []
        for record in reversed(state.steps):
            if record.step <= self.last.step:
                if record is not self.last:
                    return False
                break
            new.append(record)
        else:
            return not new
        new.reverse()
        self.bins.add(new)
        self.last = new[-1] if new else self.last
        return True


class ChartSlice(Widget):
    """A vertical slice of the loss chart. Textual sends a changed cell from the left edge of its
    widget on that line, so one widget the chart's width would resend whole lines for a few new
    columns at their right end; slices bound that to a slice's width."""

    DEFAULT_CSS = """
    ChartSlice { width: 1fr; height: 1fr; }
    """

    def __init__(self, plot: "LossPlot"):
        super().__init__()
        self.plot = plot

    def render_line(self, y: int) -> Strip:
        return self.plot.slice_line(self, y)


class LossPlot(PlotextPlot):
    """Loss (left axis) and accuracy (right axis, 0–1) over a run, drawn from fixed step ranges
    (:class:`LossBins`) on axes that only move when the run outgrows them: between growths a
    replot changes only the newest columns, and only those cells, slice by slice, are sent to
    the terminal (what an SSH user pays for). plotext renders everything on every build, so the
    text is cached."""

    SLICES = 24

    DEFAULT_CSS = """
    LossPlot { height: 1fr; min-height: 5; layout: horizontal; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._version = 0
        self._cache_key = None
        self._cache: Text | None = None
        self._rows: list[Text] | None = None  # the cached text's rows
        self._lines: dict[int, Strip] = {}  # and as full-width strips
        self._slice_lines: dict[tuple[int, int], Strip] = {}
        self._feeds: dict[int, _Feed] = {}
        self._yrange: tuple | None = None  # (what it was fitted for, low, high)
        self._plotted: tuple | None = None  # the last replot's arguments, and the width it drew for
        self._plotted_size = None
        self.plotted_for = None  # what the owner last plotted (state id, version, width)
        self._key: list[tuple[str, str]] = []  # (label, line kind) for the key line

    def compose(self):
        for _ in range(self.SLICES):
            yield ChartSlice(self)

    def on_resize(self) -> None:
        """A replot made before the layout settled drew for another size: draw again."""
        if self._plotted is not None and self._plotted[1] is None and self._plotted_size != self.size:
            self.replot(*self._plotted)

    def _bins(self, state: RunState) -> LossBins | None:
        if not state.steps:
            return None
        feed = self._feeds.get(id(state))
        if feed is None or not feed.update(state):
            feed = _Feed(state)
        self._feeds[id(state)] = feed
        return feed.bins

    def replot(self, series: list[tuple[str, RunState]], width: int | None = None,
               smooth: bool = True, fit: bool | None = None) -> None:
        """Plot the loss of one or more runs: an EMA line over the raw values drawn faint
        (``smooth``), the band of every step between samples (the record's window), held-out
        loss, and for one run its accuracy on the right axis. ``fit``: the x range ends at the
        last step (a replay, a finished run) instead of leaving room to grow; by default when
        every run has finished."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        self._key = []
        self._plotted, self._plotted_size = (series, width, smooth, fit), self.size
        total_width = width or self.size.width or 80
        height = self.size.height or 12
        bins = [self._bins(state) for _, state in series]
        self._feeds = {id(state): self._feeds[id(state)] for (_, state), b in zip(series, bins) if b}
        present = [b for b in bins if b is not None and b.a["n"].any()]
        if fit is None:
            fit = all(state.finished for _, state in series)
        if not present:
            plt.title("loss: no finite values yet")
            self._yrange = None
            self._show()
            return
        if fit:
            lo, hi = min(b.first for b in present), max(b.last for b in present)
            hi = max(hi, lo + 1)
        else:
            lo, hi = min(b.x0 for b in present), max(b.x0 + b.span for b in present)
        # a loss spanning many decades (an explosion) is plotted as log10, labelled so
        absmin = min(b.absmin for b in present)
        absmax = max(b.absmax for b in present)
        logscale = absmax > 0 and absmax / max(absmin, 1e-300) > 1e3
        name = "log10 loss" if logscale else "loss"
        single = len(series) == 1
        bands = single and bool(present[0].a["bn"].any())
        has_acc = single and bool(present[0].a["an"].any())

        rows = max(1, height - 4)  # the canvas: less the key, two axis lines and the tick labels
        count = max(2, min(6, rows // 2))
        low, high = self._fit_y(present, logscale, bands, (lo, hi, logscale, bands, height), count)
        _, yticks, ylabels = nice_ticks(low, high, count)
        yticks, ylabels = one_per_row(yticks, ylabels, low, high, rows)
        rticks, right = one_per_row([0, 0.5, 1], ["0", "0.5", "1"], 0, 1, rows) if has_acc else ([], [])
        canvas = max(2, total_width - 2 - max(map(len, ylabels)) - max(map(len, right), default=0))
        columns = 2 * canvas  # braille: two dot columns a cell
        _, xticks, xlabels = nice_ticks(lo, hi, max(2, canvas // 14))
        plt.xlim(lo, hi)
        plt.xticks(xticks, xlabels)
        plt.ylim(low, high)
        plt.yticks(yticks, ylabels)
        xs = lo + np.arange(columns) * (hi - lo) / (columns - 1)

        key: list[tuple[str, str]] = []  # the key line above the chart: plotext's own legend
        # sits on the canvas's top left, over the start of the run, on a chart a few rows high

        mono = self.theme == "clear"

        def line(values, colour: str, label: str = "", **kwargs):
            ok = np.isfinite(values)
            if not ok.any() or mono and colour not in MONO_MARKS:
                return
            marker = MONO_MARKS[colour] if mono else "braille"
            plt.plot(xs[ok].tolist(), values[ok].tolist(), marker=marker,
                     color="default" if mono else LINE_COLOURS[colour], **kwargs)
            if label:
                key.append((label, colour))

        for i, ((label, _), b) in enumerate(zip(series, bins)):
            if b is None:
                continue
            col = b.columns(lo, hi, columns, logscale)
            if single and bands:
                line(col["band_max"], "band", "max between samples")
                line(col["band_min"], "band")
            loss = col["loss"]
            colour = "loss" if i == 0 else "other"
            if smooth and np.isfinite(loss).sum() > 3:
                if single:
                    line(loss, "raw", "raw")
                line(ema(loss, columns * EMA_SPAN), colour, f"{label}{name} (EMA)")
            else:
                line(loss, colour, f"{label}{name}")
            if single:
                line(col["held"], "held", "held-out")
                if has_acc:
                    line(col["acc"], "acc", "acc (right axis)", yside="right")
                    plt.ylim(0, 1, yside="right")
                    plt.yticks(rticks, right, yside="right")
        self._key = key
        self._show()

    def _fit_y(self, bins: list[LossBins], logscale: bool, band: bool, fitted_for: tuple,
               count: int) -> tuple[float, float]:
        """The loss axis: snapped out to the 1-2-5 grid, kept while the data stays inside it,
        widened when it leaves, fitted afresh only when the x range or the scale changes."""
        extents = [e for e in (b.extent(logscale, band) for b in bins) if e is not None]
        if not extents:
            return 0.0, 1.0
        dmin, dmax = min(e[0] for e in extents), max(e[1] for e in extents)
        if self._yrange is not None and self._yrange[0] == fitted_for:
            _, low, high = self._yrange
            if low <= dmin and dmax <= high:
                return low, high
            dmin, dmax = min(dmin, low), max(dmax, high)
        low, high = snap_out(dmin, dmax, count)
        self._yrange = (fitted_for, low, high)
        return low, high

    def _show(self) -> None:
        """Send the terminal only the cells this replot changed."""
        before = self._cache.split("\n", allow_blank=True) if self._cache is not None else None
        shown_key = self._cache_key
        self._version += 1
        slices = list(self.query(ChartSlice)) if self.is_mounted else []
        if before is None or not slices or not self.size.width or not self.size.height:
            self._refresh_slices(slices)
            return
        after = self.chart_text().split("\n", allow_blank=True)
        if shown_key is None or shown_key[1:] != self._cache_key[1:]:
            self._refresh_slices(slices)  # resized or re-themed since: everything moves
            return
        for region in cell_changed_regions(before, after, self.size.width):
            for piece in slices:
                left = piece.region.x - self.content_region.x
                start, end = max(region.x, left), min(region.right, left + piece.size.width)
                if start < end:
                    piece.refresh(Region(start - left, region.y, end - start, 1))

    def _refresh_slices(self, slices: list) -> None:
        self.refresh()
        for piece in slices:
            piece.refresh()

    def key_line(self, width: int) -> Text:
        """What each line is, in its colour, on one line (names shortened before they are cut)."""
        mono = self.theme == "clear"
        for short in (False, True):
            text = Text(no_wrap=True, overflow="crop")
            text.append(" ")
            for i, (label, colour) in enumerate(self._key):
                if short:
                    label = label.replace("max between samples", "max").replace(" (right axis)", " →")
                if i:
                    text.append("  ")
                if mono:
                    mark = MONO_MARKS[colour]
                    text.append(("⣿" if mark == "braille" else mark * 2) + " ")
                else:
                    text.append("━━ ", style=Style(color=Color.from_ansi(LINE_COLOURS[colour])))
                text.append(label, style="dim" if colour == "raw" else "")
            if text.cell_len <= width:
                break
        return text

    def chart_text(self) -> Text:
        """The whole chart as text (plotext's build, made once per replot and size): the key
        line, then the plot in the rows below it."""
        key = (self._version, self.size.width, self.size.height, self.app.theme, self.theme)
        if key != self._cache_key or self._cache is None:
            width, height = self.size.width, max(1, self.size.height - 1)
            self._plot.plotsize(width, height)
            self._plot._set_size(width, height)  # as PlotextPlot.render does (textual-plotext #5)
            self._plot.theme(self._get_plotext_theme_name(self.app.theme))
            self._cache = self.key_line(width)
            self._cache.append("\n")
            self._cache.append_text(Text.from_ansi(self._plot.build()))
            self._cache_key = key
            self._rows, self._lines, self._slice_lines = None, {}, {}
        return self._cache

    def render(self) -> Text:
        return Text()  # the slices draw the chart

    def slice_line(self, piece: ChartSlice, y: int) -> Strip:
        text = self.chart_text()
        key = (id(piece), y)
        strip = self._slice_lines.get(key)
        if strip is None:
            line = self._lines.get(y)
            if line is None:
                if self._rows is None:
                    self._rows = text.split("\n", allow_blank=True)
                line = _cached_strip(self, self._rows, self._lines, y)
            left = piece.region.x - self.content_region.x
            strip = line.crop(left, left + piece.size.width)
            self._slice_lines[key] = strip
        return strip
