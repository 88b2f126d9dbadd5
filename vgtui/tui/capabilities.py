"""What a screen may do with its source, asked by name, and the replay cursor. No Textual here.

A screen asks ``controls.can("seek")`` instead of branching on a source's kind: a source that
declares ``capabilities`` (a set of the names below) is taken at its word; the sources of today
are read from their ``live`` / ``seekable`` flags here, in one place.

* ``train``  — pause, resume, single step, restart, switch presets, change the sampling interval
* ``seek``   — every record is known up front: step back and forth, play, jump to the first NaN
* ``follow`` — records arrive from a file another process is writing
"""

from __future__ import annotations

CAPABILITIES = ("train", "seek", "follow")

#: Which capability each screen action needs (an action not listed needs none).
ACTIONS = {
    "toggle_pause": "train", "restart": "train", "picker": "train", "sampling": "train",
    "quick": "train", "switch": "train",
    "seek": "seek", "seek_to": "seek", "toggle_play": "seek",
}


def offered_views(views: tuple[str, ...], states) -> tuple[str, ...]:
    """The views a screen offers for its runs (RunStates): "time" (through time) only when at
    least one of them has measured recurrent layers."""
    if any(state.time_layers for state in states):
        return views
    return tuple(v for v in views if v != "time")


def capabilities(source) -> frozenset[str]:
    declared = getattr(source, "capabilities", None)
    if declared is not None:
        return frozenset(declared)
    found = set()
    if getattr(source, "live", False):
        found.add("train")
    if getattr(source, "seekable", False):
        found.add("seek")
    if getattr(source, "kind", "") == "follow":
        found.add("follow")
    return frozenset(found)


class ReplayCursor:
    """Where a replay stands in its recording (an index into its steps) and whether it plays."""

    def __init__(self, source):
        self.source = source
        self.position = len(source.step_index) - 1
        self.playing = False

    def __len__(self) -> int:
        return len(self.source.step_index)

    @property
    def at_end(self) -> bool:
        return self.position >= len(self) - 1

    def target(self, where: int | str) -> int | None:
        """An index for a position, ``"home"``, ``"end"`` or ``"nonfinite"`` (None: no such step)."""
        if where == "home":
            return 0
        if where == "end":
            return len(self) - 1
        if where == "nonfinite":
            return self.source.first_nonfinite()
        return int(where)

    def records_to(self, position: int) -> list | None:
        """The records up to ``position`` (clamped) if that moves the cursor, else None."""
        if not len(self):
            return None
        position = max(0, min(len(self) - 1, position))
        if position == self.position:
            return None
        self.position = position
        return self.source.upto(position)


class Controls:
    """A source's capabilities and, for a seekable one, its cursor."""

    def __init__(self, source):
        self.source = source
        self.caps = capabilities(source)
        self.cursor = ReplayCursor(source) if "seek" in self.caps else None

    def can(self, what: str) -> bool:
        """``what``: a capability or a screen action."""
        need = ACTIONS.get(what, what)
        if need == "single_step":
            return bool(self.caps & {"train", "seek"})
        return need in self.caps if need in CAPABILITIES else True

    @property
    def trains(self) -> bool:
        return "train" in self.caps

    @property
    def seeks(self) -> bool:
        return "seek" in self.caps

    @property
    def follows(self) -> bool:
        return "follow" in self.caps

    @property
    def mode(self) -> str:
        return "live" if self.trains else "replay" if self.seeks else "attach"
