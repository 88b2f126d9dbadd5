"""Launch → first frame, and key → redraw, of the real `vgtui` on a pty while it trains.

    .venv/bin/python benchmarks/tui_keys.py [--preset PATH|NAME] [--presses 10] [--size 120x40]
    .venv/bin/python benchmarks/tui_keys.py --replay tests/data/llama24.jsonl [--layers]
    .venv/bin/python benchmarks/tui_keys.py --compare tests/data/llama24.jsonl tests/data/llama24.jsonl

Spawns ``python -m vgtui --preset ...`` on a pseudo-terminal, as a user's terminal would, and
reads what it writes. First frame: from the spawn to the first bytes that show the preset's name
in the status bar. Key → redraw: ``?`` is pressed while training runs, and the clock stops when
the help screen's text ("next view") has been written; ``escape`` closes it again, and the next
press waits a second. Also ``v`` → each next view (its name in the status bar: heatmap, histogram,
activations) and back. Prints medians and maxima.
``--replay`` opens a recording instead (``vgtui replay``: no training beside the UI, the first
frame is the name in the status bar, then the same keys); ``--layers`` presses ``b`` first, so a
deep model's views draw every layer rather than its blocks. ``--compare A B`` opens the compare
screen on two presets (trained side by side) or two recordings, and times the same keys there.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import signal
import statistics
import struct
import sys
import termios
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Terminal:
    """The app on a pty; ``wait_for`` reads its output until a marker appears."""

    def __init__(self, argv: list[str], columns: int, rows: int):
        self.start = time.perf_counter()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.environ.update(TERM="xterm-256color", COLUMNS=str(columns), LINES=str(rows))
            os.execv(sys.executable, [sys.executable, *argv])
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.buffer = b""

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except OSError:
            return b""
        self.buffer += chunk
        return chunk

    def drain(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.read(0.05)
        self.buffer = b""

    def wait_for(self, marker: bytes, timeout: float = 30.0) -> float:
        """Seconds until ``marker`` has been written (counting from now), or nan."""
        start = time.perf_counter()
        self.buffer = b""
        while time.perf_counter() - start < timeout:
            self.read(0.01)
            if marker in self.buffer:
                return time.perf_counter() - start
        return float("nan")

    def press(self, key: bytes) -> None:
        os.write(self.fd, key)

    def close(self) -> None:
        self.press(b"q")
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            self.read(0.1)
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def summary(label: str, seconds: list[float]) -> str:
    ms = [s * 1e3 for s in seconds if s == s]
    if not ms:
        return f"{label}: no redraw seen"
    return (f"{label}: median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms "
            f"({len(ms)}/{len(seconds)} seen)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sigmoid-deep")
    parser.add_argument("--presses", type=int, default=10)
    parser.add_argument("--size", default="120x40")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of training before pressing keys")
    parser.add_argument("--replay", metavar="FILE.jsonl", help="replay a recording instead of training")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="the compare screen: two presets or two recordings")
    parser.add_argument("--layers", action="store_true", help="press b first: every layer, not blocks")
    parser.add_argument("--pause", action="store_true",
                        help="pause training (space) before pressing keys: the UI's own cost, no trainer beside it")
    args = parser.parse_args()
    columns, rows = (int(v) for v in args.size.split("x"))
    if args.compare:
        term = Terminal(["-m", "vgtui", "compare", *args.compare], columns, rows)
        first = term.wait_for(b"step ", timeout=120)
        print(f"launch → first frame of the compare screen showing a step: {first:.2f} s", flush=True)
    elif args.replay:
        name = os.path.splitext(os.path.basename(args.replay))[0]
        term = Terminal(["-m", "vgtui", "replay", args.replay], columns, rows)
        first = term.wait_for(b"step ", timeout=60)
        print(f"launch → first frame showing a step of '{name}': {first:.2f} s", flush=True)
    else:
        name = os.path.splitext(os.path.basename(args.preset))[0]
        term = Terminal(["-m", "vgtui", "--preset", args.preset], columns, rows)
        first = term.wait_for(name.encode(), timeout=60)
        print(f"launch → first frame showing '{name}': {first:.2f} s", flush=True)
        step_seen = term.wait_for(b"step ", timeout=120)
        print(f"… → first step on screen: {first + step_seen:.2f} s after launch", flush=True)
    term.drain(args.warmup)
    if args.layers:
        term.press(b"b")
        term.drain(1.0)
    if args.pause:
        term.press(b" ")
        term.drain(1.0)
    help_open: list[float] = []
    views: dict[str, list[float]] = {"heatmap": [], "histogram": [], "activations": []}
    for _ in range(args.presses):
        term.press(b"?")
        help_open.append(term.wait_for(b"next view", timeout=5))
        term.press(b"\x1b")
        term.drain(1.0)
        for name, seconds in views.items():  # each v → the next view's name in the status bar
            term.press(b"v")
            seconds.append(term.wait_for(name.encode(), timeout=5))
            term.drain(0.3)
        term.press(b"v")  # back to the dashboard
        term.drain(1.0)
    print(summary("? → help screen written", help_open))
    for name, seconds in views.items():
        print(summary(f"v → {name} view written", seconds))
    term.close()


if __name__ == "__main__":
    main()
