"""Memory housekeeping for vgtui's own long-running processes (never the library API's host).

Trimming: hand freed memory back to the OS in TUI sessions (glibc only; a no-op elsewhere).
The TUI's thread allocating many short-lived objects beside a training thread allocating tensors
made resident memory climb steadily (+108 MB, +14 %, in 12 minutes; still climbing) although the
Python heap grew ~2 MiB: glibc keeps what threads free in their arenas. Calling malloc_trim(0)
every 30 s kept it flat (±1 % over 10 minutes). docs/BENCHMARKS.md has the runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def freeze_long_lived() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach.

    Called once the objects that live as long as the process exist (torch and the model, after
    the trainer builds it; Textual's modules and widgets, once the first step is on screen).
    Otherwise each full collection walks them all holding the GIL, in the UI thread and the
    trainer alike: on deep models those passes were the slow key presses (docs/BENCHMARKS.md).
    Frozen objects are still freed by reference counting; only cycles among them would outlive
    their use.

    Full collections also come 10x less often (every 100 young-generation passes, not 10): the
    UI's churning render caches stay unfrozen and are costly to walk. Young collections, which
    find most cyclic garbage, run as before.
    ``VGTUI_GC_FREEZE=0`` turns both off (for A/B runs).
    """
    if os.environ.get("VGTUI_GC_FREEZE", "1") == "0":
        return
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


#: Full (oldest-generation) collections once per this many middle-generation ones (Python: 10).
FULL_COLLECTION_EVERY = 100
