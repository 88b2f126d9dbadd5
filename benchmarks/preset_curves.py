"""What the sequence and convolution presets do in training: the numbers behind docs/DIAGNOSIS.md.

    .venv/bin/python benchmarks/preset_curves.py [--steps 1500] [--every 500] [--data D] [NAME ...]

Trains each preset as the Trainer does (its own optimiser, clipping and batches) and at step 0
and every ``--every`` steps prints: the first/last ratio of ‖∂L/∂h‖ (recurrent presets: of the
first recurrent layer through time, ‖∂L/∂h_0‖ / ‖∂L/∂h_T-1‖; conv presets: first conv over the
output layer) on training batch 0 by autograd, the mean training loss and accuracy of the steps
since the previous line, and loss and accuracy on 10 held-out batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vgtui.config import load_preset  # noqa: E402
from vgtui.data import heldout_batches, make_data  # noqa: E402
from vgtui.models import build_model, make_optimizer  # noqa: E402

PRESETS = ["rnn-tanh", "lstm", "gru", "rnn-orthogonal", "rnn-exploding", "rnn-clipped",
           "cnn-plain", "cnn-residual", "cnn-sigmoid"]


def gradient_ratio(built, preset, x, y) -> float:
    taps = []
    loss = built.loss_fn(built.model(x, taps=taps), y)
    if preset.network == "rnn":
        grad, = torch.autograd.grad(loss, taps[0][1])
        per_step = grad.norm(dim=(0, 2))
        return float(per_step[0] / per_step[-1])
    first, last = torch.autograd.grad(loss, [taps[0][1], taps[-1][1]])
    return float(first.norm() / last.norm())


@torch.no_grad()
def evaluate(built, batches) -> tuple[float, float]:
    built.model.eval()
    losses, hits, count = 0.0, 0.0, 0
    for x, y in batches:
        out = built.model(x)
        losses += float(built.loss_fn(out, y)) * len(y)
        hits += float((out.argmax(1) == y).sum())
        count += len(y)
    built.model.train()
    return losses / count, hits / count


def curve(name: str, steps: int, every: int, data_name: str | None = None) -> None:
    preset = load_preset(name)
    if data_name:
        preset = preset.replace(data=data_name)
    built = build_model(preset)
    optimizer = make_optimizer(built.model.parameters(), preset)
    data = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len)
    held = heldout_batches(preset, 10)
    probe_batch = data.batch(0)
    losses, hits = [], []
    for step in range(steps + 1):
        if step % every == 0:
            train = (sum(losses) / len(losses), sum(hits) / len(hits)) if losses else (float("nan"),) * 2
            held_loss, held_acc = evaluate(built, held)
            print(f"| `{name}` | {step} | {gradient_ratio(built, preset, *probe_batch):.3g} | {train[0]:.3f} | "
                  f"{train[1]:.3f} | {held_loss:.3f} | {held_acc:.3f} |", flush=True)
            losses, hits = [], []
        if step == steps:
            break
        x, y = data.batch(step)
        optimizer.zero_grad(set_to_none=True)
        out = built.model(x)
        loss = built.loss_fn(out, y)
        loss.backward()
        if preset.clip == "norm":
            torch.nn.utils.clip_grad_norm_(built.model.parameters(), preset.clip_threshold)
        elif preset.clip == "value":
            torch.nn.utils.clip_grad_value_(built.model.parameters(), preset.clip_threshold)
        optimizer.step()
        losses.append(float(loss.detach()))
        hits.append(float((out.argmax(1) == y).float().mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None, help="data set in place of the presets' own")
    parser.add_argument("names", nargs="*", default=PRESETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| preset | step | first/last ‖∂L/∂h‖ | train loss | train acc | held-out loss | held-out acc |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        curve(name, args.steps, args.every, args.data)


if __name__ == "__main__":
    main()
