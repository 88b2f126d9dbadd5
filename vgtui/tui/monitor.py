"""What the dashboard and the compare screen share: the poll timer, the sizes, the options, and
the small helpers both draw with."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from ..config import builtin_names

POLL_HZ = 5.0
PLOT_HZ = 1.0  # live loss chart: replots per second at most (a replot sends its newest columns)
DRAW_HZ = 1.0  # live views: redraws per second at most (see Dashboard.draw_due)
STATUS_HZ = 1.0  # live status line: how often its ticking numbers are rewritten
DIAGNOSIS_REFRESH_S = 3.0
VIEWS = ("dash", "heatmap", "hist", "acts", "time")
VIEW_NAMES = {"dash": "dashboard", "heatmap": "heatmap", "hist": "histogram", "acts": "activations",
              "time": "through time"}
METRIC_MODES = ("both", "h", "W")
SAMPLING_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MIN_W, MIN_H = 40, 12


def stylesheet(name: str) -> str:
    """A screen's CSS, kept in a .tcss file beside this module (package data)."""
    return (Path(__file__).with_name(name)).read_text(encoding="utf-8")


def wrap_fields(fields: list[tuple[str, str]], width: int, sep: str = " · ") -> Text:
    """Fields joined by ``sep``, wrapped by whole fields (Rich would wrap inside a field)."""
    text = Text(no_wrap=True, overflow="crop")
    column = 0
    for i, (label, style) in enumerate(fields):
        if i:
            if column + len(sep) + len(label) > width:
                text.append("\n")
                column = 0
            else:
                text.append(sep, style="dim")
                column += len(sep)
        text.append(label, style=style)
        column += len(label)
    return text


def quick_presets() -> list[str]:
    return builtin_names()[:9]


class RowsScroll(VerticalScroll, can_focus=False):
    """Scrolls the per-layer rows (deep nets); never takes the keys (↑/↓ select layers)."""


class Monitor(Screen):
    """What the dashboard and the compare screen share: the poll timer, sizes, options."""

    DEFAULT_CSS = stylesheet("monitor.tcss")

    selected = 0
    metric_mode = "both"

    def __init__(self, poll_hz: float = POLL_HZ):
        super().__init__()
        self.poll_hz = poll_hz
        self._plot_at = 0.0
        self.frame_times: list[float] = []  # seconds per poll that did work (benchmarks read it)
        self.froze_long_lived = False

    @property
    def mono(self) -> bool:
        return getattr(self.app, "mono", False)

    def on_resize(self, event) -> None:
        small = event.size.width < MIN_W or event.size.height < MIN_H
        self.set_class(small, "too-small")
        if self.is_mounted:
            self.resized()

    def resized(self) -> None:
        pass

    def too_small_message(self) -> Static:
        return Static(f"terminal too small (min {MIN_W}×{MIN_H})", id="too-small")

    def start_polling(self) -> None:
        self.poll()
        self.set_interval(1.0 / self.poll_hz, self.poll, name="vgtui-poll")

    def poll(self) -> None:  # pragma: no cover - overridden
        pass

    def plot_due(self) -> bool:
        now = time.monotonic()
        if now - self._plot_at >= 1.0 / PLOT_HZ:
            self._plot_at = now
            return True
        return False
