"""The vgtui Textual app and its one factory; the screens live beside it (dashboard.py,
compare.py, modals.py), their CSS in .tcss files."""

from __future__ import annotations

import os
from functools import partial

from textual.app import App
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.screen import Screen

from ..config import builtin_names, load_preset
from .compare import Compare
from .dashboard import Dashboard
from .modals import HelpScreen, PresetPicker
from .monitor import POLL_HZ, Monitor
from .sources import Source

__all__ = ["Compare", "Dashboard", "HelpScreen", "Monitor", "PresetPicker", "VgtuiApp", "make_app"]


class PresetCommands(Provider):
    """Every built-in preset in the command palette."""

    def _items(self):
        for name in builtin_names():
            try:
                description = load_preset(name).description
            except Exception:  # a broken preset file must not break the palette
                description = ""
            yield name, description

    async def discover(self) -> Hits:
        for name, description in self._items():
            yield DiscoveryHit(f"Preset: {name}", partial(self.app.switch_preset, name), help=description)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, description in self._items():
            command = f"Preset: {name}"
            score = matcher.match(command)
            if score > 0:
                yield Hit(score, matcher.highlight(command), partial(self.app.switch_preset, name),
                          help=description)


class VgtuiApp(App):
    TITLE = "vgtui"
    COMMANDS = App.COMMANDS | {PresetCommands}
    ENABLE_COMMAND_PALETTE = True

    def __init__(self, source: Source | None = None, *, compare: tuple[Source, Source] | None = None,
                 mono: bool = False, poll_hz: float = POLL_HZ, break_on_nonfinite: bool = True):
        self.mono = bool(mono or "NO_COLOR" in os.environ)
        super().__init__()
        self.source = source
        self.break_on_nonfinite = break_on_nonfinite
        self.compare = compare
        self.poll_hz = poll_hz
        self.theme = "textual-dark"

    def get_default_screen(self) -> Screen:
        if self.compare is not None:
            return Compare(*self.compare, poll_hz=self.poll_hz)
        return Dashboard(self.source, poll_hz=self.poll_hz, break_on_nonfinite=self.break_on_nonfinite)

    def show_help(self) -> None:
        """Push the help screen, built once and kept (installed), and opaque: a see-through modal
        re-renders the whole monitor beneath it (figures: docs/BENCHMARKS.md, TUI keys)."""
        if not self.is_screen_installed("help"):
            self.install_screen(HelpScreen(), "help")
        self.push_screen("help")

    def switch_preset(self, name: str) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, Dashboard):
                screen.switch_to(name)
                return
        self.notify("switching presets works in the live dashboard", severity="warning")

    @property
    def monitor(self) -> Monitor | None:
        for screen in reversed(self.screen_stack):
            if isinstance(screen, Monitor):
                return screen
        return None


def make_app(source: Source | None = None, *, compare: tuple[Source, Source] | None = None,
             mono: bool = False, poll_hz: float = POLL_HZ, break_on_nonfinite: bool = True) -> VgtuiApp:
    """The one factory behind the CLI, the Pilot tests and the snapshot tests.
    ``break_on_nonfinite``: a live run pauses at its first non-finite step (``--no-break``)."""
    if source is None and compare is None:
        raise ValueError("make_app needs a source or a pair to compare")
    return VgtuiApp(source, compare=compare, mono=mono, poll_hz=poll_hz,
                    break_on_nonfinite=break_on_nonfinite)
