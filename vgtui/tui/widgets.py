"""Cheap widgets: each renders one of the pure renderers, cached on (state version, size, view
options), so a repaint that changes nothing costs a dict lookup. One plotext chart (the loss),
replotted by its owner at a modest rate and cached the same way."""

from __future__ import annotations

import math

from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget
from textual_plotext import PlotextPlot

from . import render as R
from .state import RunState, downsample


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
        return (self.owner.selected, self.owner.metric_mode, self.owner.mono)

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
        screen. A whole Text goes through Textual's Content conversion span by span: `v` → the
        200-layer heatmap took 26 ms of a paused UI that way, 13 ms this way (and 61-75 → 44 ms
        while training); for LayerRows it cost the trainer ~14 % of its steps/s on a 30-layer
        net (GIL shared with the UI), growing with depth."""
        text = self.render()  # cached on (state version, size, options)
        if self._rows_of is not text:
            self._rows_of, self._rows, self._strips = text, text.split("\n", allow_blank=True), {}
        strip = self._strips.get(y)
        if strip is None:
            width, style = self.size.width, self.rich_style
            if y < len(self._rows):
                segments = list(self._rows[y].render(self.app.console))
                strip = Strip(segments).crop_extend(0, width, style).apply_style(style)
            else:
                strip = Strip.blank(width, style)
            self._strips[y] = strip
        return strip

    def changed(self) -> bool:
        key = (self.state.version, id(self.state), self.size.width, self.size.height, self.options())
        return key != self._key


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

    def get_content_height(self, container, viewport, width: int) -> int:
        n = self.state.n_layers
        return n + 2 if n else 1

    def draw(self, width: int, height: int) -> Text:
        return R.layer_rows(self.state, width, self.metrics(), self.owner.selected, self.owner.mono)


class Heatmap(View):
    def draw(self, width: int, height: int) -> Text:
        metric = "weight_grad_norm" if self.owner.metric_mode == "W" else "act_grad_norm"
        return R.heatmap(self.state, width, height, metric, self.owner.mono)


class Histogram(View):
    def draw(self, width: int, height: int) -> Text:
        return R.histogram(self.state, self.owner.selected, width, height, self.owner.mono)


class Activations(View):
    def draw(self, width: int, height: int) -> Text:
        return R.activations(self.state, width, self.owner.selected, self.owner.mono, height)


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

    def replot(self, series: list[tuple[str, RunState]], width: int | None = None) -> None:
        """Plot the loss (and accuracy) of one or more runs."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        width = max(10, (width or self.size.width or 80) - 12)
        any_data = False
        finite = []
        for label, state in series:
            xs, loss = state.series("loss")
            finite.append([(x, y) for x, y in zip(xs, loss) if y == y and abs(y) != float("inf")])
        values = [abs(y) for pairs in finite for _, y in pairs if y != 0]
        # a loss spanning many decades (an explosion) is plotted as log10, labelled so
        logscale = bool(values) and max(values) / max(min(values), 1e-300) > 1e3
        name = "log10 loss" if logscale else "loss"
        for (label, state), pairs in zip(series, finite):
            if logscale:
                pairs = [(x, math.log10(abs(y)) if y else -300.0) for x, y in pairs]
            if pairs:
                idx, ys = downsample([p[1] for p in pairs], width)
                plt.plot([pairs[i][0] for i in idx], ys, label=f"{label}{name}", marker="braille")
                any_data = True
            xs, _ = state.series("loss")
            if len(series) == 1:
                _, acc = state.series("accuracy")
                apairs = [(x, y) for x, y in zip(xs, acc) if y == y]
                if apairs:
                    idx, ys = downsample([p[1] for p in apairs], width)
                    plt.plot([apairs[i][0] for i in idx], ys, yside="right", label="acc",
                             marker="braille")
        if not any_data:
            plt.title("loss: no finite values yet")
        self._version += 1
        self.refresh()

    def render(self):
        key = (self._version, self.size.width, self.size.height, self.app.theme, self.theme)
        if key != self._cache_key or self._cache is None:
            self._cache = super().render()
            self._cache_key = key
        return self._cache
