"""The held-out evaluation's share of a training run's wall time, per preset, as `vgtui run`
trains it (the overhead budget at its default 2 %), and the wall time with it off for reference.

    .venv/bin/python benchmarks/heldout_cost.py [--steps 300] [--repeats 3] [PRESET ...]

For each preset: runs of ``--steps`` steps with the preset's eval keys (default every 100 steps,
4 batches) and with ``eval_every = 0``, alternating, ``--repeats`` times each; prints the median
share (host seconds inside the evaluations over the run's wall time: all of it on the CPU) and
the median wall time of each arm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgtui.channel import Channel  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.trainer import Trainer  # noqa: E402

DEFAULT_PRESETS = ["sigmoid-deep", "relu-30-he", "rnn-tanh", "cnn-plain"]


def run(preset, steps: int) -> tuple[float, float]:
    """(wall seconds, seconds inside the held-out evaluations) of one run."""
    trainer = Trainer(preset, Channel(maxlen=1_000_000), max_steps=steps, overhead_budget=0.02, device="cpu")
    began = time.perf_counter()
    trainer.start()
    trainer.join()
    wall = time.perf_counter() - began
    return wall, trainer.heldout.seconds if trainer.heldout is not None else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=DEFAULT_PRESETS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.presets:
        preset = load_preset(name)
        on, off, shares = [], [], []
        for _ in range(args.repeats):
            wall, evaluating = run(preset, args.steps)
            on.append(wall)
            shares.append(evaluating / wall)
            off.append(run(preset.replace(eval_every=0), args.steps)[0])
        print(f"{name}: eval every {preset.eval_every} steps x {preset.eval_batches} batches of "
              f"{preset.batch_size}: {statistics.median(shares):.2%} of wall time; run "
              f"{statistics.median(on):.2f} s with it, {statistics.median(off):.2f} s without "
              f"({args.steps} steps)")


if __name__ == "__main__":
    main()
