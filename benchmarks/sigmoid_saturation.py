"""Does the `sigmoid-deep` preset show Glorot & Bengio's picture: the top hidden sigmoid layer's
activations driven toward 0 early in training? Trains the preset (its own data unless --data)
and prints, on every detail step, each layer's activation median and p2/p98 (the percentiles the
engine records) and the layer's saturated share.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sigmoid_saturation.py --steps 600 [--data fashion-mnist]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vgtui.config import load_preset  # noqa: E402
from vgtui.records import RunHeader, StepRecord  # noqa: E402
from vgtui.trainer import run_to_completion  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sigmoid-deep")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--data", default=None, help="synthetic, fashion-mnist (default: the preset's)")
    parser.add_argument("--every", type=int, default=5, help="print every Nth detail step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = load_preset(args.preset)
    if args.data:
        preset = preset.replace(data=args.data)
    records = run_to_completion(preset, args.steps, run_id=1)
    header = next(r for r in records if isinstance(r, RunHeader))
    detail = [r for r in records if isinstance(r, StepRecord) and r.measured("act_p50").any()]
    print(f"{preset.name} · data {preset.data} · {args.steps} steps · median [p2, p98] sat%")
    print("step   loss  " + "  ".join(f"{n:>22}" for n in header.layers))
    for r in detail[:: args.every] + ([detail[-1]] if (len(detail) - 1) % args.every else []):
        cells = []
        for i in range(len(header.layers)):
            lo, mid, hi = (float(r.layers[m][i]) for m in ("act_p02", "act_p50", "act_p98"))
            sat = float(r.layers["saturated"][i])
            cells.append(f"{mid:5.3f} [{lo:5.3f},{hi:5.3f}] {100 * sat:3.0f}")
        print(f"{r.step:>5} {r.loss:6.3f}  " + "  ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
