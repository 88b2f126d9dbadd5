"""Two live runs side by side on the same batches, and one line saying how they differ."""

from __future__ import annotations

import math
import textwrap
import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import ContentSwitcher, Footer, Static

from ..config import PresetError, load_preset
from ..formatting import fmt
from . import render as R
from . import rows as rowplan
from .capabilities import capabilities, offered_views
from .modals import PresetPicker
from .monitor import POLL_HZ, VIEW_NAMES, VIEWS, Monitor, RowsScroll, stylesheet, wrap_fields
from .sources import Source
from .state import RunState
from .widgets import Activations, Heatmap, Histogram, LayerRows, LossPlot, ThroughTime


class _SideThroughTime(ThroughTime):
    """One side of the through-time view, on the log scale both sides share (it changes with
    the other run, so it is part of what the drawing is cached on)."""

    def options(self) -> tuple:
        return super().options() + (self.owner.time_scale,)

    def draw(self, width: int, height: int) -> Text:
        state = self.state
        if state.last is None:
            return Text("waiting for the first record…", style="dim")
        if not state.time_layers:
            # said in words that fit half a terminal, not an empty box beside the other run's
            words = f"{state.preset_name} has no recurrent layer: nothing to measure through time."
            return Text("\n".join(textwrap.wrap(words, max(10, width))), style="dim")
        return R.through_time(state, width, height, self.owner.selected, self.owner.mono,
                              scale=self.owner.time_scale)


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
        Binding("enter,e", "expand", "open block", show=False),
        Binding("up,k", "select(-1)", "layer", show=False),
        Binding("down,j", "select(1)", "layer", show=False),
    ]

    DEFAULT_CSS = stylesheet("compare.tcss")

    metric_mode = "h"
    by_block = False

    class _Side:
        """What one column's widgets read (the dashboard's names): its run, and the shared
        options as they apply to it."""

        def __init__(self, owner: "Compare", source: Source):
            self.owner = owner
            self.source = source
            self.state = RunState()
            self.expanded: frozenset = frozenset()  # this run's open blocks (layouts may differ)

        @property
        def selected(self) -> int:
            """The shared selection, a layer index, on this run: the through-time view shows
            this run's nearest recurrent layer at or before it, toward the input (the other run
            may have its recurrent layers at other depths)."""
            layer = min(self.owner.selected, max(0, self.state.n_layers - 1))
            if self.owner.view == "time":
                recurrent = _recurrent_layers(self.state)
                if recurrent and layer not in recurrent:
                    layer = max((i for i in recurrent if i <= layer), default=recurrent[0])
            return layer

        @property
        def rows(self) -> list[rowplan.Row]:
            return self.state.plan(self.by_block, self.expanded)

        @property
        def time_scale(self):
            return self.owner.time_scale

        @property
        def metric_mode(self):
            return self.owner.metric_mode if self.owner.metric_mode != "both" else "h"

        @property
        def mono(self):
            return self.owner.mono

        @property
        def by_block(self):
            return self.owner.by_block and rowplan.has_blocks(self.state.layer_names)

        row_lines = 1

    def __init__(self, a: Source, b: Source, poll_hz: float = POLL_HZ):
        super().__init__(poll_hz)
        self.sides = [self._Side(self, a), self._Side(self, b)]
        self.view = "dash"
        self.selected = 0
        self._planned_for: tuple | None = None
        self._scale_key = None
        self._scale = None

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
                    yield Static(id=f"selected{i}", classes="column-selected")
                    with ContentSwitcher(initial=f"dash{i}"):
                        with RowsScroll(id=f"dash{i}"):
                            yield LayerRows(side, id=f"rows{i}")
                        yield Heatmap(side, id=f"heatmap{i}")
                        yield Histogram(side, id=f"hist{i}")
                        yield Activations(side, id=f"acts{i}")
                        yield _SideThroughTime(side, id=f"time{i}")
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
        headers = tuple(id(s.state.header) for s in self.sides)
        if self._planned_for != headers:
            self.plan_rows(headers)
        if (self.view == "time" and all(s.state.last is not None for s in self.sides)
                and "time" not in self.views()):
            self.show_view("dash")  # new runs without recurrent layers
            return
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
                self.query_one(f"#selected{i}", Static).update(R.selected_line(st, side.rows, side.selected))
                view = self.query_one(f"#{'rows' if self.view == 'dash' else self.view}{i}")
                if view.changed() or force:
                    view.refresh(layout=self.view == "dash")
                verdicts = st.last.verdicts if st.last is not None else []
                self.query_one(f"#verdict{i}", Static).update(
                    R.verdicts_text(verdicts, self.mono, limit=1, waiting=""))
            paused = all(s.state.paused for s in self.sides)
            trains = all("train" in capabilities(s.source) for s in self.sides)
            fields = [("⏸ paused" if paused else "▶ compare",
                       "bold reverse" if self.mono or not paused else "bold black on yellow"),
                      (f"{names[0]} vs {names[1]}", "bold"),
                      ("same seed, same batches" if trains else "two recordings", "")]
            fields.append((VIEW_NAMES[self.view] + (" · blocks" if self.by_block else ""), "dim"))
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

    # -- layers or blocks, shared where the runs share them -------------------------------------
    def plan_rows(self, headers: tuple) -> None:
        """New runs: deep models with repeated containers open as blocks (as on the dashboard),
        every block closed; the selection stays where it was if the runs still have it."""
        changed = [s for s, h in zip(self.sides, self._planned_for or (None, None)) if id(s.state.header) != h]
        self._planned_for = headers
        for side in changed:
            side.expanded = frozenset()
        names = [s.state.layer_names for s in self.sides]
        self.by_block = any(len(n) > rowplan.BLOCKS_FROM and rowplan.has_blocks(n) for n in names)

    def _lead(self) -> "Compare._Side":
        """The run whose rows the selection moves through: the deeper one (the left on a tie),
        so that every layer of either run can be reached."""
        return max(self.sides, key=lambda s: s.state.n_layers)

    def views(self) -> tuple[str, ...]:
        return offered_views(VIEWS, [s.state for s in self.sides])

    @property
    def time_scale(self) -> tuple[float, float] | None:
        """The log scale both sides of the through-time view draw on."""
        key = tuple((id(s.state), s.state.version) for s in self.sides)
        if key != self._scale_key:
            self._scale_key = key
            self._scale = R.time_scale([s.state for s in self.sides])
        return self._scale

    def scroll_to_selected(self) -> None:
        if self.view != "dash":
            return
        for i, side in enumerate(self.sides):
            if side.state.header:
                scroll = self.query_one(f"#dash{i}", RowsScroll)
                y = 1 + rowplan.row_of(side.rows, side.selected)
                scroll.scroll_to(y=max(0, y - scroll.size.height // 2), animate=False)

    def difference(self) -> Text:
        a, b = (s.state for s in self.sides)
        text = Text()
        if a.last is None or b.last is None:
            text.append("waiting for both runs…", style="dim")
            return text
        if self.view == "time":
            return self.time_difference()
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

    def time_difference(self) -> Text:
        """Through time: how much of the last step's gradient reaches the first input step in
        each run (the newest measured batch of each), and how many decades apart they are."""
        text = Text()
        text.append("through time (one log scale for both), newest batch: ", style="bold")
        text.append("‖∂L/∂h_0‖ / ‖∂L/∂h_last‖ ")
        ratios = []
        for n, side in enumerate(self.sides):
            st = side.state
            if n:
                text.append(" vs ")
            series = R.time_series_of(st, side.selected)
            if series is None:
                text.append(f"no recurrent layer ({st.preset_name})", style="dim")
                ratios.append(float("nan"))
                continue
            g = st.last.time_act_grad_norm[series]
            ratio = float(g[0] / g[-1]) if len(g) > 1 and g[-1] > 0 else float("nan")
            ratios.append(ratio)
            text.append(fmt(ratio, 0).strip(), style="bold")
            text.append(f" ({st.preset_name}, {len(g)} steps)")
        fa, fb = ratios
        if fa > 0 and fb > 0 and math.isfinite(fa) and math.isfinite(fb):
            da, db = abs(math.log10(fa)), abs(math.log10(fb))  # decades away from 1 (healthy)
            if abs(da - db) >= 0.5:
                names = [s.state.preset_name for s in self.sides]
                better = names[1] if db < da else names[0]
                text.append(f"; {better}'s is {abs(da - db):.0f} decades closer to 1")
        a, b = (s.state for s in self.sides)
        step = min(a.last.step, b.last.step)  # what it does to learning: the loss, at one step
        text.append(f" · loss at step {step} ")
        text.append(fmt(_at_step(a, step).loss, 0).strip(), style="bold")
        text.append(" vs ")
        text.append(fmt(_at_step(b, step).loss, 0).strip(), style="bold")
        return text

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("toggle_pause", "single_step", "restart", "picker"):
            # two recordings: nothing to pause, step, restart or swap; the footer leaves them out
            return True if all("train" in capabilities(s.source) for s in self.sides) else False
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
        if not any(rowplan.has_blocks(s.state.layer_names) for s in self.sides):
            self.notify("neither model has repeated blocks", timeout=3)
            return
        self.by_block = not self.by_block
        for side in self.sides:
            side.expanded = frozenset()
        self.refresh_all(force=True)
        self.scroll_to_selected()

    def action_expand(self) -> None:
        """Open the selected block in place (or close the block the selected layer is in), as on
        the dashboard. The deeper run decides which and where the selection goes; each run then
        opens the block that holds the new selection (closes the one that held the old) in its
        own layout: the same block on both when they share it."""
        lead = self._lead()
        if not self.by_block or not lead.state.header:
            return
        rows = lead.rows
        row = rows[rowplan.row_of(rows, lead.selected)]
        if row.block:
            self.selected = row.first
            for side in self.sides:
                mine = side.rows[rowplan.row_of(side.rows, side.selected)] if side.by_block else None
                if mine is not None and mine.block:
                    side.expanded = side.expanded | {mine.label}
        else:
            owners = [self._open_block_of(side) for side in self.sides]
            if owners[self.sides.index(lead)] is None:
                return
            for side, owner in zip(self.sides, owners):
                if owner is not None:
                    side.expanded = side.expanded - {owner.label}
            self.selected = owners[self.sides.index(lead)].last
        self.refresh_all(force=True)
        self.scroll_to_selected()

    @staticmethod
    def _open_block_of(side) -> rowplan.Row | None:
        """The expanded block that holds the side's selected layer, if any."""
        layer = side.selected
        return next((r for r in rowplan.blocks(side.state.layer_names)
                     if r.block and r.first <= layer <= r.last and r.label in side.expanded), None)

    def action_cycle_view(self) -> None:
        """Both columns switch together: the same view of two runs, side by side (through time
        when at least one of them has recurrent layers)."""
        views = self.views()
        index = views.index(self.view) if self.view in views else -1
        self.show_view(views[(index + 1) % len(views)])

    def show_view(self, view: str) -> None:
        self.view = view
        self.set_class(self.view != "dash", "views")
        for i, switcher in enumerate(self.query(ContentSwitcher)):
            switcher.current = f"{self.view}{i}"
        self.refresh_all(force=True)
        self.scroll_to_selected()

    def action_select(self, delta: int) -> None:
        """Move by rows of the deeper run (a block is one row); the selection is a layer index,
        shared, kept across views and ``b``. Through time: among the recurrent layers."""
        lead = self._lead()
        if not lead.state.n_layers:
            return
        if self.view == "time":
            recurrent = sorted({i for s in self.sides for i in _recurrent_layers(s.state)})
            if not recurrent:
                return
            at = max((k for k, i in enumerate(recurrent) if i <= self.selected), default=0)
            self.selected = recurrent[max(0, min(len(recurrent) - 1, at + delta))]
        else:
            rows = lead.rows
            r = max(0, min(len(rows) - 1, rowplan.row_of(rows, lead.selected) + delta))
            self.selected = rows[r].last if rows[r].block else rows[r].first
        self.refresh_all(force=True)
        self.scroll_to_selected()

    def action_help(self) -> None:
        self.app.show_help()

    def action_quit(self) -> None:
        self.app.exit()


def _recurrent_layers(state: RunState) -> list[int]:
    """Indices of the layers that have a through-time series, input first."""
    names = state.layer_names
    return sorted({names.index(state.time_layer(s)) for s in state.time_layers})


def _at_step(state: RunState, step: int):
    for record in reversed(state.steps):
        if record.step <= step:
            return record
    return state.last
