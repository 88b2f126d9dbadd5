"""Replaying a long recording: bytes per record, time to the first overview, peak memory, seeks.

    .venv/bin/python benchmarks/long_recording.py /tmp/long.jsonl --records 100000
    .venv/bin/python benchmarks/replay_bench.py /tmp/long.jsonl            # headless, no Textual
    .venv/bin/python benchmarks/replay_bench.py /tmp/long.jsonl --pilot    # + the app in run_test
    .venv/bin/python benchmarks/replay_bench.py /tmp/long.jsonl --pty      # + the real `vgtui replay`
    .venv/bin/python benchmarks/replay_bench.py /tmp/long.jsonl --export   # + `vgtui export --csv`

Each measurement runs in a fresh child process so that its peak resident memory (ru_maxrss, the
interpreter and numpy included) is its own, and the figure is the median of ``--repeat`` children:

* open: ``ReplaySource(path)`` (the index pass), the records of the last position (``upto``) fed
  into a ``RunState`` as the screen does, and a 1,000-record ``overview()`` of the whole run;
* seek: ``--seeks`` random positions, each ``seek(p)`` fed into a fresh RunState (cold: positions
  far apart, so the record cache does not help), then as many ``step_forward()`` calls;
* pilot: the Textual app in ``run_test`` from process start until the dashboard has drawn;
* pty: ``python -m vgtui replay FILE`` on a pseudo-terminal (benchmarks/tui_keys.py's Terminal):
  spawn until the status bar shows the last step, then home / end / f until it shows the new
  position (a key's time includes the app's frame pacing);
* writer: JsonlWriter's cost per record, version 1 / 2 / gzip, interleaved (``--writer``);
* export: ``vgtui export FILE --csv OUT`` as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_open(path: str) -> dict:
    t0 = time.perf_counter()
    from vgtui.tui.sources import ReplaySource
    from vgtui.tui.state import RunState

    t_import = time.perf_counter() - t0
    source = ReplaySource(path)
    t_index = time.perf_counter() - t0
    state = RunState()
    state.feed(source.seek(source.n_steps - 1))
    t_window = time.perf_counter() - t0
    overview = source.overview(end=source.n_steps - 1)
    t_overview = time.perf_counter() - t0
    return {"steps": source.n_steps, "import_s": t_import, "index_s": t_index, "window_s": t_window,
            "first_overview_s": t_overview, "overview_records": len(overview),
            "window_records": len(state.steps), "cached": len(source.index._cache),
            "peak_mb": _peak_mb(), "problems": len(source.problems)}


def child_seek(path: str, seeks: int) -> dict:
    import random

    from vgtui.tui.sources import ReplaySource
    from vgtui.tui.state import RunState

    source = ReplaySource(path)
    rng = random.Random(0)
    positions = [rng.randrange(source.n_steps) for _ in range(seeks)]
    seek_times, forward_times = [], []
    for position in positions:
        t0 = time.perf_counter()
        state = RunState()
        state.feed(source.seek(position))
        seek_times.append(time.perf_counter() - t0)
        assert state.last is None or state.last.step == int(source.step_numbers[source.position])
        t0 = time.perf_counter()
        state.feed(source.step_forward())
        forward_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    nonfinite = source.first_nonfinite()
    if nonfinite is not None:
        RunState().feed(source.seek(nonfinite))
    t_nonfinite = time.perf_counter() - t0
    return {"seek_median_s": statistics.median(seek_times), "seek_max_s": max(seek_times),
            "forward_median_s": statistics.median(forward_times), "first_nonfinite_seek_s": t_nonfinite,
            "peak_mb": _peak_mb()}


def child_pilot(path: str, started: float) -> dict:
    import asyncio

    from vgtui.tui.app import make_app
    from vgtui.tui.sources import ReplaySource

    async def main() -> float:
        app = make_app(ReplaySource(path))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            shown = time.time() - started
            dash = app.screen
            assert getattr(dash, "state", None) is not None and dash.state.last is not None
            await pilot.press("q")
            return shown

    first_frame = asyncio.run(main())
    return {"first_frame_s": first_frame, "peak_mb": _peak_mb()}


def pty_replay(path: str, steps: int, last_step: int, first_nan: int | None) -> dict:
    """The real `vgtui replay FILE` on a pty at 120x40: spawn -> the last step in the status bar,
    peak memory then, and key -> the status bar at the new position (home, end, f)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tui_keys import Terminal

    term = Terminal(["-m", "vgtui", "replay", path], 120, 40)
    first = term.wait_for(f"step {last_step}".encode(), timeout=120)
    first = time.perf_counter() - term.start if first == first else first  # from the spawn
    with open(f"/proc/{term.pid}/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    keys = {}
    term.drain(1.0)
    for name, key, marker in (("home", b"\x1b[H", f"(1/{steps})"), ("end", b"\x1b[F", f"({steps}/{steps})"),
                              ("f", b"f", f"({(first_nan or 0) + 1}/{steps})")):
        if name == "f" and first_nan is None:
            continue
        term.buffer = b""
        term.press(key)
        keys[name] = term.wait_for(marker.encode(), timeout=30)
        term.drain(0.5)
    term.close()
    return {"first_frame_s": first, "peak_mb": peak, **{f"{k}_s": v for k, v in keys.items()}}


def writer_cost(count: int = 2000, repeat: int = 5) -> dict:
    """Microseconds per record of JsonlWriter, version 1 / version 2 / gzip, interleaved."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from long_recording import records

    from vgtui.jsonl import JsonlWriter

    stream = list(records(count))
    times: dict[str, list[float]] = {"v1": [], "v2": [], "gzip": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeat):
            for name, file, version in (("v1", "a.jsonl", 1), ("v2", "b.jsonl", 2), ("gzip", "c.jsonl.gz", 2)):
                started = time.perf_counter()
                with JsonlWriter(Path(folder) / file, version=version) as writer:
                    writer.write_all(stream)
                times[name].append((time.perf_counter() - started) / len(stream) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def _child(mode: str, path: str, *extra: str) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, __file__, "--child", mode, path, "--started", repr(started), *extra],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def _export(path: str) -> dict:
    out = Path(path).with_suffix(".bench.csv")
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "vgtui", "export", path,
                           "--csv", str(out)], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    rows = sum(1 for _ in open(out)) - 1
    out.unlink()
    return {"export_s": seconds, "rows": rows, "peak_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seeks", type=int, default=50)
    parser.add_argument("--pilot", action="store_true", help="also time the Textual app's first frame")
    parser.add_argument("--pty", action="store_true", help="also run the real `vgtui replay` on a pty")
    parser.add_argument("--writer", action="store_true", help="also time JsonlWriter per record")
    parser.add_argument("--export", action="store_true", help="also time `vgtui export --csv`")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "open":
        return print(json.dumps(child_open(args.path)))
    if args.child == "seek":
        return print(json.dumps(child_seek(args.path, args.seeks)))
    if args.child == "pilot":
        return print(json.dumps(child_pilot(args.path, args.started)))

    size = Path(args.path).stat().st_size
    opens = [_child("open", args.path) for _ in range(args.repeat)]
    steps = opens[0]["steps"]
    print(f"{args.path}: {size / 1e6:.1f} MB, {steps:,} step records, {size / max(1, steps):,.0f} bytes/record")

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"open (median of {args.repeat}): index {median(opens, 'index_s'):.2f} s, last position fed "
          f"{median(opens, 'window_s'):.2f} s, first overview {median(opens, 'first_overview_s'):.2f} s "
          f"({opens[0]['overview_records']} records; window {opens[0]['window_records']}, cached "
          f"{opens[0]['cached']}); peak RSS {median(opens, 'peak_mb'):.0f} MB")
    seeks = [_child("seek", args.path, "--seeks", str(args.seeks)) for _ in range(args.repeat)]
    print(f"seek (median of {args.repeat} x {args.seeks} random): median {median(seeks, 'seek_median_s') * 1e3:.0f} ms,"
          f" worst {max(s['seek_max_s'] for s in seeks) * 1e3:.0f} ms; step forward "
          f"{median(seeks, 'forward_median_s') * 1e3:.2f} ms; to the first NaN "
          f"{median(seeks, 'first_nonfinite_seek_s') * 1e3:.0f} ms; peak RSS {median(seeks, 'peak_mb'):.0f} MB")
    if args.pilot:
        pilots = [_child("pilot", args.path) for _ in range(args.repeat)]
        print(f"vgtui replay in run_test (median of {args.repeat}): first frame "
              f"{median(pilots, 'first_frame_s'):.2f} s after process start; peak RSS "
              f"{median(pilots, 'peak_mb'):.0f} MB")
    if args.pty:
        from vgtui.tui.sources import ReplaySource

        source = ReplaySource(args.path)
        last_step, first_nan = int(source.step_numbers[-1]), source.first_nonfinite()
        del source
        runs = [pty_replay(args.path, steps, last_step, first_nan) for _ in range(args.repeat)]
        keys = ", ".join(f"{k} {median(runs, f'{k}_s') * 1e3:.0f} ms" for k in ("home", "end", "f")
                         if f"{k}_s" in runs[0])
        print(f"vgtui replay on a pty (median of {args.repeat}): spawn -> last step on screen "
              f"{median(runs, 'first_frame_s'):.2f} s, peak RSS (VmHWM) then {median(runs, 'peak_mb'):.0f} MB; "
              f"key -> new position on screen: {keys}")
    if args.writer:
        cost = writer_cost()
        print("JsonlWriter per record (2,000 relu-30-he records, median of 5 interleaved): "
              + ", ".join(f"{name} {us:.0f} µs" for name, us in cost.items()))
    if args.export:
        result = _export(args.path)
        print(f"vgtui export --csv: {result['rows']:,} rows in {result['export_s']:.1f} s, "
              f"peak RSS {result['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
