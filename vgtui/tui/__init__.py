"""The Textual app. Textual is imported only inside these entry points, so that importing vgtui
(and `vgtui --help`) stays fast and free of the UI."""

from __future__ import annotations

import os
from pathlib import Path


def _prepare(mono: bool) -> None:
    from .. import memory

    memory.start_trimming()  # keeps resident memory flat over hours (see vgtui/memory.py)
    os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
    if mono:
        os.environ["NO_COLOR"] = "1"  # Textual reads (and removes) it when the app is created


def _run(app, sources) -> int:
    try:
        app.run()
    finally:
        for source in sources:
            source.close()  # the screen already did; this is the belt to its braces
    return int(app.return_code or 0)


def run_live(preset, *, device: str = "cpu", mono: bool = False, paused: bool = False,
             data_root: Path | None = None, download: bool = False,
             overhead_budget: float | None = None, break_on_nonfinite: bool = True) -> int:
    """``break_on_nonfinite``: pause at the first non-finite step (the CLI's ``--no-break`` turns
    it off)."""
    _prepare(mono)
    from .app import make_app
    from .sources import LiveSource

    source = LiveSource(preset, device=device, paused=paused, data_root=data_root, download=download,
                        overhead_budget=overhead_budget)
    return _run(make_app(source, mono=mono, break_on_nonfinite=break_on_nonfinite), [source])


def run_replay(path, follow: bool = False, mono: bool = False) -> int:
    _prepare(mono)
    from .app import make_app
    from .sources import FollowSource, ReplaySource

    source = FollowSource(path) if follow else ReplaySource(path)
    return _run(make_app(source, mono=mono), [source])


def run_compare_recordings(path_a, path_b, *, mono: bool = False) -> int:
    """Two finished recordings side by side (the compare screen, without training)."""
    _prepare(mono)
    from .app import make_app
    from .sources import ReplaySource

    a, b = ReplaySource(path_a), ReplaySource(path_b)
    return _run(make_app(compare=(a, b), mono=mono), [a, b])


def run_compare(preset_a, preset_b, *, device: str = "cpu", mono: bool = False,
                overhead_budget: float | None = None) -> int:
    _prepare(mono)
    from .app import make_app
    from .sources import LiveSource

    if preset_b.seed != preset_a.seed:
        preset_b = preset_b.replace(seed=preset_a.seed)  # same seed => identical batches
    a = LiveSource(preset_a, device=device, overhead_budget=overhead_budget)
    b = LiveSource(preset_b, device=device, overhead_budget=overhead_budget)
    return _run(make_app(compare=(a, b), mono=mono), [a, b])
