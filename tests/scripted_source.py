"""A test double for the TUI: a live-looking source with no thread and no clock."""

from __future__ import annotations

from vgtui.records import RunEvent, RunHeader, StepRecord
from vgtui.tui.sources import Source


class ScriptedSource(Source):
    """A live-looking source with no thread and no clock: hands out a fixed list of records on
    the first poll; the controls are recorded and answered with the events a trainer would emit.
    For the snapshot and Pilot tests."""

    kind = "live"
    live = True

    def __init__(self, records: list, *, label: str = "scripted", device: str = "cpu",
                 problems: list[str] | None = None):
        super().__init__()
        self._event = RunEvent
        self.records = list(records)
        self.pending = list(records)
        self.problems = list(problems or [])
        self.label = label
        header = next((r for r in self.records if isinstance(r, RunHeader)), None)
        self.device = header.device if header else device
        self.run_id = header.run_id if header else 0
        last = next((r for r in reversed(self.records) if isinstance(r, StepRecord)), None)
        self.step = last.step + 1 if last else 0
        self._sample_every = last.sample_every if last else 1
        self.calls: list[tuple] = []

    def poll(self) -> list:
        out, self.pending = self.pending, []
        return out

    def pause(self) -> bool:
        self.calls.append(("pause",))
        self.pending.append(self._event("paused", step=self.step, run_id=self.run_id))
        return True

    def resume(self) -> bool:
        self.calls.append(("resume",))
        self.pending.append(self._event("resumed", step=self.step, run_id=self.run_id))
        return True

    def single_step(self) -> bool:
        self.calls.append(("step",))
        return True

    def restart(self) -> bool:
        self.calls.append(("restart",))
        self.pending = list(self.records)  # "the new run": the same records again
        return True

    def switch(self, preset) -> bool:
        self.calls.append(("switch", preset.name))
        self.preset = preset
        self.pending = list(self.records)
        return True

    def set_sample_every(self, every: int) -> bool:
        self._sample_every = max(1, int(every))
        self.calls.append(("sample_every", self._sample_every))
        return True

    @property
    def sample_every(self) -> int | None:
        return self._sample_every
