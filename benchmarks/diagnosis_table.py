"""Measure every built-in preset and write the table of docs/DIAGNOSIS.md.

    .venv/bin/python benchmarks/diagnosis_table.py            # print the tables
    .venv/bin/python benchmarks/diagnosis_table.py --write    # and replace them in docs/DIAGNOSIS.md

Each preset is trained headless on synthetic data with its fixed seed, one torch thread (as the
tests run), for ``--steps`` steps. The "truth" columns are what tests/test_diagnosis.py asserts:
the first/last ‖∂L/∂h‖ ratio over the first five steps and the verdicts at step 4. The last column
is the diagnosis after ``--steps`` steps. A second table compares the autoencoder with and without
greedy layer-wise pre-training at the start of fine-tuning, and the last line is the diagnosis's
own cost per record on a 30-layer record.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vgtui.config import builtin_names, load_preset  # noqa: E402
from vgtui.diagnosis import Diagnoser  # noqa: E402
from vgtui.records import LAYER_METRICS, RunHeader, StepRecord  # noqa: E402
from vgtui.trainer import run_to_completion  # noqa: E402

TRUTH_STEPS = 5
DOC = ROOT / "docs" / "DIAGNOSIS.md"


def train(preset, steps: int) -> tuple[RunHeader, list[StepRecord]]:
    records = run_to_completion(preset, steps)
    header = next(r for r in records if isinstance(r, RunHeader))
    return header, [r for r in records if isinstance(r, StepRecord)]


def ratio(record: StepRecord) -> float:
    """The diagnosis's own first/last rule: first and last *measured* layers."""
    return record.first_last_ratio().value


