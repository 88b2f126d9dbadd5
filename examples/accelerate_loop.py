"""vgtui in a loop written with accelerate: the prepared model and optimizer, as they are.

    python examples/accelerate_loop.py             # writes run.jsonl, then: vgtui replay run.jsonl
    accelerate launch examples/accelerate_loop.py  # the same on whatever accelerate is configured for

``accelerator.clip_grad_norm_`` is observed: per-layer ‖∂L/∂W‖ are read after accelerate unscales
(fp16) and before it clips; ``watcher.step`` on every micro-batch averages the loss over the
micro-batches and measures where accelerate really steps.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import vgtui.integrations.accelerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--record", default="run.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.steps * 2 * 32, 16)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    watcher = vgtui.integrations.accelerate.watch(accelerator, model, optimizer, record=args.record,
                                                  sample_every=5)
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # measured before and after
            watcher.step(optimizer, loss, accuracy=(logits.argmax(1) == targets).float().mean())
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    if accelerator.is_main_process:
        print(f"recorded {args.record}: vgtui replay {args.record}")


if __name__ == "__main__":
    main()
