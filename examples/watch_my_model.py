"""Watch your own model's gradients with vgtui, inside your own training loop.

    python examples/watch_my_model.py                 # writes run.jsonl, then: vgtui replay run.jsonl
    vgtui attach run.jsonl                            # (in another terminal, while it trains)
    torchrun --nproc_per_node=2 examples/watch_my_model.py   # the same under DDP (rank 0 records)

A small CNN with BatchNorm and a residual block, trained on synthetic images with mixed precision
(bfloat16 on CPU, float16 + GradScaler on CUDA), gradient accumulation and gradient clipping:
the places where gradient monitors usually measure the wrong thing.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import vgtui


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block = Residual(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


TEMPLATES = torch.randn(10, 1, 14, 14, generator=torch.Generator().manual_seed(1234))


def synthetic_batch(step: int, batch: int, device):
    """Noisy copies of one texture per class: learnable in a few hundred steps, no download."""
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, 10, (batch,), generator=g)
    x = TEMPLATES[y] + torch.randn(batch, 1, 14, 14, generator=g)
    return x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimiser step")
    parser.add_argument("--record", default="run.jsonl", help="where to write the recording")
    parser.add_argument("--sample-every", type=int, default=5, help="measure every N-th step")
    args = parser.parse_args()

    distributed = "LOCAL_RANK" in os.environ  # started by torchrun
    cuda = torch.cuda.is_available()
    if distributed:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = SmallCNN().to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)  # bfloat16 needs no loss scaling

    # The watcher: hooks on every module that owns weights, in forward order. Rank 0 writes the
    # file; other ranks only contribute their share of the activation statistics.
    watcher = vgtui.watch(model, record=args.record, sample_every=args.sample_every,
                          optimizer=opt, scaler=scaler)
    micro_batch = 32 // world  # the global batch is 32 x accum, whatever the number of ranks
    with watcher:
        for step in range(args.steps):
            running = torch.zeros((), device=device)
            for micro in range(args.accum):
                x, y = synthetic_batch(step * args.accum + micro, 32, device)
                x, y = x[rank * micro_batch:(rank + 1) * micro_batch], y[rank * micro_batch:(rank + 1) * micro_batch]
                with torch.autocast(device.type, dtype=amp_dtype):
                    loss = F.cross_entropy(model(x), y) / args.accum
                scaler.scale(loss).backward()  # a DDP all-reduce happens on every micro-batch here;
                running += loss.detach()  # model.no_sync() on all but the last would save it
            scaler.unscale_(opt)
            watcher.before_clip()  # per-layer ‖∂L/∂W‖ after unscaling, before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            watcher.step(opt, running)  # global norm after clipping; then the update size
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if rank == 0 and watcher.latest is not None and step % 25 == 0:
                rec = watcher.latest
                print(f"step {rec.step:4d}  loss {rec.loss:.3f}  |g| {rec.grad_norm_total:.3g}"
                      f"{'  clipped' if rec.clipped else ''}")
    if rank == 0:
        print(f"recorded {watcher.steps} steps to {args.record}: vgtui replay {args.record}")
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
