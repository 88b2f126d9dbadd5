"""Two live runs side by side on the same batches, and one line saying how they differ."""

from __future__ import annotations

import math
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
from .capabilities import capabilities
from .modals import PresetPicker
from .monitor import POLL_HZ, VIEWS, Monitor, stylesheet, wrap_fields
from .sources import Source
from .state import RunState
from .widgets import Activations, Heatmap, Histogram, LayerRows, LossPlot


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

    DEFAULT_CSS = stylesheet("compare.tcss")

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
            return True if all("train" in capabilities(s.source) for s in self.sides) else None
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
