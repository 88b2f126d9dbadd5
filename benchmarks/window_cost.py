"""What the step window (StepRecord.window) costs an unmeasured CPU trainer step, in its three
settings: off (``window=False``), the default (every step's loss; the norm only where clipping
computes it, which these presets do not), and ``window=True`` (the loss and one read of every
gradient per step). The three probes share one model and take turns in blocks of steps (A/B/C
interleaved); per setting the median whole step and the median ``Probe.count`` (the window's own
work, timed inside the step), and the whole-step ratio against off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/window_cost.py [--rounds 12] [--block 10]
"""
import argparse
import statistics
import time

from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.models import build_model, make_optimizer
from vgtui.probe import Probe

SETTINGS = {"off": False, "loss (default)": None, "loss+norm (window=True)": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args()
    for name in ("relu-30-he", "sigmoid-deep"):
        p = load_preset(name)
        b = build_model(p)
        opt = make_optimizer(b.model.parameters(), p)
        probes = {s: Probe(b.layers, list(b.model.parameters()), owns_backward=True, window=w)
                  for s, w in SETTINGS.items()}
        data = SyntheticData(p.seed, p.batch_size)
        steps = {s: [] for s in SETTINGS}
        counts = {s: [] for s in SETTINGS}
        i = 0
        for r in range(args.rounds + 1):  # round 0 warms up and is not kept
            for s, probe in probes.items():
                for _ in range(args.block):
                    x, y = data.batch(i % 8)
                    t0 = time.perf_counter()
                    probe.begin(False)
                    opt.zero_grad(set_to_none=True)
                    loss = b.loss_fn(probe.forward(b.model, x), y)
                    probe.backward(loss)
                    probe.after_backward()
                    probe.clip(p.clip, p.clip_threshold)
                    t1 = time.perf_counter()
                    probe.count(i, loss)
                    t2 = time.perf_counter()
                    opt.step()
                    t3 = time.perf_counter()
                    if r:
                        steps[s].append(t3 - t0)
                        counts[s].append(t2 - t1)
                    i += 1
        base = statistics.median(steps["off"])
        for s in SETTINGS:
            step, count = statistics.median(steps[s]), statistics.median(counts[s])
            print(f"{name:13s} {s:24s} step {step * 1e3:7.2f} ms ({step / base:.3f}x off)  "
                  f"count() {count * 1e6:7.1f} us = {count / step * 100:.3f} % of a step")


if __name__ == "__main__":
    main()
