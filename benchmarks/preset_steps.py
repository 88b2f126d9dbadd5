"""Step time of the sequence and convolution presets on the CPU: bare vs measured every step.

    .venv/bin/python benchmarks/preset_steps.py [--threads 2] [--pairs 40] [NAME ...]

For each preset a bare training step (forward, backward, clipping, optimiser) and a step measured
by the probe as the Trainer does it (taps, one autograd.grad, every layer's norms) take turns, one
step at a time, the order swapped every pair, so both see the same machine load. Prints the median
milliseconds per step of each and the median per-pair ratio, as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vgtui.config import load_preset  # noqa: E402
from vgtui.data import make_data  # noqa: E402
from vgtui.models import build_model, make_optimizer  # noqa: E402
from vgtui.probe import Probe  # noqa: E402

PRESETS = ["rnn-tanh", "lstm", "gru", "rnn-orthogonal", "rnn-exploding", "rnn-clipped",
           "cnn-plain", "cnn-residual", "cnn-sigmoid", "sigmoid-deep"]


def make_step(preset, probed: bool):
    built = build_model(preset)
    model = built.model
    optimizer = make_optimizer(model.parameters(), preset)
    data = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len)
    batches = [data.batch(i) for i in range(8)]
    probe = Probe(built.layers, list(model.parameters()), owns_backward=True) if probed else None
    state = {"step": 0}

    def step() -> float:
        x, y = batches[state["step"] % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if probe is None:
            loss = built.loss_fn(model(x), y)
            loss.backward()
            if preset.clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip_threshold, foreach=True)
        else:
            probe.begin(True)
            out = probe.forward(model, x)
            loss = built.loss_fn(out, y)
            probe.backward(loss)
            probe.after_backward()
            probe.clip(preset.clip, preset.clip_threshold)
            probe.before_step(optimizer)
        optimizer.step()
        if probe is not None:
            probe.finish(state["step"], loss, (out.detach().argmax(1) == y).float().mean(), optimizer)
            probe.poll(wait=True)
        state["step"] += 1
        return time.perf_counter() - start

    return step


def measure(name: str, pairs: int) -> tuple[float, float, float]:
    preset = load_preset(name)
    bare, probed = make_step(preset, False), make_step(preset, True)
    for _ in range(3):
        bare(), probed()
    ratios, bare_ms, probed_ms = [], [], []
    for r in range(pairs):
        if r % 2 == 0:
            b, p = bare(), probed()
        else:
            p, b = probed(), bare()
        ratios.append(p / b)
        bare_ms.append(b * 1e3)
        probed_ms.append(p * 1e3)
    return statistics.median(bare_ms), statistics.median(probed_ms), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("names", nargs="*", default=PRESETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.pairs} interleaved pairs")
    print("| preset | bare step, ms (median) | measured every step, ms (median) | ratio (median) |")
    print("|---|---|---|---|")
    for name in args.names:
        bare, probed, ratio = measure(name, args.pairs)
        print(f"| `{name}` | {bare:.1f} | {probed:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
