"""Where the probe's cost goes: bare loop vs probe present but idle vs the core tier measured.

    .venv/bin/python benchmarks/probe_tiers.py [--preset sigmoid-deep] [--rounds 150] [--steps 1]
        [--device cpu|cuda] [--set depth=20,width=2048,batch_size=2048]

Modes, run interleaved in one process on identical batches, ``--steps`` steps a turn (one on the
CPU, where short turns keep machine-load drift out of the ratios; ~10 on CUDA, where each turn
ends in a synchronisation):
  bare       no probe at all
  idle       probe present, never sampling (the model runs without taps, the probe returns early)
  core       sampling every step, detail tier off: per-layer ‖∂L/∂W‖ and ‖∂L/∂h‖, global norm,
             non-finite location, one transfer
  detail     sampling every step with the detail tier every step too (activation statistics,
             ‖W‖, update ratio, histograms)
"""

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgtui.models import build_model, make_optimizer  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.data import SyntheticData  # noqa: E402
from vgtui.probe import Probe  # noqa: E402

import torch  # noqa: E402


def make(preset, mode, device):
    built = build_model(preset, device)
    optimizer = make_optimizer(built.model.parameters(), preset)
    data = SyntheticData(preset.seed, preset.batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [data.batch(i) for i in range(4)]
    probe = None
    state = {"step": 0}
    if mode != "bare":
        probe = Probe(built.layers, list(built.model.parameters()),
                      detail_every=1 if mode == "detail" else 10**9, owns_backward=True)

    def run(steps):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            i = state["step"]
            state["step"] += 1
            x, y = batches[i % len(batches)]
            sampled = mode in ("core", "detail")
            if probe:
                probe.begin(sampled)
            optimizer.zero_grad(set_to_none=True)
            loss = built.loss_fn(probe.forward(built.model, x) if probe else built.model(x), y)
            probe.backward(loss) if probe else loss.backward()
            if probe:
                probe.after_backward()
                probe.clip("none")
                probe.before_step(optimizer)
            optimizer.step()
            if sampled:
                probe.finish(i, loss, None, optimizer)
                probe.poll()
        if probe:
            probe.poll(wait=True)
        sync()
        return (time.perf_counter() - start) / steps * 1e3

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sigmoid-deep")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", default="", help="preset changes, e.g. depth=20,width=2048")
    args = parser.parse_args()
    changes = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    preset = load_preset(args.preset).replace(**changes)
    device = torch.device(args.device)
    modes = ["bare", "idle", "core", "detail"]
    runs = {m: make(preset, m, device) for m in modes}
    for run in runs.values():
        run(3)
    times = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            times[m].append(runs[m](args.steps))
    bare = statistics.median(times["bare"])
    for m in modes:
        ms = statistics.median(times[m])
        print(f"{m:<7} {ms:7.1f} ms/step  ({ms / bare:.2f}x bare)")


if __name__ == "__main__":
    main()
