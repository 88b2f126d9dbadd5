"""Measure the TUI's cost to training and to the terminal, under a real pty.

    .venv/bin/python benchmarks/tui_bench.py [--preset sigmoid-deep] [--steps 150] [--rounds 2]
    .venv/bin/python benchmarks/tui_bench.py --ab [--device cuda --steps 6000]

Reports, as JSON lines and a summary:
* steps/s of the trainer inside the running TUI ÷ steps/s with a headless consumer (interleaved),
* record-to-screen latency: from the record's creation in the trainer to the end of the frame
  that drew it (median, p95),
* per-frame Python work (drain + state update + widget updates) in ms,
* bytes/s written to the terminal at 80×24 and 200×50,
* UI process CPU while paused (% of one core),
* time from pressing q mid-training to process exit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import select
import statistics
import struct
import sys
import tempfile
import termios
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, by thread name where known."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), f"native-{tid}")
        if int(tid) == os.getpid():
            name = "main (Textual event loop)"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def rate_of(steps) -> float:
    """Trainer throughput from the records' own clock (same measure for both consumers)."""
    steps = [s for s in steps if s.step >= 5]  # skip warm-up
    if len(steps) < 2:
        return float("nan")
    first, last = steps[0], steps[-1]
    return (last.step - first.step) / (last.time - first.time)


def headless(preset_name: str, steps: int) -> dict:
    from vgtui.channel import Channel
    from vgtui.config import load_preset
    from vgtui.records import StepRecord
    from vgtui.trainer import TrainerController

    channel = Channel(maxlen=100_000)
    controller = TrainerController(channel, max_steps=steps)
    controller.start(load_preset(preset_name))
    got = []
    while controller.alive or len(channel):
        channel.wait(0.2)
        got += [r for r in channel.drain() if isinstance(r, StepRecord)]
    controller.stop()
    return {"kind": "headless", "steps_per_sec": rate_of(got)}


# -- the child: the real app on a pty ------------------------------------------------------------