def sig(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    if abs(x) < 1e-2 or abs(x) >= 1e3:
        return f"{x:.1e}"
    return f"{x:.2g}" if abs(x) < 10 else f"{x:.0f}"


def verdicts(record: StepRecord) -> str:
    if not record.verdicts:
        return "(none yet)"
    return ", ".join(f"{v.kind} ({v.severity})" for v in record.verdicts)


def fraction(records: list[StepRecord], metric: str) -> float:
    values = [np.nanmax(r.layers[metric]) for r in records
              if r.nonfinite is None and not np.isnan(r.layers[metric]).all()]
    return float(np.median(values)) if values else float("nan")


def preset_row(name: str, steps: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    preset = load_preset(name)
    extra = 0
    if preset.pretrain_steps and preset.task == "autoencoder":
        extra = preset.pretrain_steps * preset.depth
    header, records = train(preset, steps + extra)
    train_records = [r for r in records if r.phase == "train"]
    first = train_records[:TRUTH_STEPS]
    ratios = [ratio(r) for r in first]
    median = float(np.nanmedian(ratios)) if not np.isnan(ratios).all() else float("nan")
    n = len(header.layers)
    factor = median ** (1 / (n - 1)) if median == median and median > 0 else median
    bad = next((r for r in records if r.nonfinite is not None), None)
    nonfinite = f"step {bad.step}: {bad.nonfinite[0]} ({bad.nonfinite[1]})" if bad else "–"
    clipped = sum(r.clipped for r in train_records) / len(train_records)
    dead = fraction(train_records, "dead") if header.preset["activation"] == "relu" else float("nan")
    sat = fraction(train_records, "saturated")
    row = (f"| `{name}` | {n} | {sig(ratios[0])} | {sig(median)} | {sig(factor)} | "
           f"{verdicts(first[-1])} | {nonfinite} | {clipped:.0%} | {sig(dead)} | {sig(sat)} | "
           f"{verdicts(train_records[-1])} |")
    return row, time.perf_counter() - t0


def pretrain_rows(steps: int) -> list[str]:
    rows = []
    for name in ("autoencoder-sigmoid", "autoencoder-sigmoid-pretrained"):
        preset = load_preset(name)
        extra = preset.pretrain_steps * preset.depth
        _, records = train(preset, extra + TRUTH_STEPS)
        pre = [r for r in records if r.phase != "train"]
        fine = [r for r in records if r.phase == "train"]
        g = np.median([r.layers["act_grad_norm"] for r in fine], axis=0)
        rel = g / g[-1]
        rows.append(f"| `{name}` | {extra} | {sig(fine[0].loss)} | {sig(float(np.median([ratio(r) for r in fine])))} | "
                    f"{' / '.join(sig(x) for x in rel[:4])} | {verdicts(fine[-1])} |")
        del pre
    return rows


def _bench_records(layers: int, sick: bool) -> tuple[RunHeader, list[StepRecord]]:
    """200 synthetic 30-layer records: healthy, or with every rule firing at once (the costliest)."""
    names = [f"hidden{i + 1}" for i in range(layers - 1)] + ["output"]
    header = RunHeader(preset={"name": "bench", "activation": "relu", "task": "classifier",
                               "clip": "norm", "init": "kaiming_normal", "lr": 0.01},
                       layers=names, layer_kinds=["relu"] * (layers - 1) + ["linear"], device="cpu")
    rng = np.random.default_rng(0)
    records = []
    for step in range(200):
        cols = {m: rng.uniform(0.5, 1.5, layers) for m in LAYER_METRICS}
        if sick:  # vanishing, half the units dead, clipping on every step, flat loss
            cols["act_grad_norm"] = np.logspace(-5, 0, layers) * rng.uniform(0.8, 1.2, layers)
        cols["dead"] = rng.uniform(0.5, 0.7, layers) if sick else rng.uniform(0.0, 0.2, layers)
        cols["saturated"] = np.full(layers, np.nan)
        cols["update_ratio"] = rng.uniform(1e-4, 1e-3, layers)
        loss = 2.3 if sick else 2.0 - step * 1e-3
        records.append(StepRecord(step=step, loss=loss, accuracy=0.5, grad_norm_total=1.0,
                                  grad_norm_clipped=1.0, clipped=sick, layers=cols,
                                  hist=np.zeros((layers, 28)), detail=step % 10 == 0))
    return header, records


def diagnosis_cost(layers: int = 30, updates: int = 5000, sick: bool = False) -> float:
    """Median CPU seconds (this thread's) per Diagnoser.update on a 30-layer record, timed in
    batches of 100. CPU time, not wall time: on a shared machine wall time counts other work."""
    header, records = _bench_records(layers, sick)
    diagnoser = Diagnoser(header)
    for r in records:  # warm up: full windows
        diagnoser.update(r)
    timings = []
    for start in range(0, updates, 100):
        t0 = time.thread_time()
        for i in range(100):
            diagnoser.update(records[(start + i) % len(records)])
        timings.append((time.thread_time() - t0) / 100)
    return float(np.median(timings))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per preset")
    parser.add_argument("--write", action="store_true", help="replace the tables in docs/DIAGNOSIS.md")
    parser.add_argument("presets", nargs="*", help="only these presets (default: all built-ins)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.presets or builtin_names()
    lines = [
        f"Measured by `benchmarks/diagnosis_table.py --steps {args.steps}` (synthetic data, fixed "
        "seeds, CPU, 1 torch thread). Ratio = first/last ‖∂L/∂h‖ (first hidden layer over the "
        "output layer; the first and last measured layers in general); per layer = its (n−1)-th root; dead = median over steps of the worst "
        "layer's fraction of ReLU units off for the whole batch; saturated = same for "
        "sigmoid/tanh units within 0.02 of an asymptote.",
        "",
        "| preset | layers | ratio at step 0 | median ratio, steps 0–4 | per layer | verdicts at step 4 "
        f"| first non-finite | clipped steps | dead | saturated | verdicts at step {args.steps - 1} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row, seconds = preset_row(name, args.steps)
        print(f"{name}: {seconds:.1f}s", file=sys.stderr, flush=True)
        lines.append(row)
    pre = [
        "",
        "| preset | pre-training steps | loss at fine-tuning step 0 | median ratio, fine-tuning "
        "steps 0–4 | ‖∂L/∂h‖ of enc1 / enc2 / enc3 / code, relative to the output | verdicts |",
        "|---|---|---|---|---|---|",
        *pretrain_rows(TRUTH_STEPS),
    ]
    healthy, sick = diagnosis_cost(), diagnosis_cost(sick=True)
    cost_line = (f"Diagnosis cost per `Diagnoser.update` on a 30-layer record: {healthy * 1e6:.0f} µs "
                 f"when healthy, {sick * 1e6:.0f} µs with four verdicts (vanishing, exploding by "
                 "clipping, dead, plateau) built on every record. CPU time of the calling thread, "
                 "median of batches of 100 updates, this machine's CPU (`benchmarks/diagnosis_table.py`).")
    table = "\n".join(lines)
    pre_table = "\n".join(pre)
    print(table)
    print(pre_table)
    print()
    print(cost_line)
    if args.write:
        text = DOC.read_text(encoding="utf-8")
        for tag, body in (("presets", table), ("pretraining", pre_table), ("cost", cost_line)):
            pattern = re.compile(rf"(<!-- {tag}:start -->\n).*?(\n<!-- {tag}:end -->)", re.S)
            if not pattern.search(text):
                raise SystemExit(f"{DOC}: no <!-- {tag}:start --> ... <!-- {tag}:end --> block")
            text = pattern.sub(lambda m: m.group(1) + body.strip("\n") + m.group(2), text)
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
