"""The vgtui Textual app: dashboard (live, replay, attach), compare, preset picker, help.

Data flow: a timer owned by the screen polls its source (a channel drain, a file read, or a replay
cursor) at 6 Hz, feeds everything pending into a bounded RunState, and refreshes only the widgets
that show something new, inside ``app.batch_update()``. The loss chart (plotext) is replotted at
most once a second. Nothing here touches a tensor or blocks the training thread.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import ContentSwitcher, Footer, OptionList, Static
from textual.widgets.option_list import Option

from .. import memory
from ..formatting import fmt
from ..records import RunError
from . import render as R
from .sources import FollowSource, ReplaySource, Source
from . import rows as rowplan
from .state import RunState
from .widgets import Activations, Heatmap, Histogram, LayerRows, LossPlot, ThroughTime

POLL_HZ = 5.0
PLOT_HZ = 0.5
DIAGNOSIS_REFRESH_S = 3.0
VIEWS = ("dash", "heatmap", "hist", "acts", "time")
VIEW_NAMES = {"dash": "dashboard", "heatmap": "heatmap", "hist": "histogram", "acts": "activations",
              "time": "through time"}
METRIC_MODES = ("both", "h", "W")
SAMPLING_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MIN_W, MIN_H = 40, 12

HELP_KEYS = [
    ("space", "pause / resume training (replay: play / stop)"),
    ("n", "one training step (replay: step forward)"),
    ("r", "restart the current preset"),
    ("p", "preset picker (ctrl+p: command palette)"),
    ("p / P", "compare: a new preset for the right / left run"),
    ("1 … 9", "quick presets, listed below"),
    ("v", "cycle views: dashboard, heatmap, histograms, activations (through time: RNNs)"),
    ("b", "layers / blocks (deep models open as blocks), in every view"),
    ("enter e", "open / close the selected block in place"),
    ("s", "loss chart: smoothed (EMA, raw faint) / raw"),
    ("!", "live: pause at the first non-finite step on / off"),
    ("g", "show ‖∂L/∂h‖ and ‖∂L/∂W‖ / only ‖∂L/∂h‖ / only ‖∂L/∂W‖"),
    ("↑ ↓", "select a layer (histogram, highlighted row)"),
    ("+ -", "sample every more / fewer steps"),
    ("← →", "replay: one step backward / forward"),
    ("home end", "replay: first / last step"),
    ("f", "replay: jump to the first non-finite step"),
    ("x", "hide the error panel"),
    ("?", "this help (esc closes)"),
    ("q", "quit (stops and joins the training thread)"),
]


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


def _quick_presets() -> list[str]:
    from ..config import builtin_names

    return builtin_names()[:9]


class RowsScroll(VerticalScroll, can_focus=False):
    """Scrolls the per-layer rows (deep nets); never takes the keys (↑/↓ select layers)."""


class PresetCommands(Provider):
    """Every built-in preset in the command palette."""

    def _items(self):
        from ..config import builtin_names, load_preset

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


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    /* Opaque: a see-through modal re-renders the whole monitor beneath it, tinted segment by
       segment, on every frame it draws, and on every frame the monitor updates beneath it. */
    HelpScreen { align: center middle; background: $background; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: auto; max-height: 90%;
        border: round $accent; background: $surface; padding: 0 1; }
    """

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
        presets = [("presets:", "bold")] + [(f"{i + 1} {n}", "") for i, n in enumerate(_quick_presets())]
        self._wrapped_at = self._wrap_width()
        text.append_text(wrap_fields(presets, self._wrapped_at, sep="  "))
        text.append("\ncolour = log10 of the norm, tiny ", style="dim")
        for colour in R.RAMP:
            text.append("█", style=colour)
        text.append(" huge, ", style="dim")
        text.append("✗", style=R.BAD_COLOUR)
        text.append(" nan/inf; input layer at the top", style="dim")
        return text


class PresetPicker(ModalScreen[str]):
    BINDINGS = [Binding("escape", "dismiss_none", "close")]
    DEFAULT_CSS = """
    PresetPicker { align: center middle; background: $background; }  /* opaque: see HelpScreen */
    PresetPicker > Vertical { width: 90%; max-width: 110; height: 90%; border: round $accent;
        background: $surface; }
    PresetPicker OptionList { height: 1fr; border: none; }
    PresetPicker #picker-title { padding: 0 1; text-style: bold; }
    """

    def __init__(self, current: str | None = None):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        from ..config import builtin_names, load_preset

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


class Monitor(Screen):
    """What the dashboard and the compare screen share: the poll timer, sizes, options."""

    DEFAULT_CSS = """
    Monitor #too-small { display: none; width: 1fr; height: 1fr; content-align: center middle;
        text-style: bold; }
    Monitor.too-small > * { display: none; }
    Monitor.too-small > #too-small { display: block; }
    """

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


