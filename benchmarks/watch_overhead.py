"""What vgtui.watch costs a user's training loop: interleaved A/B against the bare loop.

Three arms train the same architecture (each its own copy, same init, same batches): the bare
loop, ``watch()`` measuring every step (``overhead_budget=None``), and ``watch()`` as it comes
(``overhead_budget=0.02``). Rounds run a block of steps of each arm in turn, so that drift in the
machine's speed (other processes, thermal) hits every arm alike; the figure per arm is the median
over rounds of its mean step time, and the ratios are against the bare loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/watch_overhead.py --model resnet18
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/watch_overhead.py --model gpt2

The budget measures its share over windows of wall time: the default arm first trains alone
(``--settle`` steps) so that its interval settles, and each block restarts its window, so that the
other arms' blocks do not count as this arm's training time. On a shared machine the
per-round ratios scatter widely; "timed vgtui work" (the budget's own clock: the watcher's calls
and hooks, host time) is a steadier lower bound of the cost (it misses PyTorch's slower call path
for hooked modules).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vgtui
from vgtui.channel import Channel


def resnet18(batch: int):
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    model = build(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(4)]

    def loss_of(m, step):
        x, y = data[step % len(data)]
        return F.cross_entropy(m(x), y)

    return model, loss_of


def gpt2(batch: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=64)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 1000, (batch, 64), generator=g) for _ in range(4)]

    def loss_of(m, step):
        ids = data[step % len(data)]
        return m(ids, labels=ids).loss

    return model, loss_of


MODELS = {"resnet18": (resnet18, 32), "gpt2": (gpt2, 8)}


class Arm:
    def __init__(self, name: str, build, batch: int, watch_options: dict | None):
        self.name = name
        self.model, self.loss_of = build(batch)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.watcher = (vgtui.watch(self.model, optimizer=self.opt, channel=Channel(100), **watch_options)
                        if watch_options is not None else None)
        self.step = 0
        self.times: list[float] = []

    def block(self, steps: int) -> None:
        budget = getattr(self.watcher, "_budget", None)
        if budget is not None:  # the other arms' time is not this arm's training time
            budget._start, budget._steps = time.perf_counter(), 0
            budget._probe_at_start = self.watcher._clock.seconds()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.loss_of(self.model, self.step)
            loss.backward()
            if self.watcher is not None:
                self.watcher.step(self.opt, loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
        self.times.append((time.perf_counter() - start) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--settle", type=int, default=60,
                        help="steps the default arm trains alone first, so that its budget settles")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, batch = MODELS[args.model]
    arms = [Arm("bare", build, batch, None),
            Arm("every step", build, batch, dict(overhead_budget=None, diagnose=False)),
            Arm("default (2 % budget)", build, batch, dict(diagnose=False))]
    for arm in arms:
        arm.block(args.warmup)
        arm.times.clear()
    arms[2].block(args.settle)
    arms[2].times.clear()
    for _ in range(args.rounds):
        for arm in arms:
            arm.block(args.steps)
    bare = statistics.median(arms[0].times)
    print(f"{args.model} (batch {batch}), CPU, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps")
    for arm in arms:
        median = statistics.median(arm.times)
        ratios = sorted(t / b for t, b in zip(arm.times, arms[0].times))
        extra = ""
        if arm.watcher is not None:
            own = arm.watcher._clock.seconds() / arm.step  # vgtui's own timed work, per step
            extra = (f"  measured {arm.watcher.transfers} of {arm.step} steps, interval now "
                     f"{arm.watcher.sample_every}; timed vgtui work {own * 1e3:.1f} ms/step "
                     f"= {own / bare:.3f} of a bare step")
            arm.watcher.close()
        print(f"  {arm.name:22s} {median * 1e3:8.1f} ms/step  ratio {median / bare:.3f} "
              f"(per-round {ratios[0]:.3f}-{ratios[-1]:.3f}){extra}")


if __name__ == "__main__":
    main()
