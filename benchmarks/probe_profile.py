"""Where a sampled step's time goes, kernel by kernel: the torch profiler over probed steps.

    python benchmarks/probe_profile.py [--device cuda] [--preset relu-he] [--set depth=20,width=2048,batch_size=2048]

Runs the training loop with the core tier measured on every step and prints the profiler's
table sorted by device time (CUDA) or CPU time, with the probe's own phases labelled
(``probe.after_backward``, ``probe.finish``), so the kernels the probe adds stand out from
training's own.
"""

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from vgtui.models import build_model, make_optimizer  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.data import SyntheticData  # noqa: E402
from vgtui.probe import Probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="relu-he")
    parser.add_argument("--set", default="depth=20,width=2048,batch_size=2048")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    changes = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    preset = load_preset(args.preset).replace(**changes)
    device = torch.device(args.device)
    built = build_model(preset, device)
    optimizer = make_optimizer(built.model.parameters(), preset)
    batches = [SyntheticData(preset.seed, preset.batch_size, device).batch(i) for i in range(4)]
    probe = Probe(built.layers, list(built.model.parameters()), detail_every=10**9, owns_backward=True)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        probe.begin(True)
        optimizer.zero_grad(set_to_none=True)
        loss = built.loss_fn(probe.forward(built.model, x), y)
        probe.backward(loss)
        with record_function("probe.after_backward"):
            probe.after_backward()
            probe.clip("none")
        optimizer.step()
        with record_function("probe.finish"):
            probe.finish(i, loss, None, optimizer)
            probe.poll()

    for i in range(5):
        step(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            step(i)
        probe.poll(wait=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.steps} probed steps of {args.preset} {changes} on {device}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
