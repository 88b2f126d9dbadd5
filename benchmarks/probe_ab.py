"""A/B of two versions of the probe in one process: this tree's vgtui/probe.py against the one
at a git revision, on the same network, with a bare loop alongside, one step a turn, rotating.

    .venv/bin/python benchmarks/probe_ab.py [--against HEAD] [--preset relu-30-he] [--pairs 400]

Machine load on a shared box moves the bare step time by ±30 % minute to minute, which buries a
1 % change between two separate runs of overhead.py; interleaving the two probes step by step
puts both under the same load. Prints the median ratio of each probe to the bare loop and of the
new probe to the old.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vgtui import probe as probe_now  # noqa: E402
from vgtui.models import build_model, make_optimizer  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.data import SyntheticData  # noqa: E402


def probe_module_at(revision: str):
    """vgtui/probe.py as it was at ``revision``, imported as a module of the vgtui package."""
    source = subprocess.run(["git", "show", f"{revision}:vgtui/probe.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "probe_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vgtui.probe_then", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_loop(preset, module):
    """One training step per call: bare (``module`` None) or probed by ``module.Probe`` on every
    step, the way the trainer runs it (taps when that probe has them)."""
    built = build_model(preset)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    batches = [SyntheticData(preset.seed, preset.batch_size).batch(i) for i in range(8)]
    probe = None
    if module is not None:
        probe = module.Probe(built.layers, list(model.parameters()), owns_backward=True)
        if not hasattr(probe, "forward"):
            probe.attach()
    state = {"step": 0}

    def step() -> float:
        i = state["step"]
        state["step"] += 1
        x, y = batches[i % len(batches)]
        start = time.perf_counter()
        if probe is not None:
            probe.begin(True)
        optimizer.zero_grad(set_to_none=True)
        out = probe.forward(model, x) if hasattr(probe, "forward") else model(x)
        loss = built.loss_fn(out, y)
        probe.backward(loss) if probe is not None else loss.backward()
        if probe is not None:
            probe.after_backward()
            probe.clip(preset.clip, preset.clip_threshold)
            probe.before_step(optimizer)
        optimizer.step()
        if probe is not None:
            probe.finish(i, loss, (out.detach().argmax(1) == y).float().mean(), optimizer)
            probe.poll()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="git revision of the old probe (default HEAD)")
    parser.add_argument("--preset", default="relu-30-he")
    parser.add_argument("--set", default="", help="preset changes, e.g. depth=50,width=256")
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    changes = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    preset = load_preset(args.preset).replace(**changes)
    loops = {"bare": make_loop(preset, None), "old": make_loop(preset, probe_module_at(args.against)),
             "new": make_loop(preset, probe_now)}
    names = list(loops)
    for _ in range(5):
        for loop in loops.values():
            loop()
    times = {name: [] for name in names}
    for r in range(args.pairs):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            times[name].append(loops[name]())
    ratio = {name: statistics.median(t / b for t, b in zip(times[name], times["bare"])) for name in names}
    new_vs_old = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
    print(f"{args.preset} {changes or ''}: bare {statistics.median(times['bare']) * 1e3:.1f} ms/step, "
          f"old ({args.against}) {ratio['old']:.3f}x, new {ratio['new']:.3f}x, new/old {new_vs_old:.3f}")


if __name__ == "__main__":
    main()
