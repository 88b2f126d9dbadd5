"""Where the screen's records come from. No Textual here.

* :class:`LiveSource` — a TrainerController and its channel (the training thread).
* :class:`ReplaySource` — every record of a finished recording, for seeking.
* :class:`FollowSource` — a JsonlReader on a file that another process is still writing.

A screen only calls ``poll()`` from its timer and the control methods from key handlers; none of
them block for longer than a thread join on restart/close.
"""

from __future__ import annotations

from pathlib import Path

from ..records import RunHeader, StepRecord


class Source:
    kind = "none"
    live = False  # controls (pause, step, restart, presets, sampling) do something
    seekable = False  # all records are known up front (replay)
    device = "-"

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.label = ""

    @property
    def dropped(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def poll(self) -> list:
        return []

    def close(self) -> None:
        pass

    # live controls; the default does nothing and says so
    def pause(self) -> bool:
        return False

    def resume(self) -> bool:
        return False

    def single_step(self) -> bool:
        return False

    def restart(self) -> bool:
        return False

    def switch(self, preset) -> bool:
        return False

    def set_sample_every(self, every: int) -> bool:
        return False

    @property
    def sample_every(self) -> int | None:
        return None


class LiveSource(Source):
    kind = "live"
    live = True

    def __init__(self, preset, *, device: str = "cpu", paused: bool = False, data_root=None,
                 download: bool = False, max_steps: int | None = None, channel_maxlen: int = 4096,
                 overhead_budget: float | None = None):
        super().__init__()
        from ..channel import Channel

        self.preset = preset
        self.start_paused = paused
        self.channel: Channel = Channel(maxlen=channel_maxlen)
        self._controller_options = dict(device=device, data_root=data_root, download=download,
                                        max_steps=max_steps, overhead_budget=overhead_budget)
        self._controller = None
        self.device = device
        self.label = preset.name
        self._sample_every = preset.sample_every

    @property
    def dropped(self) -> int:
        return self.channel.dropped

    @property
    def controller(self):
        """Created on first use: importing the trainer imports torch (~2 s), which the app does
        only after its first frame is on screen."""
        if self._controller is None:
            from ..trainer import TrainerController

            self._controller = TrainerController(self.channel, **self._controller_options)
        return self._controller

    @property
    def trainer(self):
        return self._controller.trainer if self._controller is not None else None

    def start(self) -> None:
        if self.controller.trainer is None:
            self.controller.start(self.preset, paused=self.start_paused)

    def poll(self) -> list:
        return self.channel.drain()

    def close(self) -> None:
        if self._controller is not None:
            self._controller.stop(timeout=5.0)

    def pause(self) -> bool:
        if self.trainer is not None:
            self.trainer.pause()
        return True

    def resume(self) -> bool:
        if self.trainer is not None:
            self.trainer.resume()
        return True

    def single_step(self) -> bool:
        if self.trainer is not None:
            self.trainer.single_step()
        return True

    def restart(self) -> bool:
        return self.switch(self.preset)

    def switch(self, preset) -> bool:
        self.preset = preset
        self.label = preset.name
        self._sample_every = preset.sample_every
        self.controller.start(preset, paused=False)  # stops and joins the old thread first
        return True

    def set_sample_every(self, every: int) -> bool:
        self._sample_every = max(1, int(every))
        if self.trainer is not None:
            self.trainer.set_sample_every(self._sample_every)
        return True

    @property
    def sample_every(self) -> int | None:
        return self._sample_every


class ReplaySource(Source):
    """All records of a recording (or a given list: tests feed fixed streams this way)."""

    kind = "replay"
    seekable = True

    def __init__(self, path: str | Path | None = None, *, records: list | None = None,
                 problems: list[str] | None = None, label: str | None = None):
        super().__init__()
        if records is None:
            from ..jsonl import read_recording

            result = read_recording(path)
            records, problems = result.records, result.problems
        self.records = list(records)
        self.problems = list(problems or [])
        self.path = Path(path) if path else None
        self.label = label or (self.path.name if self.path else "recording")
        header = next((r for r in self.records if isinstance(r, RunHeader)), None)
        self.device = header.device if header else "-"
        #: indices into ``records`` of the step records, for seeking
        self.step_index = [i for i, r in enumerate(self.records) if isinstance(r, StepRecord)]
        self._polled = False

    def poll(self) -> list:
        """Everything, once (the compare screen reads recordings this way)."""
        if self._polled:
            return []
        self._polled = True
        return list(self.records)

    def upto(self, position: int) -> list:
        """Records from the last header before step ``position`` up to and including that step."""
        if not self.step_index:
            return list(self.records)
        position = max(0, min(position, len(self.step_index) - 1))
        end = self.step_index[position]
        start = 0
        for i in range(end, -1, -1):
            if isinstance(self.records[i], RunHeader):
                start = i
                break
        records = self.records[start:end + 1]
        if position == len(self.step_index) - 1:
            records += self.records[end + 1:]  # trailing events and errors
        return records

    def first_nonfinite(self) -> int | None:
        for position, index in enumerate(self.step_index):
            if self.records[index].nonfinite is not None:
                return position
        return None


class FollowSource(Source):
    """Follows a growing recording like ``tail -f``; the file may not exist yet."""

    kind = "follow"

    def __init__(self, path: str | Path):
        super().__init__()
        from ..jsonl import JsonlReader

        self.path = Path(path)
        self.reader = JsonlReader(self.path)
        self.label = self.path.name
        self.restarts = 0

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def poll(self) -> list:
        try:
            size = self.path.stat().st_size
        except OSError:
            size = None
        if size is not None and size < getattr(self.reader, "_offset", 0):
            # the writer started over (a new run truncated the file): read it from the top
            from ..jsonl import JsonlReader

            self.reader = JsonlReader(self.path)
            self.restarts += 1
        result = self.reader.read_new()
        self.problems.extend(result.problems)
        for record in result.records:
            if isinstance(record, RunHeader):
                self.device = record.device
        return result.records


class ScriptedSource(Source):
    """A live-looking source with no thread and no clock: hands out a fixed list of records on
    the first poll; the controls are recorded and answered with the events a trainer would emit.
    For snapshot tests and demos (``vgtui`` never uses it on its own)."""

    kind = "live"
    live = True

    def __init__(self, records: list, *, label: str = "scripted", device: str = "cpu",
                 problems: list[str] | None = None):
        super().__init__()
        from ..records import RunEvent

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
