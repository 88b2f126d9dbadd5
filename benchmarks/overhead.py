"""Probe overhead: a bare training loop vs the same loop with the probe, interleaved A/B runs.

    .venv/bin/python benchmarks/overhead.py [--device cpu|cuda] [--pairs 150] [--aa]

For each network, a bare loop and a probed loop (separate models, identical batches) take turns
one sampling interval at a time: one step each when measuring every step, N steps each at
"every N" (so each turn holds exactly one measured step), the order swapped every pair. The
figure is the median of the per-pair ratios probed/bare. Turns this short put both sides under
the same machine load: on the shared 2-core box an A/A run (``--aa``: a second bare loop in
place of the probed one) reads 0.99-1.01, where 20-step blocks read anywhere in 0.8-1.2.
Prints Markdown tables for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vgtui.models import build_model, make_optimizer  # noqa: E402
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


def make_loop(preset, device, mode: str = "bare", sample_every: int = 1):
    """A training loop: ``bare``; ``probe`` (vgtui's probe); or ``floor``: the least any exact
    per-layer ‖∂L/∂W‖ must cost, one dot product per parameter gradient after backward and
    nothing else (no hooks, no ‖∂L/∂h‖, no packing, no transfer)."""
    built = build_model(preset, device)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    data = SyntheticData(preset.seed, preset.batch_size, device)
    batches = [data.batch(i) for i in range(8)]
    params = list(model.parameters())
    probe = Probe(built.layers, params, owns_backward=True) if mode == "probe" else None
    floor = mode == "floor"
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
            out = probe.forward(model, x) if probe is not None else model(x)  # as the trainer does
            loss = built.loss_fn(out, y)
            probe.backward(loss) if probe is not None else loss.backward()
            if floor and step % sample_every == 0:
                grads = [p.grad for p in params]
                if device.type == "cuda":
                    torch._foreach_norm(grads)  # one fused kernel
                else:
                    [torch.dot(g.view(-1), g.view(-1)) for g in grads]
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


def measure(preset, device, pairs: int, sample_every: int = 1, mode: str = "probe",
            turn_intervals: int = 1) -> tuple[float, float, float]:
    """(median ratio, median bare seconds/step, median probed seconds/step) over ``pairs`` turns
    of ``turn_intervals`` sampling intervals each side."""
    bare = make_loop(preset, device, "bare")
    probed = make_loop(preset, device, mode, sample_every)
    for loop in (bare, probed):
        loop(3 * sample_every)
    turn = sample_every * turn_intervals
    ratios, bare_times, probed_times = [], [], []
    for r in range(pairs):
        order = (bare, probed) if r % 2 == 0 else (probed, bare)
        times = {}
        for loop in order:
            times[loop] = loop(turn)
        ratios.append(times[probed] / times[bare])
        bare_times.append(times[bare] / turn)
        probed_times.append(times[probed] / turn)
    return statistics.median(ratios), statistics.median(bare_times), statistics.median(probed_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=150, help="turns per side (default 150)")
    parser.add_argument("--turn", type=int, default=None,
                        help="sampling intervals per turn (default 1 on CPU; 10 on CUDA, where each turn "
                             "ends in a synchronisation that would otherwise hide the launch queue)")
    parser.add_argument("--aa", action="store_true", help="A/A: a second bare loop instead of the probe")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the floor: one dot per parameter gradient, nothing else")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--intervals", default="1,2,5,10", help="sampling intervals for the sigmoid-deep sweep")
    parser.add_argument("--only", default=None, help="run only the networks whose label contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    turn = args.turn or (10 if device.type == "cuda" else 1)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.pairs} interleaved turns of {turn} sampling interval(s){' (A/A)' if args.aa else ''}\n")
    mode = "bare" if args.aa else "probe"
    print("| network | bare ms/step | probed ms/step | median ratio (every step) | floor: ‖∂L/∂W‖ alone |")
    print("|---|---|---|---|---|")
    networks = dict(NETWORKS, **(NETWORKS_CUDA if device.type == "cuda" else {}))
    if args.only:
        networks = {k: v for k, v in networks.items() if args.only in k}
    for label, (name, changes) in networks.items():
        preset = load_preset(name).replace(**changes)
        ratio, bare_s, probed_s = measure(preset, device, args.pairs, 1, mode, turn)
        floor = measure(preset, device, args.pairs, 1, "floor", turn)[0] if args.floor else math.nan
        print(f"| {label} | {bare_s * 1e3:.1f} | {probed_s * 1e3:.1f} | {ratio:.3f} | {floor:.3f} |", flush=True)
    sweeps = {} if args.only else {"sigmoid-deep": load_preset("sigmoid-deep")}
    if device.type == "cuda" and networks:
        label, (name, changes) = next(iter(networks.items()))
        sweeps[label] = load_preset(name).replace(**changes)
    for label, preset in sweeps.items():
        print(f"\n| {label}, sample every | median ratio |")
        print("|---|---|")
        for every in [int(v) for v in args.intervals.split(",")]:
            ratio, _, _ = measure(preset, device, max(20, args.pairs // every), every, mode, turn)
            print(f"| {every} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
