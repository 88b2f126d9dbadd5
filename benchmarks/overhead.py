"""Probe overhead: a bare training loop vs the same loop with the probe, interleaved A/B runs.

    .venv/bin/python benchmarks/overhead.py [--device cpu|cuda] [--rounds 7] [--steps 30]

For each network, rounds alternate bare and probed runs of the same number of steps (after a
warm-up) on identical batches; the figure is the median of the per-round ratios probed/bare, so
that drifts in machine load hit both sides alike. Also shows how the ratio falls with the
sampling interval. Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vgtui.build import build_model, make_optimizer  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.data import SyntheticData  # noqa: E402
from vgtui.probe import Probe  # noqa: E402

NETWORKS = {
    "sigmoid-deep (784→5×1000→10)": ("sigmoid-deep", {}),
    "50×256 ReLU": ("relu-he", {"depth": 50, "width": 256}),
    "relu-30-he (30×256)": ("relu-30-he", {}),
}
#: On a GPU the networks above are launch-bound (a few hundred microseconds of kernels a step);
#: these keep it busy, which is where the ≤ 1.02 target applies.
NETWORKS_CUDA = {
    "20×2048 ReLU He, batch 2048": ("relu-he", {"depth": 20, "width": 2048, "batch_size": 2048}),
    "sigmoid 5×4096, batch 4096": ("sigmoid-deep", {"width": 4096, "batch_size": 4096}),
}


def make_loop(preset, device, with_probe: bool, sample_every: int = 1):
    built = build_model(preset, device)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    data = SyntheticData(preset.seed, preset.batch_size, device)
    batches = [data.batch(i) for i in range(8)]
    probe = Probe(built.layers, list(model.parameters())).attach() if with_probe else None
    state = {"step": 0}

    def run(steps: int) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step = state["step"]
            x, y = batches[step % len(batches)]
            sampled = probe is not None and step % sample_every == 0
            if probe is not None:
                probe.begin(sampled)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = built.loss_fn(out, y)
            loss.backward()
            if probe is not None:
                probe.after_backward()
                probe.clip(preset.clip, preset.clip_threshold)
                probe.before_step(optimizer)
            optimizer.step()
            if sampled:
                probe.finish(step, loss, (out.detach().argmax(1) == y).float().mean(), optimizer)
                probe.poll()
            state["step"] += 1
        if probe is not None:
            probe.poll(wait=True)
        sync()
        return time.perf_counter() - start

    return run


def measure(preset, device, rounds: int, steps: int, sample_every: int = 1) -> tuple[float, float, float]:
    """(median ratio, median bare seconds/step, median probed seconds/step)."""
    bare = make_loop(preset, device, False)
    probed = make_loop(preset, device, True, sample_every)
    bare(3)
    probed(3)
    ratios, bare_times, probed_times = [], [], []
    for r in range(rounds):
        order = (bare, probed) if r % 2 == 0 else (probed, bare)
        times = {}
        for loop in order:
            times[loop] = loop(steps)
        ratios.append(times[probed] / times[bare])
        bare_times.append(times[bare] / steps)
        probed_times.append(times[probed] / steps)
    return statistics.median(ratios), statistics.median(bare_times), statistics.median(probed_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--intervals", default="1,2,5,10", help="sampling intervals for the sigmoid-deep sweep")
    parser.add_argument("--only", default=None, help="run only the networks whose label contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds of {args.steps} steps\n")
    print("| network | bare ms/step | probed ms/step | median ratio (every step) |")
    print("|---|---|---|---|")
    networks = dict(NETWORKS, **(NETWORKS_CUDA if device.type == "cuda" else {}))
    if args.only:
        networks = {k: v for k, v in networks.items() if args.only in k}
    for label, (name, changes) in networks.items():
        preset = load_preset(name).replace(**changes)
        ratio, bare_s, probed_s = measure(preset, device, args.rounds, args.steps)
        print(f"| {label} | {bare_s * 1e3:.1f} | {probed_s * 1e3:.1f} | {ratio:.3f} |", flush=True)
    sweeps = {} if args.only else {"sigmoid-deep": load_preset("sigmoid-deep")}
    if device.type == "cuda" and networks:
        label, (name, changes) = next(iter(networks.items()))
        sweeps[label] = load_preset(name).replace(**changes)
    for label, preset in sweeps.items():
        print(f"\n| {label}, sample every | median ratio |")
        print("|---|---|")
        for every in [int(v) for v in args.intervals.split(",")]:
            ratio, _, _ = measure(preset, device, args.rounds, args.steps, every)
            print(f"| {every} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
