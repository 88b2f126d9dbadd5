"""Where the screen's records come from. No Textual here.

* :class:`LiveSource` — a TrainerController and its channel (the training thread).
* :class:`ReplaySource` — a finished recording, indexed: records near a cursor and an overview.
* :class:`FollowSource` — a JsonlReader on a file that another process is still writing.

A screen only calls ``poll()`` from its timer and the control methods from key handlers; none of
them block for longer than a thread join on restart/close.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..channel import Channel
from ..jsonl import DETAIL, ERROR, EVENT, HEADER, NONFINITE, STEP, JsonlReader, RecordingIndex, is_gzip
from ..records import RunHeader, StepRecord
from .state import HISTORY

#: Step records a replay's overview holds at most (charts over the whole run).
OVERVIEW = 1000


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
    """A finished recording, indexed instead of loaded: the screen asks for the records near its
    cursor (:meth:`seek`, :meth:`step_forward`) and for a bounded :meth:`overview`; neither reads
    more than ``history`` + ``overview_size`` step records, whatever the recording's length.
    A list of records (``records=``) works the same way: tests feed fixed streams like that.

    Positions count step records from 0 (``n_steps`` of them); ``position`` is the cursor.
    """

    kind = "replay"
    seekable = True

    def __init__(self, path: str | Path | None = None, *, records: list | None = None,
                 problems: list[str] | None = None, label: str | None = None,
                 history: int = HISTORY, overview_size: int = OVERVIEW, index=None):
        super().__init__()
        if index is not None:
            self.index = index
        elif records is None:
            self.index = RecordingIndex(path, cache=2 * history + overview_size + 64)
            self.index.problems[:0] = list(problems or [])
        else:
            self.index = _ListIndex(records, problems)
        self.problems = self.index.problems  # the same list: lines found damaged later land here
        self.path = Path(path) if path else None
        self.label = label or (self.path.name if self.path else "recording")
        self.history = history
        self.overview_size = overview_size
        header = next(iter(self.index.headers.values()), None)
        self.device = header.device if header else "-"
        self._ordinals = np.flatnonzero(self.index.kinds == STEP)
        #: ordinals (places in :attr:`records`) of the step records, by position
        self.step_index = _IntArray(self._ordinals)
        #: the training step of each position
        self.step_numbers = self.index.steps[self._ordinals]
        self.records = _Records(self.index)
        self.position = self.n_steps - 1
        self._polled = False
        self._overview: dict = {}

    @property
    def n_steps(self) -> int:
        return len(self._ordinals)

    def poll(self) -> list:
        """The records as of the last step, once (the compare screen reads recordings this way)."""
        if self._polled:
            return []
        self._polled = True
        return self.upto(self.n_steps - 1)

    # -- the cursor -----------------------------------------------------------------------------
    def seek(self, position: int) -> list:
        """Move the cursor (clamped); returns the records a fresh RunState needs: see :meth:`upto`."""
        self.position = self._clamp(position)
        return self.upto(self.position)

    def seek_step(self, step: int) -> list:
        """Move the cursor to training step ``step`` (the last recorded one at or before it)."""
        return self.seek(self.position_of(step))

    def step_forward(self) -> list:
        """Advance the cursor one step; returns the records to feed the CURRENT RunState (the next
        step record and whatever came with it), [] at the end."""
        if not self.n_steps or self.position >= self.n_steps - 1:
            return []
        before = int(self._ordinals[self.position]) if self.position >= 0 else -1
        self.position += 1
        end = self._end_ordinal(self.position)
        return [r for r in self.index.records(range(before + 1, end + 1)) if r is not None]

    def step_back(self) -> list:
        """Move the cursor back one step; returns the records for a fresh RunState."""
        return self.seek(self.position - 1)

    def at(self, position: int) -> StepRecord | None:
        """The step record at ``position`` (None if its line turned out damaged)."""
        if not self.n_steps:
            return None
        return self.index.record(int(self._ordinals[self._clamp(position)]))

    def position_of(self, step: int) -> int:
        """The position of the last step record at or before training step ``step`` (file order
        decides between runs), or 0 when every record is later."""
        before = np.flatnonzero(self.step_numbers <= step)
        return int(before[-1]) if len(before) else 0

    def first_nonfinite(self) -> int | None:
        """The position of the first step that saw a NaN/Inf, or None."""
        hits = np.flatnonzero(self.index.flags[self._ordinals] & NONFINITE)
        return int(hits[0]) if len(hits) else None

    def nonfinite_summary(self, position: int | None = None) -> tuple[tuple[int, str, str] | None, int]:
        """``((step, layer, forward|backward), count)`` of the non-finite steps of the cursor's run
        up to ``position``: what a RunState fed the whole run would know (a window may not)."""
        position = self.position if position is None else self._clamp(position)
        if position < 0:
            return None, 0
        lo = self._run_start(position)
        flags = self.index.flags[self._ordinals[lo:position + 1]] & NONFINITE
        hits = np.flatnonzero(flags)
        if not len(hits):
            return None, 0
        first = self.at(lo + int(hits[0]))
        where = (first.step, *first.nonfinite) if first is not None and first.nonfinite else None
        return where, len(hits)

    # -- what to feed -----------------------------------------------------------------------------
    def upto(self, position: int) -> list:
        """The records a fresh RunState needs to show step ``position``: its run's header, that
        run's events and errors so far, and the newest ``history`` step records up to the position
        (all trailing events and errors too at the last position). The cursor does not move."""
        if not self.n_steps:
            return [r for r in self.index.records(range(len(self.index))) if r is not None]
        position = self._clamp(position)
        end = self._end_ordinal(position)
        lo = max(self._run_start(position), position - self.history + 1)
        header_at = self._header_ordinal(position)
        steps = set(int(i) for i in self._ordinals[lo:position + 1])
        others = [i for i in self.index.kept() if header_at <= i <= end and i not in steps]
        ordinals = sorted(steps.union(others))
        return [r for r in self.index.records(ordinals) if r is not None]

    def overview(self, size: int | None = None, *, detail: bool = False, end: int | None = None) -> list:
        """At most ``size`` step records spread evenly over the cursor's run, from its start up to
        position ``end`` (default: the cursor; ``n_steps - 1`` for the whole run): every k-th
        record (k a power of two when the index's sampled lines serve), the one at ``end`` always
        included. ``detail``: among detail-tier records only."""
        size = self.overview_size if size is None else max(1, int(size))
        if not self.n_steps:
            return []
        end = self.position if end is None else self._clamp(end)
        lo = self._run_start(end)
        positions = np.arange(lo, end + 1)
        if detail:
            positions = positions[(self.index.flags[self._ordinals[positions]] & DETAIL) != 0]
        key = (lo, end, size, detail)
        if key not in self._overview:
            # The index kept evenly spaced lines while scanning: where they cover the span well
            # enough, they are the overview (no read at all, which gzip makes costly).
            sampled = getattr(self.index, "sampled_positions", np.zeros(0, np.int64))
            sampled = sampled[(sampled >= lo) & (sampled <= end)]
            if not detail and len(sampled) >= min(len(positions), size) // 2 and len(sampled) > 1:
                positions = sampled if sampled[-1] == end else np.append(sampled, end)
            stride = max(1, -(-len(positions) // size))
            picked = positions[::stride]
            if len(positions) and picked[-1] != positions[-1]:
                picked = np.append(picked[:-1] if len(picked) >= size else picked, positions[-1])
            records = self.index.records([int(self._ordinals[p]) for p in picked])
            self._overview = {key: [r for r in records if r is not None]}  # the latest one only
        return self._overview[key]

    # -- helpers ----------------------------------------------------------------------------------
    def _clamp(self, position: int) -> int:
        return max(0, min(int(position), self.n_steps - 1))

    def _end_ordinal(self, position: int) -> int:
        """The last ordinal that belongs with step ``position`` (trailing records at the end)."""
        return len(self.index) - 1 if position >= self.n_steps - 1 else int(self._ordinals[position])

    def _header_ordinal(self, position: int) -> int:
        ordinal = int(self._ordinals[position])
        header = self.index.header_for(ordinal)
        if header is None:
            return 0
        return max(i for i, r in self.index.headers.items() if r is header and i <= ordinal)

    def _run_start(self, position: int) -> int:
        """The first position after the header of ``position``'s run."""
        header_at = self._header_ordinal(position)
        return int(np.searchsorted(self._ordinals, header_at, side="right"))


class _IntArray(Sequence):
    """A read-only int sequence over a numpy array (``len``, indexing, truth like a list)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [int(v) for v in self.values[i]]
        return int(self.values[i])


class _Records(Sequence):
    """``ReplaySource.records``: the recording's records by ordinal, each read when asked for."""

    def __init__(self, index) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, ordinal):
        if isinstance(ordinal, slice):
            return [r for r in self.index.records(range(len(self))[ordinal])]
        ordinal = int(ordinal)
        if ordinal < 0:
            ordinal += len(self)
        if not 0 <= ordinal < len(self):
            raise IndexError(ordinal)
        return self.index.record(ordinal)

    def __iter__(self):
        return iter(self.index)


