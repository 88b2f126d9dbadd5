"""Helpers the Pilot tests share (test_tui_units.py, test_tui_live.py): run an async test without
an async pytest plugin, wait on the poll timer, find the dashboard."""

from __future__ import annotations

import asyncio
import functools
import time

from vgtui.tui.app import Dashboard


def sync(coro_fn):
    """Run an async test without an async pytest plugin."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(coro_fn(*args, **kwargs))

    return wrapper


async def wait_for(pilot, predicate, timeout: float = 60.0) -> None:
    """Let the poll timer run until ``predicate()`` holds (the timeout only bounds a failure)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await pilot.pause(0.05)


def dashboard(app) -> Dashboard:
    return next(s for s in app.screen_stack if isinstance(s, Dashboard))