def child(mode: str, preset_name: str, steps: int, out_path: str, device: str = "cpu") -> None:
    os.environ["TEXTUAL_ANIMATIONS"] = "none"
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    from vgtui.config import load_preset
    from vgtui.records import StepRecord
    from vgtui.tui import app as tui_app
    from vgtui.tui.sources import LiveSource

    stats = {"lat": [], "frames": [], "steps": [], "t_first": None, "t_done": None}
    original = tui_app.Dashboard.poll

    def poll(self):
        if stats.get("detached"):
            # "headless" phase of the A/B mode: drain and drop, draw nothing
            records = self.source.poll()
            trainer = self.source.trainer
            base = getattr(trainer, "_t0", None)
            stats["steps"] += [r for r in records if isinstance(r, StepRecord)]
            if self.source.trainer is not None and not self.source.trainer.is_alive():
                self.app.exit()
            return
        before = self.state.version
        t0 = time.perf_counter()
        records = self.source.poll()
        # re-inject what we drained: the original poll drains the source itself
        self.source._pending = records
        original(self)
        done = time.perf_counter()
        trainer = self.source.trainer
        base = getattr(trainer, "_t0", None)
        new_steps = [r for r in records if isinstance(r, StepRecord)]
        if new_steps:
            if stats["t_first"] is None:
                stats["t_first"] = time.time()
                stats["cpu0"], stats["wall0"] = thread_cpu(), time.perf_counter()
            elif trainer is not None and trainer.is_alive():  # its threads are still listed
                cpu = thread_cpu()
                if trainer.name in cpu:
                    stats["cpu1"], stats["wall1"] = cpu, time.perf_counter()
            stats["frames"].append(done - t0)
            stats["steps"] += new_steps
            if base is not None:
                stats["lat"] += [done - (base + r.time) for r in new_steps]
                stats.setdefault("lat_at", []).extend([done] * len(new_steps))
        if self.state.finished and stats["t_done"] is None:
            stats["t_done"] = time.time()
            self.app.exit()
        del before

    tui_app.Dashboard.poll = poll
    preset = load_preset(preset_name)
    source = LiveSource(preset, max_steps=steps if mode in ("live", "ab") else None,
                        paused=mode == "paused", device=device)
    real_poll = source.poll

    def replay_poll():
        pending = getattr(source, "_pending", None)
        if pending is not None:
            source._pending = None
            return pending
        return real_poll()

    source.poll = replay_poll
    app = tui_app.make_app(source)
    result: dict = {"mode": mode}
    if mode == "ab":
        stats["phases"] = []  # (perf_counter start, end, attached)

        def toggle():
            attached = True
            while True:
                start = time.perf_counter()
                stats["detached"] = not attached
                time.sleep(2.0)
                stats["phases"].append((start, time.perf_counter(), attached))
                attached = not attached

        threading.Thread(target=toggle, daemon=True).start()
    if mode == "paused":
        def watch():
            time.sleep(4.0)
            c0, w0 = time.process_time(), time.perf_counter()
            time.sleep(6.0)
            c1, w1 = time.process_time(), time.perf_counter()
            result["paused_cpu_percent"] = 100.0 * (c1 - c0) / (w1 - w0)
            app.call_from_thread(app.exit)

        threading.Thread(target=watch, daemon=True).start()
    if os.environ.get("BENCH_PROFILE"):
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(app.run)
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "tottime")).print_stats(45)
        result["profile"] = buffer.getvalue()
    else:
        app.run()
    source.close()
    if mode == "ab" and stats["steps"]:
        base = source.trainer._t0
        times = [base + r.time for r in stats["steps"] if r.step >= 5]
        rates = {True: [], False: []}
        for start, end, attached in stats["phases"][1:]:  # the first phase holds the start-up
            n = sum(start <= t < end for t in times)
            if n >= 2 and start >= times[0] and end <= times[-1]:
                rates[attached].append(n / (end - start))
        result["ab_attached_steps_per_sec"] = rates[True]
        result["ab_detached_steps_per_sec"] = rates[False]
        if rates[True] and rates[False]:
            result["ab_ratio_of_medians"] = statistics.median(rates[True]) / statistics.median(rates[False])
            # neighbouring phases: each attached phase against the mean of the phases around it
        result["switch_interval"] = sys.getswitchinterval()
        with open(out_path, "w") as handle:
            json.dump(result, handle)
        return
    if stats["steps"]:
        result["steps_per_sec"] = rate_of(stats["steps"])
        lat = sorted(stats["lat"])
        frames = sorted(stats["frames"])
        result["latency_ms_median"] = 1000 * statistics.median(lat) if lat else None
        result["latency_ms_p95"] = 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None
        if stats.get("lat_at"):  # per minute of the run: does latency grow over time?
            start, minutes = stats["lat_at"][0], {}
            for at, value in zip(stats["lat_at"], stats["lat"]):
                minutes.setdefault(int((at - start) // 60), []).append(value)
            result["latency_ms_median_by_minute"] = [round(1000 * statistics.median(v), 1)
                                                     for _, v in sorted(minutes.items())]
        result["frame_ms_median"] = 1000 * statistics.median(frames)
        result["frame_ms_p95"] = 1000 * frames[int(0.95 * (len(frames) - 1))]
        result["frame_ms_max"] = 1000 * frames[-1]
        result["frames"] = len(frames)
    if stats.get("cpu1"):
        # CPU used between the first and the last step record, per thread
        cpu = {k: v - stats["cpu0"].get(k, 0.0) for k, v in stats["cpu1"].items()}
        wall = stats["wall1"] - stats["wall0"]
        ui = sum(v for k, v in cpu.items() if k.startswith("main") or k.startswith("textual"))
        result["ui_cpu_percent_of_core"] = 100 * ui / wall
        result["ui_cpu_share_of_process"] = ui / max(1e-9, sum(cpu.values()))
        result["threads_cpu_s"] = {k: round(v, 2) for k, v in cpu.items() if v > 0.05}
    result["t_first"] = stats["t_first"]
    result["t_done"] = stats["t_done"]
    with open(out_path, "w") as handle:
        json.dump(result, handle)


def on_pty(mode: str, preset: str, steps: int, size: tuple[int, int], quit_after: float | None = None,
           device: str = "cpu") -> dict:
    """Run the child on a pty of ``size``; count the bytes it writes per arrival time."""
    out_path = tempfile.mktemp(suffix=".json")
    pid, fd = pty.fork()
    if pid == 0:  # a fresh interpreter on the pty (a forked copy would share our state)
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "--child", mode,
                                  "--preset", preset, "--steps", str(steps), "--out", out_path,
                                  "--device", device])
    cols, rows = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    chunks: list[tuple[float, int]] = []
    start = time.time()
    quit_sent = None
    exit_time = None
    while True:
        if quit_after is not None and quit_sent is None and time.time() - start > quit_after:
            os.write(fd, b"q")
            quit_sent = time.time()
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append((time.time(), len(data)))
            # answer the terminal queries a real terminal would (cursor position etc.) — none needed
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            exit_time = time.time()
            break
    if exit_time is None:
        os.waitpid(pid, 0)
        exit_time = time.time()
    result = {}
    if os.path.exists(out_path):
        with open(out_path) as handle:
            result = json.load(handle)
        os.unlink(out_path)
    result["size"] = f"{cols}x{rows}"
    first, done_at = result.get("t_first"), result.get("t_done")
    if first and done_at and done_at > first:
        window = sum(n for t, n in chunks if first <= t <= done_at)
        result["bytes_per_sec"] = window / (done_at - first)
    if mode == "paused" and chunks:
        # steady state while paused: the last 6 s before exit
        window = [n for t, n in chunks if exit_time - 7 <= t <= exit_time - 1]
        result["bytes_per_sec_paused"] = sum(window) / 6.0
    if quit_sent is not None:
        result["quit_to_exit_s"] = exit_time - quit_sent
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sigmoid-deep")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default=None)
    parser.add_argument("--ab", action="store_true",
                        help="one TUI run alternating 2 s drawn / 2 s not drawn (robust to load drift)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the --ab mode)")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="one long live run at 120x40, quit after SECONDS; latency per minute")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.preset, args.steps, args.out, args.device)
        return
    if args.soak:
        r = on_pty("live", args.preset, 10**9, (120, 40), quit_after=args.soak, device=args.device)
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("t_")}), flush=True)
        return
    if args.ab:
        r = on_pty("ab", args.preset, args.steps, (80, 24), device=args.device)
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("t_")}), flush=True)
        return
    results = []
    ratios = []
    for _ in range(args.rounds):
        h = headless(args.preset, args.steps)
        print(json.dumps(h), flush=True)
        t = on_pty("live", args.preset, args.steps, (80, 24))
        print(json.dumps({k: v for k, v in t.items() if not k.startswith("t_")}), flush=True)
        results += [h, t]
        if t.get("steps_per_sec") and h.get("steps_per_sec"):
            ratios.append(t["steps_per_sec"] / h["steps_per_sec"])
    big = on_pty("live", args.preset, args.steps, (200, 50))
    print(json.dumps({k: v for k, v in big.items() if not k.startswith("t_")}), flush=True)
    paused = on_pty("paused", args.preset, args.steps, (80, 24))
    print(json.dumps({k: v for k, v in paused.items() if not k.startswith("t_")}), flush=True)
    quit_run = on_pty("quit", args.preset, args.steps, (80, 24), quit_after=6.0)
    print(json.dumps({k: v for k, v in quit_run.items() if not k.startswith("t_")}), flush=True)
    print("\nsummary")
    print(f"  TUI/headless steps/s ratio: {', '.join(f'{r:.3f}' for r in ratios)}"
          f" (median {statistics.median(ratios):.3f})" if ratios else "  no ratio")
    print(f"  load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