class Dashboard(Monitor):
    """One run: live (a trainer thread), replay (seek in a recording), or attach (follow a file)."""

    # Footer order is priority order: a terminal narrower than 80 columns cuts it from the right,
    # and "? help" (which lists every key) must survive down to the 40-column minimum.
    BINDINGS = [
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("space", "toggle_pause", "pause"),
        Binding("space", "toggle_play", "play"),  # replay: the footer says what space does
        Binding("n", "single_step", "step"),
        Binding("r", "restart", "restart"),
        Binding("p", "picker", "presets"),
        Binding("v", "cycle_view", "view"),
        Binding("plus,equals_sign", "sampling(1)", "sampling", key_display="+/-"),
        Binding("minus", "sampling(-1)", "sampling", show=False),
        Binding("left", "seek(-1)", "seek", key_display="←/→"),
        Binding("right", "seek(1)", "seek", show=False),
        Binding("f", "seek_to('nonfinite')", "first NaN"),
        Binding("q", "quit", "quit"),
        # in the help screen; the footer shows what fits in 80 columns
        Binding("home", "seek_to('home')", "first", show=False),
        Binding("end", "seek_to('end')", "last", show=False),
        Binding("g", "cycle_metric", "h/W", show=False),
        Binding("up,k", "select(-1)", "layer", show=False),
        Binding("down,j", "select(1)", "layer", show=False),
        Binding("x", "hide_errors", "hide errors", show=False),
        Binding("b", "toggle_blocks", "blocks", show=False),
        Binding("enter,e", "expand", "open block", show=False),
        Binding("s", "toggle_smooth", "smooth", show=False),
        Binding("exclamation_mark", "toggle_break", "break at NaN", show=False),
        *[Binding(str(i), f"quick({i})", f"preset {i}", show=False) for i in range(1, 10)],
    ]

    DEFAULT_CSS = """
    Dashboard #status { height: auto; max-height: 2; background: $panel; padding: 0 1; }
    Dashboard #selected { height: 1; padding: 0 1; }
    Dashboard #errors { height: auto; max-height: 8; border: round $error; padding: 0 1;
        display: none; }
    Dashboard #errors.shown { display: block; }
    Dashboard #views { height: 1fr; }
    Dashboard #dash { height: 1fr; }
    Dashboard #rows-scroll { height: auto; max-height: 70%; padding: 0 1; }
    Dashboard #loss { height: 1fr; min-height: 4; }
    Dashboard .view { padding: 0 1; }
    Dashboard #diagnosis { height: auto; max-height: 12; border-top: solid $primary; padding: 0 1; }
    """

    def __init__(self, source: Source, poll_hz: float = POLL_HZ, break_on_nonfinite: bool = True):
        super().__init__(poll_hz)
        self.source = source
        self.state = RunState()
        self.view = "dash"
        self.smooth = True
        self.break_on_nonfinite = break_on_nonfinite
        self._broke_for: tuple | None = None
        self.errors_hidden_at = -1
        self.position = -1  # replay cursor (index into the recording's steps)
        self.playing = False
        self._status_key = None
        self._diag_key = None
        self._diag_at = 0.0
        self._errors_key = None

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Static(id="selected")
        yield Static(id="errors")
        with ContentSwitcher(initial="dash", id="views"):
            with Vertical(id="dash"):
                with RowsScroll(id="rows-scroll"):
                    yield LayerRows(self, id="rows")
                yield LossPlot(id="loss")
            yield Heatmap(self, id="heatmap", classes="view")
            yield Histogram(self, id="hist", classes="view")
            yield Activations(self, id="acts", classes="view")
            yield ThroughTime(self, id="time", classes="view")
        yield Static(id="diagnosis")
        yield self.too_small_message()
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        if self.mono:
            self.query_one(LossPlot).theme = "clear"
        self.rows_scroll = self.query_one("#rows-scroll", RowsScroll)
        if self.source.seekable:
            self.position = len(self.source.step_index) - 1
            self.state.feed(self.source.upto(self.position))
            self.update_all(force=True)
            self.set_interval(1.0 / self.poll_hz, self.poll, name="vgtui-poll")
        else:
            # After the first frame: starting a live source imports torch, which takes seconds.
            self.call_after_refresh(self.source.start)
            self.start_polling()

    def on_unmount(self) -> None:
        self.source.close()

    # -- the frame ------------------------------------------------------------------------------
    def poll(self) -> None:
        t0 = time.perf_counter()
        if self.source.seekable:
            if self.playing:
                if self.position >= len(self.source.step_index) - 1:
                    self.playing = False
                else:
                    self._seek(self.position + 1)
                    self.frame_times.append(time.perf_counter() - t0)
            else:
                self.update_status()
            return
        records = self.source.poll()
        changed = self.state.feed(records) if records else False
        if changed:
            self.break_if_nonfinite()
        self.update_all(changed)
        if changed:
            self.frame_times.append(time.perf_counter() - t0)
            if not self.froze_long_lived and self.state.last is not None:
                # The first step is on screen: the app's modules and widgets now exist for good.
                self.froze_long_lived = True
                memory.freeze_long_lived()

    def break_if_nonfinite(self) -> None:
        """Live: pause the run the first time a non-finite value shows up, so that the moment
        worth inspecting stays on screen (``!`` or ``make_app(break_on_nonfinite=False)`` off)."""
        nonfinite = self.state.nonfinite
        if (nonfinite is None or not self.break_on_nonfinite or not self.source.live
                or self._broke_for == (self.state.run_id, nonfinite) or self.state.paused):
            return
        self._broke_for = (self.state.run_id, nonfinite)
        self.source.pause()
        step, layer, where = nonfinite
        self.notify(f"paused at the first non-finite step {step}: {layer} ({where} pass). "
                    "space resumes; ! stops pausing", title="non-finite", severity="warning", timeout=8)

    def update_all(self, changed: bool = True, force: bool = False) -> None:
        if self.state.header is not None and self._planned_for is not self.state.header:
            self.plan_rows()
        with self.app.batch_update():
            self.update_status()
            self.update_selected()
            self.update_errors()
            self.update_diagnosis()  # keyed on the verdicts; throttled while they only tick
            if changed or force:
                view = self.query_one(f"#{self.view}") if self.view != "dash" else None
                if self.view == "dash":
                    rows = self.query_one(LayerRows)
                    if rows.changed():
                        rows.refresh(layout=rows.size.height != rows.wanted_height())
                    self.replot(force=force)
                elif view is not None and view.changed():
                    view.refresh()

    def replot(self, force: bool = False) -> None:
        plot = self.query_one(LossPlot)
        key = (id(self.state), self.state.version, plot.size.width)
        if plot.plotted_for == key:
            return
        if force or not self.source.live or self.plot_due():
            plot.replot([("", self.state)], smooth=self.smooth)
            plot.plotted_for = key

    def _status_text(self) -> Text:
        st, src = self.state, self.source
        last = st.last
        fields: list[tuple[str, str]] = []
        if src.kind == "live":
            if st.errors and (not last or st.errors[-1].step >= last.step):
                mode = ("✗ failed", "bold white on red")
            elif st.finished:
                mode = (f"■ {st.finished}", "bold")
            elif st.paused:
                mode = ("⏸ paused", "bold black on yellow")
            else:
                mode = ("▶ running", "bold black on green")
        elif src.kind == "replay":
            mode = ("▶ replay" if self.playing else "◼ replay", "bold reverse")
        else:
            mode = ("◉ attached", "bold reverse")
        if self.mono:
            mode = (mode[0], "bold reverse")
        fields.append((st.preset_name if st.header else src.label, "bold"))
        if src.kind != "live":
            fields.append((src.label, ""))
        if last is not None:
            where = f"step {last.step}"
            if src.seekable and src.step_index:
                where += f" ({self.position + 1}/{len(src.step_index)})"
            fields.append((where, ""))
            if math.isfinite(last.steps_per_sec) and src.kind == "live":
                fields.append((f"{last.steps_per_sec:.1f} steps/s", ""))
        # what the trainer actually used (it may adapt it to an overhead budget), else what we asked
        every = last.sample_every if last is not None else src.sample_every
        if every:
            fields.append((f"every {every}", ""))
        if last is not None and math.isfinite(last.probe_overhead):
            # the overhead budget is on: the probe's measured share of training time
            fields.append((f"probe {last.probe_overhead:.1%}", "dim"))
        if st.header:
            clip = st.header.preset.get("clip", "none")
            if clip == "none":
                fields.append(("clip off", "dim"))
            else:
                recent = list(st.steps)[-50:]
                share = sum(r.clipped for r in recent) / len(recent) if recent else 0.0
                fields.append((f"clip {clip} {share:.0%}", "bold" if share else ""))
        if src.dropped:
            fields.append((f"dropped {src.dropped}", "bold yellow" if not self.mono else "bold"))
        device = st.header.device if st.header else src.device
        fields.append((device, ""))
        if last is not None:
            fields.append((last.phase, "bold" if last.phase != "train" else ""))
        fields.append((VIEW_NAMES[self.view] + (" · blocks" if self.by_block else ""), "dim"))
        width = max(20, (self.size.width or 80) - 2)
        return wrap_fields([mode] + fields, width)

    def update_status(self) -> None:
        text = self._status_text()
        key = (text.plain, len(text.spans))
        if key != self._status_key:
            # the text is wrapped here (no_wrap): a layout pass only when its line count changes
            lines = text.plain.count("\n")
            relayout = self._status_key is None or self._status_key[0].count("\n") != lines
            self._status_key = key
            self.query_one("#status", Static).update(text, layout=relayout)

    def resized(self) -> None:
        self.row_lines = self._row_lines()
        self.update_status()
        self.update_selected()
        self._diag_key = None
        self.update_diagnosis()

    # -- layers or blocks -----------------------------------------------------------------------
    _planned_for = None
    by_block = False
    expanded: frozenset = frozenset()
    row_lines = 1

    def plan_rows(self) -> None:
        """A new run's names: deep models with repeated containers open as blocks."""
        self._planned_for = self.state.header
        names = self.state.layer_names
        self.by_block = len(names) > rowplan.BLOCKS_FROM and rowplan.has_blocks(names)
        self.expanded = frozenset()
        self.row_lines = self._row_lines()
        if self.view == "time" and not self.state.time_layers:
            self.show_view("dash")

    @property
    def rows(self) -> list[rowplan.Row]:
        return self.state.plan(self.by_block, self.expanded)

    def _row_lines(self) -> int:
        """Text lines per layer row on the dashboard: a shallow net's bars get taller, so its
        per-layer picture takes the room a deep one's rows would (up to 3 lines)."""
        n = len(self.rows) if self.state.header else 0
        if not n:
            return 1
        room = int((self.size.height or 24) * 0.6) - 3
        return max(1, min(3, room // n))

    def update_selected(self) -> None:
        """The selected layer's (or block's) full name, always on screen, and the names' shared
        prefix, dropped from every label."""
        text = Text(no_wrap=True, overflow="ellipsis")
        names = self.state.layer_names
        if names:
            rows = self.rows
            layer = max(0, min(self.selected, len(names) - 1))
            row = rows[rowplan.row_of(rows, layer)]
            if row.block:
                text.append(f"▸ {row.label}", style="bold")
                text.append(f"  block of {row.last - row.first + 1} layers "
                            f"({row.first + 1}–{row.last + 1} of {len(names)})")
            else:
                text.append(f"▸ {names[layer]}", style="bold")
                text.append(f"  layer {layer + 1}/{len(names)}")
                kinds = self.state.header.layer_kinds
                if layer < len(kinds) and kinds[layer] not in ("linear", "?"):
                    text.append(f" · {kinds[layer]}")
                tied = self.state.header.tied.get(names[layer])
                if tied:
                    text.append(f" · ⇄ tied to {', '.join(tied)}")
            prefix = self.state.prefix
            if prefix:
                text.append(f"  · labels drop “{prefix}”", style="dim")
        key = (text.plain, len(text.spans))
        if key != getattr(self, "_selected_key", None):
            self._selected_key = key
            self.query_one("#selected", Static).update(text)

    def _error_lines(self) -> list[tuple[str, str]]:
        st, src = self.state, self.source
        lines: list[tuple[str, str]] = []
        for error in st.errors[-2:]:
            first = error.message.splitlines()[0] if error.message else "unknown error"
            lines.append((f"training failed at step {error.step}: {first}", "bold red"))
        if st.errors and src.live:
            lines.append(("press r to restart or p to pick another preset", ""))
        if st.nonfinite is not None:
            step, layer, where = st.nonfinite
            lines.append((f"NON-FINITE values since step {step}: first in {layer} ({where} pass)"
                          f"{'' if not src.seekable else ' — f jumps there'}", "bold magenta"))
        if src.problems:
            shown = ", ".join(p.split(": ", 1)[0].rsplit(":", 1)[-1] for p in src.problems[:5])
            lines.append((f"{len(src.problems)} bad line(s) skipped in {src.label}: line {shown}"
                          f"{' …' if len(src.problems) > 5 else ''}", "bold yellow"))
            lines.append((src.problems[0], "dim"))
        if isinstance(src, FollowSource) and st.header is None:
            if not src.exists:
                lines.append((f"waiting for {src.path} to appear…", "yellow"))
            else:
                lines.append((f"waiting for the first record in {src.path}…", "yellow"))
        for message in st.notices[-1:]:
            lines.append((message, ""))
        return lines

    def update_errors(self) -> None:
        lines = self._error_lines()
        key = tuple(lines)
        if key == self._errors_key:
            return
        self._errors_key = key
        panel = self.query_one("#errors", Static)
        visible = bool(lines) and self.errors_hidden_at != len(lines)
        panel.set_class(visible, "shown")
        text = Text()
        for i, (line, style) in enumerate(lines):
            if i:
                text.append("\n")
            text.append(line, style=style if not self.mono else ("bold" if style else ""))
        panel.update(text)

    def update_diagnosis(self) -> None:
        last = self.state.last
        verdicts = last.verdicts if last is not None else []
        key = (tuple((v.kind, v.severity, v.summary, tuple(v.suggestions)) for v in verdicts),
               last is None, self.mono)
        if key == self._diag_key:
            return
        # verdict texts carry numbers that change every step, and a new text costs a layout
        # pass: while the verdicts stay the same kinds, refresh their wording every 3 s
        now = time.monotonic()
        if (self.source.live and self._diag_key is not None and self._diag_key[0]
                and key[0] and [k[:2] for k in key[0]] == [k[:2] for k in self._diag_key[0]]
                and now - self._diag_at < DIAGNOSIS_REFRESH_S):
            return
        self._diag_at = now
        self._diag_key = key
        waiting = "waiting for the first step" if last is None else "the diagnosis needs more steps"
        limit = 1 if self.size.height < 30 else 3
        keys = {name: i + 1 for i, name in enumerate(_quick_presets())} if self.source.live else None
        self.query_one("#diagnosis", Static).update(
            R.verdicts_text(verdicts, self.mono, limit, waiting, keys=keys))

    # -- actions --------------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        # keys that do nothing for this kind of source are hidden from the footer
        if action in ("seek", "seek_to"):
            return self.source.seekable
        if action in ("restart", "picker", "sampling", "quick"):
            return self.source.live
        if action == "toggle_pause":
            return self.source.live
        if action == "toggle_play":
            return self.source.seekable
        if action == "single_step":
            return self.source.live or self.source.seekable
        return True

    def _not_here(self, what: str) -> None:
        self.notify(f"{what} is not available in {self.source.kind} mode", severity="warning", timeout=3)

    def action_toggle_play(self) -> None:
        if not self.source.seekable:
            return
        if not self.playing and self.position >= len(self.source.step_index) - 1:
            self._seek(0)
        self.playing = not self.playing
        self.update_status()

    def action_toggle_pause(self) -> None:
        if self.source.seekable:
            return self.action_toggle_play()
        if not self.source.live:
            return self._not_here("pause")
        if self.state.paused:
            self.source.resume()
        else:
            self.source.pause()
        self.poll()  # show whatever is already there without waiting for the next tick

    def action_single_step(self) -> None:
        if self.source.seekable:
            self.playing = False
            return self._seek(self.position + 1)
        if not self.source.live:
            return self._not_here("single step")
        if not self.state.paused:
            self.source.pause()
        self.source.single_step()

    def action_restart(self) -> None:
        if not self.source.live:
            return self._not_here("restart")
        self._begin_run()
        self.source.restart()

    def _begin_run(self) -> None:
        self._broke_for = None
        self.state = RunState(self.state.maxlen)
        self.selected = min(self.selected, 0)
        self.errors_hidden_at = -1
        self.update_all(force=True)

    def switch_to(self, name: str) -> None:
        from ..config import PresetError, load_preset

        if not self.source.live:
            return self._not_here("switching presets")
        try:
            preset = load_preset(name)
        except (PresetError, OSError) as exc:
            self.notify(str(exc), title="bad preset", severity="error", timeout=8)
            return
        self._begin_run()
        self.source.switch(preset)
        self.notify(f"{preset.name}: {preset.description}", title="preset", timeout=4)

    def action_picker(self) -> None:
        if not self.source.live:
            return self._not_here("the preset picker")

        def picked(name: str | None) -> None:
            if name:
                self.switch_to(name)

        current = getattr(getattr(self.source, "preset", None), "name", None)
        self.app.push_screen(PresetPicker(current), picked)

    def action_quick(self, index: int) -> None:
        names = _quick_presets()
        if 1 <= index <= len(names):
            self.switch_to(names[index - 1])

    def views(self) -> tuple[str, ...]:
        """The through-time view is there only for a run with recurrent layers."""
        return VIEWS if self.state.time_layers else VIEWS[:-1]

    def action_cycle_view(self) -> None:
        views = self.views()
        index = views.index(self.view) if self.view in views else -1
        self.show_view(views[(index + 1) % len(views)])

    def show_view(self, view: str) -> None:
        self.view = view
        self.query_one(ContentSwitcher).current = self.view
        self._plot_at = 0.0
        self.update_all(force=True)

    def action_toggle_blocks(self) -> None:
        if not rowplan.has_blocks(self.state.layer_names):
            self.notify("this model has no repeated blocks", timeout=3)
            return
        self.by_block = not self.by_block
        self.expanded = frozenset()
        self.row_lines = self._row_lines()
        self.update_all(force=True)
        self.scroll_to_selected()

    def action_expand(self) -> None:
        """Open the selected block in place (or close the block the selected layer is in)."""
        if not self.by_block or not self.state.header:
            return
        rows = self.rows
        row = rows[rowplan.row_of(rows, max(0, self.selected))]
        if row.block:
            self.expanded = self.expanded | {row.label}
            self.selected = row.first
        else:
            owner = next((r for r in rowplan.blocks(self.state.layer_names)
                          if r.block and r.first <= self.selected <= r.last), None)
            if owner is None:
                return
            self.expanded = self.expanded - {owner.label}
            self.selected = owner.last
        self.row_lines = self._row_lines()
        self.update_all(force=True)
        self.scroll_to_selected()

    def action_toggle_smooth(self) -> None:
        self.smooth = not self.smooth
        self.query_one(LossPlot).plotted_for = None
        self.replot(force=True)

    def action_toggle_break(self) -> None:
        self.break_on_nonfinite = not self.break_on_nonfinite
        self.notify("pausing at the first non-finite step: " + ("on" if self.break_on_nonfinite else "off"),
                    timeout=3)

    def action_cycle_metric(self) -> None:
        self.metric_mode = METRIC_MODES[(METRIC_MODES.index(self.metric_mode) + 1) % len(METRIC_MODES)]
        self.update_all(force=True)

    def action_select(self, delta: int) -> None:
        """Move by rows (a block is one row); the selection is a layer, kept across views. In
        the through-time view, move among the recurrent layers."""
        n = self.state.n_layers
        if not n:
            return
        if self.view == "time" and self.state.time_layers:
            names = self.state.layer_names
            recurrent = [names.index(x) for x in self.state.time_layers]
            at = recurrent.index(self.selected) if self.selected in recurrent else 0
            self.selected = recurrent[max(0, min(len(recurrent) - 1, at + delta))]
        else:
            rows = self.rows
            r = max(0, min(len(rows) - 1, rowplan.row_of(rows, max(0, self.selected)) + delta))
            self.selected = rows[r].last if rows[r].block else rows[r].first
        self.update_all(force=True)
        self.scroll_to_selected()

    def scroll_to_selected(self) -> None:
        if self.view == "dash" and self.state.header:
            r = rowplan.row_of(self.rows, max(0, self.selected))
            y = 1 + r * self.row_lines
            self.rows_scroll.scroll_to(y=max(0, y - self.rows_scroll.size.height // 2), animate=False)

    def action_sampling(self, direction: int) -> None:
        if not self.source.live:
            return self._not_here("changing the sampling interval")
        # what we asked for, or what the trainer reports using if it adapted it upwards
        last = self.state.last
        current = max(self.source.sample_every or 1, last.sample_every if last is not None else 1)
        if direction > 0:
            new = next((s for s in SAMPLING_STEPS if s > current), current * 2)
        else:
            new = next((s for s in reversed(SAMPLING_STEPS) if s < current), 1)
        self.source.set_sample_every(new)
        self.update_status()

    def action_seek(self, delta: int) -> None:
        if not self.source.seekable:
            return
        self.playing = False
        self._seek(self.position + delta)

    def action_seek_to(self, where: str) -> None:
        if not self.source.seekable:
            return
        self.playing = False
        if where == "home":
            self._seek(0)
        elif where == "end":
            self._seek(len(self.source.step_index) - 1)
        else:
            position = self.source.first_nonfinite()
            if position is None:
                self.notify("no non-finite step in this recording", timeout=3)
            else:
                self._seek(position)

    def _seek(self, position: int) -> None:
        n = len(self.source.step_index)
        if not n:
            return
        position = max(0, min(n - 1, position))
        if position == self.position and self.state.last is not None:
            return
        self.position = position
        state = RunState(self.state.maxlen)
        state.feed(self.source.upto(position))
        state.version = self.state.version + 1
        self.state = state
        self.update_all(force=True)

    def action_hide_errors(self) -> None:
        self.errors_hidden_at = len(self._error_lines())
        self._errors_key = None
        self.update_errors()

    def action_help(self) -> None:
        self.app.show_help()

    def action_quit(self) -> None:
        self.app.exit()


class Compare(Monitor):
    """Two live runs side by side on the same batches, and one line saying how they differ."""

    # Footer order is priority order: a terminal narrower than 80 columns cuts it from the right,
    # and "? help" (which lists every key) must survive down to the 40-column minimum.
    BINDINGS = [
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("space", "toggle_pause", "pause"),
        Binding("n", "single_step", "step"),
        Binding("r", "restart", "restart"),
        Binding("p", "picker(1)", "right preset"),
        Binding("P", "picker(0)", "left preset", show=False),
        Binding("v", "cycle_view", "view"),
        Binding("g", "cycle_metric", "h/W"),
        Binding("q", "quit", "quit"),
        Binding("b", "toggle_blocks", "blocks", show=False),
        Binding("up,k", "select(-1)", "layer", show=False),
        Binding("down,j", "select(1)", "layer", show=False),
    ]

    DEFAULT_CSS = """
    Compare #status { height: auto; max-height: 2; background: $panel; padding: 0 1; }
    Compare #columns { height: auto; max-height: 70%; }
    Compare.views #columns { height: 1fr; max-height: 100%; }
    Compare.views #loss { display: none; }
    Compare ContentSwitcher { height: auto; }
    Compare.views ContentSwitcher { height: 1fr; }
    Compare .column { width: 1fr; height: auto; padding: 0 1; }
    Compare .column-title { text-style: bold; }
    Compare .verdict { height: auto; max-height: 3; }
    Compare #loss { height: 1fr; min-height: 4; }
    Compare #difference { height: auto; max-height: 4; border-top: solid $primary; padding: 0 1; }
    Compare #errors { height: auto; max-height: 3; color: $error; padding: 0 1; display: none; }
    Compare #errors.shown { display: block; }
    """

    metric_mode = "h"
    by_block = False

    class _Side:
        def __init__(self, owner: "Compare", source: Source):
            self.owner = owner
            self.source = source
            self.state = RunState()

        @property
        def selected(self):
            """The chosen layer where a view shows one layer; none highlighted in the rows."""
            return self.owner.selected if self.owner.view in ("hist", "acts") else -1

        @property
        def metric_mode(self):
            return self.owner.metric_mode if self.owner.metric_mode != "both" else "h"

        @property
        def mono(self):
            return self.owner.mono

        @property
        def by_block(self):
            return self.owner.by_block and rowplan.has_blocks(self.state.layer_names)

        expanded = frozenset()
        row_lines = 1

    def __init__(self, a: Source, b: Source, poll_hz: float = POLL_HZ):
        super().__init__(poll_hz)
        self.sides = [self._Side(self, a), self._Side(self, b)]
        self.view = "dash"
        self.selected = 0

    @property
    def state(self) -> RunState:  # for the shared helpers
        return self.sides[0].state

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Static(id="errors")
        with Horizontal(id="columns"):
            for i, side in enumerate(self.sides):
                with Vertical(classes="column"):
                    yield Static(id=f"title{i}", classes="column-title")
                    with ContentSwitcher(initial=f"dash{i}"):
                        yield LayerRows(side, id=f"dash{i}")
                        yield Heatmap(side, id=f"heatmap{i}")
                        yield Histogram(side, id=f"hist{i}")
                        yield Activations(side, id=f"acts{i}")
                    yield Static(id=f"verdict{i}", classes="verdict")
        yield LossPlot(id="loss")
        yield Static(id="difference")
        yield self.too_small_message()
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        if self.mono:
            self.query_one(LossPlot).theme = "clear"
        for side in self.sides:
            self.call_after_refresh(side.source.start)  # after the first frame (imports torch)
        self.start_polling()

    def on_unmount(self) -> None:
        for side in self.sides:
            side.source.close()

    def poll(self) -> None:
        t0 = time.perf_counter()
        changed = False
        for side in self.sides:
            records = side.source.poll()
            if records:
                changed |= side.state.feed(records)
        if changed:
            self.refresh_all()
            self.frame_times.append(time.perf_counter() - t0)

    def refresh_all(self, force: bool = False) -> None:
        side_width = (self.size.width or 80) // 2 - 2
        with self.app.batch_update():
            names = []
            for i, side in enumerate(self.sides):
                st = side.state
                names.append(st.preset_name if st.header else side.source.label)
                title = Text(names[-1], style="bold")
                if st.last is not None:
                    title.append(f"  step {st.last.step}  loss {fmt(st.last.loss, 0).strip()}", style="")
                if st.header:
                    width = max(10, side_width - 2)
                    title.append("\n" + R.clip_words(str(st.header.preset.get("description", "")), width),
                                 style="dim")
                self.query_one(f"#title{i}", Static).update(title)
                view = self.query_one(f"#{self.view}{i}")
                if view.changed() or force:
                    view.refresh(layout=self.view == "dash")
                verdicts = st.last.verdicts if st.last is not None else []
                self.query_one(f"#verdict{i}", Static).update(
                    R.verdicts_text(verdicts, self.mono, limit=1, waiting=""))
            paused = all(s.state.paused for s in self.sides)
            fields = [("⏸ paused" if paused else "▶ compare",
                       "bold reverse" if self.mono or not paused else "bold black on yellow"),
                      (f"{names[0]} vs {names[1]}", "bold"), ("same seed, same batches", "")]
            dropped = sum(s.source.dropped for s in self.sides)
            if dropped:
                fields.append((f"dropped {dropped}", "bold"))
            self.query_one("#status", Static).update(wrap_fields(fields, max(20, self.size.width - 2)))
            self.query_one("#difference", Static).update(self.difference())
            errors = []
            for side in self.sides:
                for error in side.state.errors[-1:]:
                    errors.append(f"{side.state.preset_name}: training failed at step {error.step}: "
                                  f"{error.message.splitlines()[0] if error.message else ''}")
                if side.state.nonfinite:
                    step, layer, where = side.state.nonfinite
                    errors.append(f"{side.state.preset_name}: non-finite since step {step} in {layer} ({where})")
            panel = self.query_one("#errors", Static)
            panel.update("\n".join(errors))
            panel.set_class(bool(errors), "shown")
            plot = self.query_one(LossPlot)
            key = tuple((id(s.state), s.state.version) for s in self.sides)
            if plot.plotted_for != key and (force or self.plot_due()):
                plot.replot([(f"{names[0]} ", self.sides[0].state), (f"{names[1]} ", self.sides[1].state)])
                plot.plotted_for = key

    def resized(self) -> None:
        self.refresh_all()

    def difference(self) -> Text:
        a, b = (s.state for s in self.sides)
        text = Text()
        if a.last is None or b.last is None:
            text.append("waiting for both runs…", style="dim")
            return text
        step = min(a.last.step, b.last.step)
        ra, rb = _at_step(a, step), _at_step(b, step)
        fa, fb = ra.first_last_ratio().value, rb.first_last_ratio().value
        text.append(f"at step {step}: ", style="bold")
        text.append("input/output ‖∂L/∂h‖ ")
        text.append(f"{fmt(fa, 0).strip()}", style="bold")
        text.append(f" ({a.preset_name}) vs ")
        text.append(f"{fmt(fb, 0).strip()}", style="bold")
        text.append(f" ({b.preset_name})")
        if fa > 0 and fb > 0 and math.isfinite(fa) and math.isfinite(fb):
            da, db = abs(math.log10(fa)), abs(math.log10(fb))  # decades away from 1 (healthy)
            if abs(da - db) >= 0.5:
                better = b.preset_name if db < da else a.preset_name
                text.append(f"; {better}'s is {10 ** abs(da - db):.0f}× closer to 1")
        text.append(" · loss ")
        text.append(f"{fmt(ra.loss, 0).strip()}", style="bold")
        text.append(" vs ")
        text.append(f"{fmt(rb.loss, 0).strip()}", style="bold")
        return text

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("toggle_pause", "single_step", "restart", "picker"):
            return True if all(s.source.live for s in self.sides) else None
        return True

    def action_picker(self, index: int) -> None:
        """A new preset for one side (p: right, P: left); both runs start again from step 0 with
        the left run's seed, so that they keep seeing the same batches."""
        def picked(name: str | None) -> None:
            if name:
                self.switch_side(index, name)

        current = getattr(getattr(self.sides[index].source, "preset", None), "name", None)
        self.app.push_screen(PresetPicker(current), picked)

    def switch_side(self, index: int, name: str) -> None:
        from ..config import PresetError, load_preset

        try:
            preset = load_preset(name)
        except (PresetError, OSError) as exc:
            self.notify(str(exc), title="bad preset", severity="error", timeout=8)
            return
        other = self.sides[1 - index]
        seed = getattr(getattr(other.source, "preset", None), "seed", None)
        if seed is not None and preset.seed != seed:
            preset = preset.replace(seed=seed)  # same seed => identical batches
        for side in self.sides:
            side.state = RunState()
        self.sides[index].source.switch(preset)
        other.source.restart()
        self.refresh_all(force=True)
        self.notify(f"{preset.name}: {preset.description}", title="preset", timeout=4)

    def action_toggle_pause(self) -> None:
        paused = all(s.state.paused for s in self.sides)
        for side in self.sides:
            side.source.resume() if paused else side.source.pause()

    def action_single_step(self) -> None:
        for side in self.sides:
            if not side.state.paused:
                side.source.pause()
            side.source.single_step()

    def action_restart(self) -> None:
        for side in self.sides:
            side.state = RunState()
            side.source.restart()
        self.refresh_all(force=True)

    def action_cycle_metric(self) -> None:
        self.metric_mode = "W" if self.metric_mode == "h" else "h"
        self.refresh_all(force=True)

    def action_toggle_blocks(self) -> None:
        self.by_block = not self.by_block
        self.refresh_all(force=True)

    def action_cycle_view(self) -> None:
        """Both columns switch together: the same view of two runs, side by side."""
        views = VIEWS[:-1]  # through time: on the dashboard of a recurrent run
        self.view = views[(views.index(self.view) + 1) % len(views)]
        self.set_class(self.view != "dash", "views")
        for i, switcher in enumerate(self.query(ContentSwitcher)):
            switcher.current = f"{self.view}{i}"
        self.refresh_all(force=True)

    def action_select(self, delta: int) -> None:
        """The layer the histogram and activation views show, the same index on both sides."""
        n = min((side.state.n_layers for side in self.sides), default=0)
        if n:
            self.selected = max(0, min(n - 1, self.selected + delta))
            self.refresh_all(force=True)

    def action_help(self) -> None:
        self.app.show_help()

    def action_quit(self) -> None:
        self.app.exit()


def _at_step(state: RunState, step: int):
    for record in reversed(state.steps):
        if record.step <= step:
            return record
    return state.last


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
        """Push the help screen, built once and kept (installed). With 200 layers on a paused
        monitor, `?` → help on screen took 40 ms as a see-through modal composed anew on each
        press, 32 ms opaque, and 11 ms opaque and kept (benchmarks/tui_keys.py --pause)."""
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
