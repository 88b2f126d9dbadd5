"""The cost of the activation percentiles on a detail step (CPU, one thread): the engine's strided
samples and batched sort for every layer, beside the mean/std/saturation pass it rides with.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/activation_percentiles.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgtui.engine import Percentiles, strided_sample  # noqa: E402

SHAPES = ((6, (100, 1000)), (31, (128, 1000)), (148, (8, 32, 128)))  # sigmoid-deep, relu-30, a GPT-2


def main(rounds: int = 30) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for n_layers, shape in SHAPES:
        acts = [torch.rand(*shape) for _ in range(n_layers)]
        percentiles = Percentiles()
        percentiles([strided_sample(a) for a in acts])  # the plan, once per shape
        pct, stats = [], []
        for _ in range(rounds):  # interleaved
            t = time.perf_counter()
            percentiles([strided_sample(a) for a in acts])
            pct.append(time.perf_counter() - t)
            t = time.perf_counter()
            for a in acts:
                flat = a.reshape(-1)
                flat.mean(), torch.linalg.vector_norm(flat), ((a - 0.5).abs() > 0.48).float().mean()
            stats.append(time.perf_counter() - t)
        print(f"{n_layers} layers of {shape}: percentiles {statistics.median(pct) * 1e3:.2f} ms, "
              f"mean/std/saturation {statistics.median(stats) * 1e3:.2f} ms (medians of {rounds})")


if __name__ == "__main__":
    main()
