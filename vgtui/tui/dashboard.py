"""The dashboard: one run, live (a trainer thread), replayed (a cursor in a recording) or
attached (a file another process writes). What it may do with its source it asks the source's
:class:`~vgtui.tui.capabilities.Controls`.

Data flow: a timer owned by the screen polls its source (a channel drain, a file read, or a replay
cursor), feeds everything pending into a bounded RunState, and refreshes only the widgets that
show something new, inside ``app.batch_update()``. The loss chart (plotext) is replotted at most
every 1/PLOT_HZ seconds while training; its points stay put between growths of its axes, so a
replot sends only the newest columns. Nothing here touches a tensor or blocks the training thread.
"""

from __future__ import annotations

import math
import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import ContentSwitcher, Footer, Static

from .. import memory
from ..config import PresetError, load_preset
from . import render as R
from . import rows as rowplan
from .capabilities import Controls, offered_views
from .modals import PresetPicker
from .monitor import (DIAGNOSIS_REFRESH_S, DRAW_HZ, METRIC_MODES, POLL_HZ, SAMPLING_STEPS, STATUS_HZ,
                      VIEW_NAMES, VIEWS, Monitor, RowsScroll, quick_presets, stylesheet, wrap_fields)
from .sources import Source
from .state import RunState
from .widgets import Activations, Heatmap, Histogram, LayerRows, LossPlot, TextLines, ThroughTime


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

    DEFAULT_CSS = stylesheet("dashboard.tcss")

    def __init__(self, source: Source, poll_hz: float = POLL_HZ, break_on_nonfinite: bool = True):
        super().__init__(poll_hz)
        self.source = source
        self.state = RunState()
        self.view = "dash"
        self.smooth = True
        self.break_on_nonfinite = break_on_nonfinite
        self._broke_for: tuple | None = None
        self.errors_hidden_at = -1
        self.controls = Controls(source)
        self.cursor = self.controls.cursor  # a replay's position and play state (None otherwise)
        self._status_key = None
        self._status_at = 0.0
        self._diag_lines = -1
        self._diag_key = None
        self._diag_at = 0.0
        self._errors_key = None

    # -- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield TextLines(id="status")
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
        if self.cursor is not None:
            self.state.feed(self.source.upto(self.cursor.position))
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
        if self.cursor is not None:
            if self.cursor.playing:
                if self.cursor.at_end:
                    self.cursor.playing = False
                else:
                    self._seek(self.cursor.position + 1)
                    self.frame_times.append(time.perf_counter() - t0)
            else:
                self.update_status()
            return
        records = self.source.poll()
        changed = self.state.feed(records) if records else False
        if changed and self.break_if_nonfinite():
            self.state.feed(self.source.poll())  # the "paused" answer, if it is already there
        self.update_all(changed)
        if changed:
            self.frame_times.append(time.perf_counter() - t0)
            if not self.froze_long_lived and self.state.last is not None:
                # The first step is on screen: the app's modules and widgets now exist for good.
                self.froze_long_lived = True
                memory.freeze_long_lived()

    def break_if_nonfinite(self) -> bool:
        """Live: pause the run the first time a non-finite value shows up, so that the moment
        worth inspecting stays on screen (``!`` or ``make_app(break_on_nonfinite=False)`` off)."""
        nonfinite = self.state.nonfinite
        if (nonfinite is None or not self.break_on_nonfinite or not self.controls.trains
                or self._broke_for == (self.state.run_id, nonfinite) or self.state.paused):
            return False
        self._broke_for = (self.state.run_id, nonfinite)
        self.source.pause()
        step, layer, where = nonfinite
        self.notify(f"paused at the first non-finite step {step}: {layer} ({where} pass). "
                    "space resumes; ! stops pausing", title="non-finite", severity="warning", timeout=8)
        return True

    def update_all(self, changed: bool = True, force: bool = False) -> None:
        if self.state.header is not None and self._planned_for is not self.state.header:
            self.plan_rows()
        with self.app.batch_update():
            self.update_status()
            self.update_selected()
            self.update_errors()
            self.update_diagnosis()  # keyed on the verdicts; throttled while they only tick
            if changed:
                self._draw_pending = True
            if force or (self._draw_pending and self.draw_due()):
                self._draw_pending = False
                view = self.query_one(f"#{self.view}") if self.view != "dash" else None
                if self.view == "dash":
                    rows = self.query_one(LayerRows)
                    if rows.changed():
                        rows.redraw(layout=rows.size.height != rows.wanted_height())
                    self.replot(force=force)
                elif view is not None and view.changed():
                    view.redraw()

    _draw_pending = False
    _drawn_at = 0.0

    def draw_due(self) -> bool:
        """Live, the views redraw at most DRAW_HZ times a second (records still arrive at every
        poll): a scrolling picture changes every cell on every step, and every redrawn line costs
        bytes on the wire (SSH). A replay redraws at once."""
        if not self.controls.trains:
            return True
        now = time.monotonic()
        if now - self._drawn_at >= 1.0 / DRAW_HZ:
            self._drawn_at = now
            return True
        return False

    def replot(self, force: bool = False) -> None:
        plot = self.query_one(LossPlot)
        key = (id(self.state), self.state.version, plot.size.width)
        if plot.plotted_for == key:
            return
        if force or not self.controls.trains or self.plot_due():
            fit = bool(self.state.finished) or self.controls.mode == "replay"  # no room to grow
            plot.replot([("", self.state)], smooth=self.smooth, fit=fit)
            plot.plotted_for = key

    def _status_text(self) -> Text:
        st, src = self.state, self.source
        last = st.last
        fields: list[tuple[str, str]] = []
        mode_of = self.controls.mode
        if mode_of == "live":
            if st.errors and (not last or st.errors[-1].step >= last.step):
                mode = ("✗ failed", "bold white on red")
            elif st.finished:
                mode = (f"■ {st.finished}", "bold")
            elif st.paused:
                mode = ("⏸ paused", "bold black on yellow")
            else:
                mode = ("▶ running", "bold black on green")
        elif mode_of == "replay":
            mode = ("▶ replay" if self.cursor.playing else "◼ replay", "bold reverse")
        else:
            mode = ("◉ attached", "bold reverse")
        if self.mono:
            mode = (mode[0], "bold reverse")
        fields.append((st.preset_name if st.header else src.label, "bold"))
        if mode_of != "live":
            fields.append((src.label, ""))
        if last is not None:
            where = f"step {last.step}"
            if self.cursor is not None and len(self.cursor):
                where += f" ({self.cursor.position + 1}/{len(self.cursor)})"
            fields.append((where, ""))
            if math.isfinite(last.steps_per_sec) and mode_of == "live":
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
            # while training, the step counter and steps/s tick on every poll: once a second is
            # enough for them; anything else (paused, failed, a new field) shows at once
            now = time.monotonic()
            ticking = (self.controls.trains and self._status_key is not None
                       and _shape(key[0]) == _shape(self._status_key[0]))
            if ticking and now - self._status_at < 1.0 / STATUS_HZ:
                return
            self._status_at = now
            # wrapped here by whole fields; only the changed characters reach the terminal
            self._status_key = key
            self.query_one("#status", TextLines).set(text)

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
        per-layer picture takes the room a deep one's rows would (up to 5 lines; the loss chart keeps the rest)."""
        n = len(self.rows) if self.state.header else 0
        if not n:
            return 1
        height = self.size.height or 24
        # what the views get: less the status bar, the selected line, the footer and the
        # diagnosis (one verdict below 30 lines, up to three above)
        views = height - 4 - (3 if height < 30 else 8)
        room = int(views * 0.75) - 2  # the rows' share (CSS max-height), less header and ratio
        return max(1, min(5, room // n))

    def update_selected(self) -> None:
        """The selected layer's (or block's) full name, always on screen, and the names' shared
        prefix, dropped from every label."""
        text = R.selected_line(self.state, self.rows, self.selected)
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
        if st.errors and self.controls.trains:
            lines.append(("press r to restart or p to pick another preset", ""))
        if st.nonfinite is not None:
            step, layer, where = st.nonfinite
            lines.append((f"NON-FINITE values since step {step}: first in {layer} ({where} pass)"
                          f"{'' if not self.controls.seeks else ' — f jumps there'}", "bold magenta"))
        if src.problems:
            shown = ", ".join(p.split(": ", 1)[0].rsplit(":", 1)[-1] for p in src.problems[:5])
            lines.append((f"{len(src.problems)} bad line(s) skipped in {src.label}: line {shown}"
                          f"{' …' if len(src.problems) > 5 else ''}", "bold yellow"))
            lines.append((src.problems[0], "dim"))
        if self.controls.follows and st.header is None:
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
        if (self.controls.trains and self._diag_key is not None and self._diag_key[0]
                and key[0] and [k[:2] for k in key[0]] == [k[:2] for k in self._diag_key[0]]
                and now - self._diag_at < DIAGNOSIS_REFRESH_S):
            return
        self._diag_at = now
        self._diag_key = key
        waiting = "waiting for the first step" if last is None else "the diagnosis needs more steps"
        limit = 1 if self.size.height < 30 else 3
        keys = {name: i + 1 for i, name in enumerate(quick_presets())} if self.controls.trains else None
        text = R.verdicts_text(verdicts, self.mono, limit, waiting, keys=keys)
        panel = self.query_one("#diagnosis", Static)
        # a layout pass (which repaints what it moves) only when the panel's line count changes
        lines = text.plain.count("\n")
        panel.update(text, layout=lines != self._diag_lines)
        self._diag_lines = lines

    # -- actions --------------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        # keys that do nothing for this source are hidden from the footer
        return self.controls.can(action)

    def _not_here(self, what: str) -> None:
        self.notify(f"{what} is not available in {self.controls.mode} mode", severity="warning", timeout=3)

    def action_toggle_play(self) -> None:
        if self.cursor is None:
            return
        if not self.cursor.playing and self.cursor.at_end:
            self._seek(0)
        self.cursor.playing = not self.cursor.playing
        self.update_status()

    def action_toggle_pause(self) -> None:
        if self.cursor is not None:
            return self.action_toggle_play()
        if not self.controls.trains:
            return self._not_here("pause")
        if self.state.paused:
            self.source.resume()
        else:
            self.source.pause()
        self.poll()  # show whatever is already there without waiting for the next tick

    def action_single_step(self) -> None:
        if self.cursor is not None:
            self.cursor.playing = False
            return self._seek(self.cursor.position + 1)
        if not self.controls.trains:
            return self._not_here("single step")
        if not self.state.paused:
            self.source.pause()
        self.source.single_step()

    def action_restart(self) -> None:
        if not self.controls.trains:
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
        if not self.controls.trains:
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
        if not self.controls.trains:
            return self._not_here("the preset picker")

        def picked(name: str | None) -> None:
            if name:
                self.switch_to(name)

        current = getattr(getattr(self.source, "preset", None), "name", None)
        self.app.push_screen(PresetPicker(current), picked)

    def action_quick(self, index: int) -> None:
        names = quick_presets()
        if 1 <= index <= len(names):
            self.switch_to(names[index - 1])

    def views(self) -> tuple[str, ...]:
        """The through-time view is there only for a run with recurrent layers."""
        return offered_views(VIEWS, [self.state])

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
            recurrent = list(dict.fromkeys(names.index(self.state.time_layer(x)) for x in self.state.time_layers))
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
        if not self.controls.trains:
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
        if self.cursor is None:
            return
        self.cursor.playing = False
        self._seek(self.cursor.position + delta)

    def action_seek_to(self, where: str) -> None:
        if self.cursor is None:
            return
        self.cursor.playing = False
        position = self.cursor.target(where)
        if position is None:
            self.notify("no non-finite step in this recording", timeout=3)
        else:
            self._seek(position)

    @property
    def position(self) -> int:
        """The replay cursor's index into the recording's steps (-1 when not replaying)."""
        return self.cursor.position if self.cursor is not None else -1

    def _seek(self, position: int) -> None:
        records = self.cursor.records_to(position)
        if records is None and self.state.last is not None:
            return
        state = RunState(self.state.maxlen)
        state.feed(records if records is not None else self.source.upto(self.cursor.position))
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


def _shape(text: str) -> str:
    """A status line with its digits blanked: equal shapes differ only in ticking numbers."""
    return "".join("#" if c.isdigit() else c for c in text)
