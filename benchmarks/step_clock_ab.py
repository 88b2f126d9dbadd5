"""A/B of the overhead budget's timing: the trainer bracketing each probe call with the clock (the
probe at a git revision that has no clock of its own) against this tree's probe timing itself,
with a bare loop alongside, one measured step a turn, rotating (as probe_ab.py does).

    .venv/bin/python benchmarks/step_clock_ab.py [--against e36b482] [--preset relu-30-he] [--pairs 400]

Prints the median ratio of each to the bare loop, new/old, and the clock's seconds per step of
each (what the budget is charged: it should be the same work).
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from probe_ab import probe_module_at  # noqa: E402
from vgtui import probe as probe_now  # noqa: E402
from vgtui.config import load_preset  # noqa: E402
from vgtui.data import SyntheticData  # noqa: E402
from vgtui.engine import ProbeClock  # noqa: E402
from vgtui.models import build_model, make_optimizer  # noqa: E402


def make_loop(preset, module, self_timed: bool):
    """One measured training step per call, timed for the budget the way that version does."""
    built = build_model(preset)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    batches = [SyntheticData(preset.seed, preset.batch_size).batch(i) for i in range(8)]
    clock = ProbeClock(torch.device("cpu"))
    probe = None
    if module is not None:
        options = {"clock": clock} if self_timed else {}
        probe = module.Probe(built.layers, list(model.parameters()), owns_backward=True, **options)
    state = {"step": 0}
    bracket = (lambda: None, lambda: None) if self_timed else (clock.start, clock.stop)
    start_clock, stop_clock = bracket
    clip = preset.clip

    def step() -> float:
        i = state["step"]
        state["step"] += 1
        x, y = batches[i % len(batches)]
        began = time.perf_counter()
        if probe is None:
            optimizer.zero_grad(set_to_none=True)
            built.loss_fn(model(x), y).backward()
            optimizer.step()
            return time.perf_counter() - began
        probe.begin(True)
        optimizer.zero_grad(set_to_none=True)
        out = probe.forward(model, x)
        loss = built.loss_fn(out, y)
        probe.backward(loss)
        start_clock()
        probe.after_backward()
        if clip != "none":
            stop_clock()
        probe.clip(clip, preset.clip_threshold)
        if clip != "none":
            start_clock()
        probe.count(i, loss)
        probe.before_step(optimizer)
        stop_clock()
        optimizer.step()
        start_clock()
        probe.finish(i, loss, (out.detach().argmax(1) == y).float().mean(), optimizer)
        stop_clock()
        if self_timed:
            with probe.timed():
                probe.poll()
        else:
            start_clock()
            probe.poll()
            stop_clock()
        return time.perf_counter() - began

    step.clock = clock
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="e36b482", help="a revision whose trainer timed the probe")
    parser.add_argument("--preset", default="relu-30-he")
    parser.add_argument("--set", default="", help="preset changes, e.g. clip='norm'")
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    changes = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    preset = load_preset(args.preset).replace(**changes)
    loops = {"bare": make_loop(preset, None, False),
             "old": make_loop(preset, probe_module_at(args.against), False),
             "new": make_loop(preset, probe_now, True)}
    names = list(loops)
    for _ in range(5):
        for loop in loops.values():
            loop()
    for name in ("old", "new"):
        loops[name].clock._seconds = 0.0
    times = {name: [] for name in names}
    for r in range(args.pairs):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            times[name].append(loops[name]())
    ratio = {name: statistics.median(t / b for t, b in zip(times[name], times["bare"])) for name in names}
    new_vs_old = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
    charged = {name: loops[name].clock.seconds() / args.pairs * 1e3 for name in ("old", "new")}
    print(f"{args.preset} {changes or ''}: bare {statistics.median(times['bare']) * 1e3:.1f} ms/step, "
          f"old ({args.against}) {ratio['old']:.3f}x, new {ratio['new']:.3f}x, new/old {new_vs_old:.3f}; "
          f"clock charged old {charged['old']:.2f} ms/step, new {charged['new']:.2f} ms/step")


if __name__ == "__main__":
    main()
