"""Soak: a long headless run on a tiny network; memory must stay flat.

    .venv/bin/python benchmarks/soak.py [--steps 100000] [--record /tmp/soak.jsonl]

Trains a 1x16 ReLU net (batch 16) for --steps steps, measured every step, with a consumer that
drains the channel like the TUI does (keeping bounded histories). Prints the resident set size at
step 1,000 and at the end, and the growth between them (target: at most 5 %); with --record, also
the recording's size per 1,000 steps at several points (it should grow linearly).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgtui.channel import Channel  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.jsonl import JsonlWriter  # noqa: E402
from vgtui.records import StepRecord  # noqa: E402
from vgtui.trainer import Trainer  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    preset = load_preset("relu-he").replace(depth=1, width=16, batch_size=16)
    channel = Channel(4096)
    trainer = Trainer(preset, channel, max_steps=args.steps)
    writer = JsonlWriter(args.record) if args.record else None
    history = collections.deque(maxlen=2000)
    marks: dict[int, float] = {}
    sizes: dict[int, int] = {}
    checkpoints = sorted({1_000, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    started = time.perf_counter()
    trainer.start()
    while trainer.is_alive() or len(channel):
        channel.wait(0.1)
        for record in channel.drain():
            if writer:
                writer.write(record)
            if isinstance(record, StepRecord):
                history.append(record)
                if record.step in checkpoints:
                    marks[record.step] = rss_mib()
                    if writer:
                        sizes[record.step] = args.record.stat().st_size
    elapsed = time.perf_counter() - started
    if writer:
        writer.close()
    print(f"{args.steps} steps in {elapsed:.0f} s ({args.steps / elapsed:.0f} steps/s), "
          f"{channel.dropped} records dropped")
    for step in checkpoints:
        line = f"  step {step:>7}: RSS {marks.get(step, float('nan')):7.1f} MiB"
        if step in sizes:
            line += f", recording {sizes[step] / 2**20:7.1f} MiB ({sizes[step] / (step + 1) * 1000 / 2**20:.2f} MiB per 1k steps)"
        print(line)
    first, last = marks.get(1_000), marks.get(checkpoints[-1])
    if first and last:
        print(f"RSS growth from step 1,000 to {checkpoints[-1]:,}: {100 * (last / first - 1):+.1f} %")


if __name__ == "__main__":
    main()
