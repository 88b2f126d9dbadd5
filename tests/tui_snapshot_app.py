"""Apps for the TUI tests, fed from the fixed recordings in tests/data (no thread, no clock)."""

from __future__ import annotations

import io
from pathlib import Path

from vgtui.jsonl import read_recording
from vgtui.records import RunError, RunEvent, StepRecord, Verdict
from vgtui.tui.app import make_app
from scripted_source import ScriptedSource
from vgtui.tui.sources import ReplaySource

DATA = Path(__file__).parent / "data"


def recording(name: str) -> Path:
    return DATA / f"{name}.jsonl"


def records(name: str) -> list:
    return read_recording(recording(name)).records


def without_verdicts(name: str) -> list:
    """A recording as it looked before any verdict existed (the placeholder)."""
    recs = records(name)
    for r in recs:
        if isinstance(r, StepRecord):
            r.verdicts = []
    return recs


def scripted_app(name: str, *, extra: list | None = None, mono: bool = False, problems=None,
                 recs: list | None = None):
    """The live dashboard as it looks while the recorded steps arrive (controls are recorded;
    the recording's "finished" event is left out: the run looks in flight)."""
    recs = [r for r in (recs if recs is not None else records(name))
            if not (isinstance(r, RunEvent) and r.kind == "finished")]
    source = ScriptedSource(recs + list(extra or []), label=name, problems=problems)
    return make_app(source, mono=mono)


def replay_app(name: str, mono: bool = False):
    return make_app(ReplaySource(recording(name)), mono=mono)


def compare_app(a: str, b: str):
    return make_app(compare=(ReplaySource(recording(a)), ReplaySource(recording(b))))


def with_verdicts(name: str) -> list:
    """A recording whose newest step carries three verdicts (more than fit at 80×24)."""
    recs = records(name)
    last = next(r for r in reversed(recs) if isinstance(r, StepRecord))
    last.verdicts = list(last.verdicts) + [
        Verdict("saturation", "warning", "hidden5: 61% of the sigmoid units are saturated",
                suggestions=["sigmoid-xavier"]),
    ]
    return recs


def training_error() -> RunError:
    return RunError("RuntimeError: mat1 and mat2 shapes cannot be multiplied (100x784 and 512x10)",
                    "Traceback (most recent call last): ...", step=60, run_id=1)


def screen_text(app) -> str:
    """The current screen as plain text (for debugging and assertions)."""
    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console.print(update)
    return console.export_text(styles=False)