class _ListIndex:
    """RecordingIndex's interface over records already in memory."""

    def __init__(self, records: list, problems: list[str] | None = None) -> None:
        self._records = list(records)
        self.problems = list(problems or [])
        kinds = {RunHeader: HEADER, StepRecord: STEP}
        self.kinds = np.array([kinds.get(type(r), EVENT if not hasattr(r, "traceback") else ERROR)
                               for r in self._records], dtype=np.int8)
        self.steps = np.array([getattr(r, "step", 0) for r in self._records], dtype=np.int64)
        self.run_ids = np.array([getattr(r, "run_id", 0) for r in self._records], dtype=np.int64)
        self.flags = np.array([(DETAIL if getattr(r, "detail", False) else 0)
                               | (NONFINITE if getattr(r, "nonfinite", None) else 0)
                               for r in self._records], dtype=np.int8)
        self.headers = {i: r for i, r in enumerate(self._records) if isinstance(r, RunHeader)}
        self._kept = {i: r for i, r in enumerate(self._records) if not isinstance(r, StepRecord)}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(self._records)

    def kept(self) -> dict:
        return self._kept

    def header_for(self, ordinal: int):
        run_id = int(self.run_ids[ordinal])
        return next((r for i, r in reversed(self.headers.items()) if i <= ordinal and r.run_id == run_id), None)

    def record(self, ordinal: int):
        return self._records[ordinal]

    def records(self, ordinals, cache: bool = True) -> list:
        return [self._records[int(i)] for i in ordinals]


