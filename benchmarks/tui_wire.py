"""Bytes the live TUI writes to its terminal in steady state, measured the way a user over SSH
pays for them: the app runs in a tmux pane and ``tmux pipe-pane -o`` copies everything it writes.

    .venv/bin/python benchmarks/tui_wire.py [--preset sigmoid-deep] [--sizes 80x24,200x50]
        [--warmup 20] [--seconds 40] [--rounds 1] [--tree DIR]

For each size: start ``python -m vgtui --preset P`` in a detached tmux session of that size, wait
``--warmup`` seconds, pipe the pane's output to a file for ``--seconds``, report KB/s (1 KB = 1000
bytes). ``--tree DIR`` runs another checkout's vgtui from DIR (e.g. ``git archive REV vgtui |
tar -x -C DIR``) with this environment, for an A/B; rounds interleave the trees. Any other program can be
measured the same way with ``--command`` (e.g. ``--command btop``).

Why benchmarks/tui_bench.py reports less: it counts bytes from the first to the last record of a
150-step run (the first ~5 s after launch, while every history is still short and the loss chart
has a few points), not the steady state 20-60 s in; the pipe here sees the same bytes a terminal
(or an SSH channel) receives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKET = "vgtui-wire"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], check=True, capture_output=True, text=True).stdout


def measure(command: str, size: tuple[int, int], warmup: float, seconds: float, env: dict,
            cwd: str = ROOT) -> float:
    cols, rows = size
    out = tempfile.mktemp(suffix=".bytes")
    session = f"wire{os.getpid()}-{time.monotonic_ns()}"  # one per run: a killed session's name may linger
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    tmux("new-session", "-d", "-s", session, "-x", str(cols), "-y", str(rows),
         f"cd {cwd} && env {exports} {command}")
    try:
        time.sleep(warmup)
        tmux("pipe-pane", "-o", "-t", session, f"cat >> {out}")
        time.sleep(seconds)
        tmux("pipe-pane", "-t", session)  # stop piping
        time.sleep(0.5)
        written = os.path.getsize(out) if os.path.exists(out) else 0
    finally:
        subprocess.run(["tmux", "-L", SOCKET, "kill-session", "-t", session], capture_output=True)
        time.sleep(1.0)  # the tmux server exits with its last session; let it before the next run
        if os.path.exists(out):
            os.unlink(out)
    return written / seconds / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sigmoid-deep")
    parser.add_argument("--sizes", default="80x24,200x50")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tree", action="append", default=[],
                        help="another checkout to A/B against (repeatable); '.' is this one")
    parser.add_argument("--command", default=None, help="measure this command instead of vgtui")
    parser.add_argument("--term", default="xterm-256color:truecolor",
                        help="TERM:COLORTERM of the pane (default a 24-bit terminal; "
                             "'tmux-256color:' for tmux's own, 256 colours)")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    trees = args.tree or ["."]
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for tree in trees:
                # a 24-bit terminal (what SSH users of a modern terminal have): the longest escapes
                term, colorterm = (args.term.split(":") + [""])[:2]
                env = {"OMP_NUM_THREADS": "1", "TERM": term, "COLORTERM": colorterm}
                cwd = ROOT if tree == "." else os.path.abspath(tree)  # `-m vgtui` imports from cwd
                if args.command:
                    command, label = args.command, args.command
                else:
                    command = f"{sys.executable} -m vgtui --preset {args.preset}"
                    label = f"vgtui@{tree}"
                kbs = measure(command, size, args.warmup, args.seconds, env, cwd)
                key = f"{label} {size[0]}x{size[1]}"
                results.setdefault(key, []).append(kbs)
                print(json.dumps({"what": key, "kb_per_s": round(kbs, 2)}), flush=True)
    for key, values in results.items():
        print(f"{key}: median {statistics.median(values):.1f} KB/s over {len(values)} run(s)")


if __name__ == "__main__":
    main()
