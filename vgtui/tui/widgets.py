"""Cheap widgets: each renders one of the pure renderers, cached on (state version, size, view
options), so a repaint that changes nothing costs a dict lookup. One plotext chart (the loss),
replotted by its owner at a modest rate and cached the same way."""

from __future__ import annotations

import math

from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual_plotext import PlotextPlot

from . import render as R
from .state import RunState, downsample



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


def _finite(y: float) -> bool:
    return y == y and abs(y) != float("inf")


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Exponential moving average; the span grows with the history (about 1/20 of it, at least
    5 points), so that a long run reads as a trend and a short one is barely touched."""
    span = span or max(5, len(values) // 20)
    alpha = 2.0 / (span + 1)
    out, acc = [], None
    for v in values:
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


class LossPlot(PlotextPlot):
    """Loss (left axis) and accuracy (right axis) over the kept history, downsampled to the
    plot's width. plotext renders everything on every build, so the built text is cached."""

    DEFAULT_CSS = """
    LossPlot { height: 1fr; min-height: 5; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._version = 0
        self._cache_key = None
        self._cache: Text | None = None
        self.plotted_for = None  # what the owner last plotted (state id, version, width)

    def replot(self, series: list[tuple[str, RunState]], width: int | None = None,
               smooth: bool = True) -> None:
        """Plot the loss of one or more runs: an EMA line over the raw values drawn faint
        (``smooth``), the band of every step between samples (the record's window), held-out
        loss, and for one run its accuracy on the right axis."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        width = max(10, (width or self.size.width or 80) - 12)
        any_data = False
        finite = []
        for label, state in series:
            xs, loss = state.series("loss")
            finite.append([(x, y) for x, y in zip(xs, loss) if _finite(y)])
        values = [abs(y) for pairs in finite for _, y in pairs if y != 0]
        # a loss spanning many decades (an explosion) is plotted as log10, labelled so
        logscale = bool(values) and max(values) / max(min(values), 1e-300) > 1e3
        name = "log10 loss" if logscale else "loss"

        def shown(pairs):
            if logscale:
                return [(x, math.log10(abs(y)) if y else -300.0) for x, y in pairs]
            return pairs

        def line(pairs, **kwargs):
            if pairs:
                idx, ys = downsample([p[1] for p in pairs], width)
                plt.plot([pairs[i][0] for i in idx], ys, marker="braille", **kwargs)

        single = len(series) == 1
        for (label, state), pairs in zip(series, finite):
            pairs = shown(pairs)
            if not pairs:
                continue
            any_data = True
            if single:
                band = [(r.step, r.window) for r in state.steps if r.window is not None and r.window.steps > 1]
                if band:
                    line(shown([(x, w.loss_max) for x, w in band if _finite(w.loss_max)]), color="gray",
                         label="max between samples")
                    line(shown([(x, w.loss_min) for x, w in band if _finite(w.loss_min)]), color="gray")
            if smooth and len(pairs) > 3:
                if single:
                    line(pairs, color="gray")
                line(list(zip([p[0] for p in pairs], ema([p[1] for p in pairs]))),
                     label=f"{label}{name} (EMA)")
            else:
                line(pairs, label=f"{label}{name}")
            if single:
                xs = [r.step for r in state.steps]
                held = shown([(x, r.heldout_loss) for x, r in zip(xs, state.steps) if _finite(r.heldout_loss)])
                line(held, label="held-out", color="orange")
                _, acc = state.series("accuracy")
                line([(x, y) for x, y in zip(xs, acc) if y == y], yside="right", label="acc")
        if not any_data:
            plt.title("loss: no finite values yet")
        before = self._cache.split("\n", allow_blank=True) if self._cache is not None else None
        shown_key = self._cache_key
        self._version += 1
        if before is None or not self.is_mounted or not self.size.width or not self.size.height:
            self.refresh()
            return
        after = self.render().split("\n", allow_blank=True)
        if shown_key is None or shown_key[1:] != self._cache_key[1:]:
            self.refresh()  # resized or re-themed since: everything moves
            return
        regions = cell_changed_regions(before, after, self.size.width)
        if regions:
            self.refresh(*regions)

    def render(self):
        key = (self._version, self.size.width, self.size.height, self.app.theme, self.theme)
        if key != self._cache_key or self._cache is None:
            self._cache = super().render()
            self._cache_key = key
        return self._cache