class FollowSource(Source):
    """Follows a growing recording like ``tail -f``; the file may not exist yet. A long file is
    not read whole on attaching: it is indexed, the screen gets what a replay at its last
    step would show (:meth:`ReplaySource.upto`), and following goes on from its end."""

    kind = "follow"

    #: Files above this size are indexed on attaching instead of read record by record.
    CATCH_UP_BYTES = 4 << 20

    def __init__(self, path: str | Path, *, history: int = HISTORY):
        super().__init__()
        self.path = Path(path)
        self.reader = JsonlReader(self.path)
        self.label = self.path.name
        self.restarts = 0
        self.history = history
        self._attached = False

    def _catch_up(self) -> list | None:
        """The window of a long existing recording, read through its index; None to read it all."""
        try:
            size = self.path.stat().st_size
            if size <= (self.CATCH_UP_BYTES // 6 if is_gzip(self.path) else self.CATCH_UP_BYTES):
                return None
            index = RecordingIndex(self.path, cache=self.history + 64, growing=True)
        except OSError:
            return None
        self.reader.resume(index)
        replay = ReplaySource(index=index, history=self.history)
        records = replay.upto(replay.n_steps - 1)
        self.problems.extend(index.problems)  # the scan's and those found reading the window
        return records

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
            self.reader = JsonlReader(self.path)
            self.restarts += 1
        if not self._attached and self.path.exists():
            self._attached = True
            caught_up = self._catch_up()
            if caught_up is not None:
                for record in caught_up:
                    if isinstance(record, RunHeader):
                        self.device = record.device
                return caught_up
        result = self.reader.read_new()
        self.problems.extend(result.problems)
        for record in result.records:
            if isinstance(record, RunHeader):
                self.device = record.device
        return result.records
