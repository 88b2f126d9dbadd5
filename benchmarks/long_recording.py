"""Write a long recording of `relu-30-he` (31 layers) without training it: 100,000 step records in
1–1.5 minutes (training them would take an hour), for the replay/export benchmarks and the
bounded-memory tests.

    .venv/bin/python benchmarks/long_recording.py /tmp/long.jsonl --records 100000
    .venv/bin/python benchmarks/long_recording.py /tmp/long.jsonl.gz --records 100000

Records are synthesised around the magnitudes a real relu-30-he run measures (‖∂L/∂W‖ ~0.5 falling
towards the output, ‖∂L/∂h‖ ~0.12, ~25 % dead units, ‖W‖ ~22.6, update ratios ~6e-5, gradient
histograms of 1,024 entries on the real bins), drifting slowly with noise on every value so that
no two lines compress alike. The detail tier comes every ``--detail-every`` sampled steps (10, the
default preset's), every record carries a step window (as every record does once steps between
samples are counted), the verdicts come from the real Diagnoser, and the lines from the real
JsonlWriter. ``--nonfinite-at`` makes the run blow up at that fraction of the way (0: never).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgtui.config import load_preset  # noqa: E402
from vgtui.diagnosis import Diagnoser  # noqa: E402
from vgtui.jsonl import JsonlWriter  # noqa: E402
from vgtui.records import ACT_PERCENTILE_METRICS, HIST_BINS, RunEvent, RunHeader, StepRecord, StepWindow  # noqa: E402

DEPTH = 30  # relu-30-he: 30 hidden ReLU layers and a linear output layer


def header(run_id: int = 1) -> RunHeader:
    preset = load_preset("relu-30-he")
    names = [f"hidden{i}" for i in range(1, DEPTH + 1)] + ["output"]
    return RunHeader(preset=preset.to_dict(), layers=names, layer_kinds=["relu"] * DEPTH + ["linear"],
                     device="cpu", run_id=run_id, params=2_111_498)


def records(count: int, *, detail_every: int = 10, nonfinite_at: float = 0.0, seed: int = 0,
            run_id: int = 1, diagnose: bool = True):
    """The header, ``count`` step records and the finishing event, as a generator."""
    rng = np.random.default_rng(seed)
    head = header(run_id)
    yield RunEvent("started", "relu-30-he on cpu", 0, run_id)
    yield head
    diagnoser = Diagnoser(head) if diagnose else None
    n = len(head.layers)
    depth = np.linspace(0.0, 1.0, n)
    wgrad_base = 0.9 - 0.6 * depth  # falls towards the output, like the real run
    agrad_base = 0.115 + 0.02 * depth
    dead_base = np.append(0.03 + 0.25 * depth[:-1], np.nan)
    hist_p = np.exp(-0.5 * ((np.arange(HIST_BINS) - 17.0) / 1.6) ** 2)
    blow_up = int(count * nonfinite_at) if nonfinite_at > 0 else None
    t = 0.0
    for step in range(count):
        drift = 1.0 + 0.3 * np.sin(step / 5000.0)
        loss = 0.3 + 2.1 * np.exp(-step / max(1.0, count / 4)) + rng.normal(0, 0.02)
        t += 0.03 + abs(rng.normal(0, 0.003))
        detail = step % detail_every == 0
        noise = lambda scale=0.1: np.exp(rng.normal(0, scale, n))  # noqa: E731
        layers = {
            "weight_grad_norm": wgrad_base * drift * noise(),
            "act_grad_norm": agrad_base * drift * noise(0.05),
            "act_mean": np.full(n, np.nan), "act_std": np.full(n, np.nan),
            "saturated": np.full(n, np.nan), "dead": np.full(n, np.nan),
            "weight_norm": np.full(n, np.nan), "update_ratio": np.full(n, np.nan),
        } | {metric: np.full(n, np.nan) for metric in ACT_PERCENTILE_METRICS}
        unmeasured = {} if detail else {metric: np.ones(n, dtype=bool) for metric in ACT_PERCENTILE_METRICS}
        hist = None
        if detail:
            layers |= {
                "act_mean": 0.2 - 0.19 * depth * noise(0.05),
                "act_std": 0.3 - 0.15 * depth * noise(0.05),
                "dead": np.clip(dead_base * noise(0.1), 0, 1),
                "weight_norm": np.append(np.full(n - 1, 22.6), 4.46) * noise(0.003),
                "update_ratio": 6e-5 * noise(0.15),
            }
            # ReLU layers: a third or more of the entries are exactly 0, then a long right tail;
            # the linear output layer: about symmetric around its mean.
            mean, std = layers["act_mean"], layers["act_std"]
            relu = np.arange(n) < DEPTH
            for metric, (relu_at, z) in zip(ACT_PERCENTILE_METRICS, ((0, -2.05), (0, -0.99), (0.5, 0.0),
                                                                     (1.8, 0.99), (3.2, 2.05))):
                layers[metric] = np.where(relu, relu_at * mean, mean + z * std) * noise(0.05)
            shift = rng.integers(-2, 3, n)
            hist = np.stack([rng.multinomial(1024, np.roll(hist_p, int(s)) / hist_p.sum()) for s in shift])
            hist = hist.astype(float)
        norm = float(np.sqrt((layers["weight_grad_norm"] ** 2).sum()))
        nonfinite = None
        step_loss = loss
        if blow_up is not None and step >= blow_up:
            layers["weight_grad_norm"][: DEPTH // 2] = np.inf if step == blow_up else np.nan
            layers["act_grad_norm"][:] = np.nan
            norm, step_loss, nonfinite = float("nan"), float("nan"), ("hidden15", "backward")
        window = StepWindow(steps=1, first_step=step, loss_min=step_loss, loss_max=step_loss,
                            loss_mean=step_loss, loss_last=step_loss, loss_max_step=step,
                            grad_norm_min=norm, grad_norm_max=norm, grad_norm_mean=norm,
                            grad_norm_last=norm, grad_norm_max_step=step)
        record = StepRecord(step=step, loss=step_loss, accuracy=float(np.clip(0.9 - loss / 3, 0, 1)),
                            grad_norm_total=norm, grad_norm_clipped=norm, clipped=False, layers=layers,
                            hist=hist, detail=detail, nonfinite=nonfinite, run_id=run_id, time=t,
                            unmeasured=unmeasured,
                            steps_per_sec=float(1 / 0.033 * rng.uniform(0.95, 1.05)), window=window)
        if diagnoser is not None:  # as the trainer does, before anyone reads the record
            record = dataclasses.replace(record, verdicts=diagnoser.update(record))
        yield record
    yield RunEvent("finished", f"{count} steps", count, run_id)


def write(path: str | Path, count: int, version: int | None = None, **options) -> int:
    """Write the recording (format ``version``, default the current one); returns its size in bytes."""
    with JsonlWriter(path, **({"version": version} if version else {})) as writer:
        writer.write_all(records(count, **options))
    return Path(path).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="FILE.jsonl, or FILE.jsonl.gz for gzip")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--detail-every", type=int, default=10)
    parser.add_argument("--nonfinite-at", type=float, default=0.9,
                        help="blow up this fraction of the way through (0: never)")
    parser.add_argument("--version", type=int, default=None, help="format version (1: as before v2)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    size = write(args.path, args.records, version=args.version, detail_every=args.detail_every,
                 nonfinite_at=args.nonfinite_at)
    seconds = time.perf_counter() - t0
    print(f"{args.path}: {args.records:,} step records, {size / 1e6:.1f} MB, "
          f"{size / args.records:,.0f} bytes/record, written in {seconds:.1f} s")


if __name__ == "__main__":
    main()
