"""The modal screens: help (every key) and the preset picker. Both opaque (see help.tcss)."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..config import builtin_names, load_preset
from . import render as R
from .monitor import quick_presets, stylesheet, wrap_fields

HELP_KEYS = [
    ("space", "pause / resume training (replay: play / stop)"),
    ("n", "one training step (replay: step forward)"),
    ("r", "restart the current preset"),
    ("p", "preset picker (ctrl+p: command palette)"),
    ("p / P", "compare: a new preset for the right / left run"),
    ("1 … 9", "quick presets, listed below"),
    ("v", "next view: dashboard, heatmap, histograms, activations, time*"),
    ("b", "layers / blocks, in every view"),
    ("enter e", "open / close the selected block in place"),
    ("s", "loss chart: smoothed (EMA, raw faint) / raw"),
    ("!", "live: pause at the first non-finite step on / off"),
    ("g", "show ‖∂L/∂h‖ and ‖∂L/∂W‖ / only ‖∂L/∂h‖ / only ‖∂L/∂W‖"),
    ("↑ ↓", "select a layer or block (kept across views)"),
    ("+ -", "sample every more / fewer steps"),
    ("← →", "replay: one step backward / forward"),
    ("home end", "replay: first / last step"),
    ("f", "replay: jump to the first non-finite step"),
    ("x", "hide the error panel"),
    ("?", "this help (esc closes)"),
    ("q", "quit (stops and joins the training thread)"),
]


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = stylesheet("help.tcss")

    def __init__(self):
        super().__init__()
        self._wrapped_at: int | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self._text())

    def on_screen_resume(self) -> None:
        """The screen is kept between presses (App.show_help): rewrap if the terminal changed."""
        if self._wrapped_at != self._wrap_width():
            self.query_one(Static).update(self._text())

    def on_resize(self) -> None:
        self.on_screen_resume()

    def _wrap_width(self) -> int:
        return min(96, max(30, self.app.size.width - 12))

    def _text(self) -> Text:
        text = Text()
        text.append("vgtui — keys\n", style="bold")
        for key, what in HELP_KEYS:
            text.append(f"{key:>9}  ", style="bold")
            text.append(what + "\n")
        presets = [("presets:", "bold")] + [(f"{i + 1} {n}", "") for i, n in enumerate(quick_presets())]
        self._wrapped_at = self._wrap_width()
        text.append_text(wrap_fields(presets, self._wrapped_at, sep="  "))
        text.append("\ncolour = log10 of the norm, tiny ", style="dim")
        for colour in R.RAMP:
            text.append("█", style=colour)
        text.append(" huge, ", style="dim")
        text.append("✗", style=R.BAD_COLOUR)
        text.append(" not finite, · not measured; input layer at the top; "
                    "*through time: runs with recurrent layers", style="dim")
        return text


class PresetPicker(ModalScreen[str]):
    BINDINGS = [Binding("escape", "dismiss_none", "close")]
    DEFAULT_CSS = stylesheet("picker.tcss")

    def __init__(self, current: str | None = None):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        options = []
        for index, name in enumerate(builtin_names()):
            key = str(index + 1) if index < 9 else " "
            try:
                description = load_preset(name).description
            except Exception as exc:
                description = f"(cannot load: {exc})"
            label = Text()
            label.append(f"{key} {name}", style="bold")
            label.append(f"  {description}")
            options.append(Option(label, id=name))
        with Vertical():
            yield Static("Pick a preset (enter to start, esc to cancel)", id="picker-title")
            yield OptionList(*options, id="picker")

    def on_mount(self) -> None:
        picker = self.query_one(OptionList)
        if self.current:
            try:
                picker.highlighted = picker.get_option_index(self.current)
            except Exception:
                pass
        picker.focus()

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
