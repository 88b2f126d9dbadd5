"""Hand freed memory back to the OS in long-running TUI sessions (glibc only; a no-op elsewhere).

The TUI's thread allocating many short-lived objects beside a training thread allocating tensors
made resident memory climb steadily (+108 MB, +14 %, in 12 minutes; still climbing) although the
Python heap grew ~2 MiB: glibc keeps what threads free in their arenas. Calling malloc_trim(0)
every 30 s kept it flat (±1 % over 10 minutes). docs/BENCHMARKS.md has the runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

#: Seconds between trims; ``VGTUI_TRIM_SECONDS`` overrides it (0 turns trimming off).
TRIM_SECONDS = 30.0


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Return free memory in every malloc arena to the OS. True if glibc did it."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def start_trimming(seconds: float | None = None) -> threading.Event | None:
    """Call :func:`trim` every ``seconds`` from a daemon thread; set the returned event to stop.
    None when trimming is off or unavailable."""
    env = os.environ.get("VGTUI_TRIM_SECONDS")
    seconds = float(env) if env else (TRIM_SECONDS if seconds is None else seconds)
    if seconds <= 0 or _malloc_trim() is None:
        return None
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            trim()

    threading.Thread(target=loop, name="vgtui-malloc-trim", daemon=True).start()
    return stop
