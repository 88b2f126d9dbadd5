"""What the through-time replay of a fused nn.LSTM (vgtui/recurrent.py) costs a measured step.

A small sequence classifier (linear in, 2-layer nn.LSTM, linear head on the last step). Three
arms, each its own copy of the model (same init, same batches), interleaved in rounds of
``--block`` steps so that drift in the machine's speed hits every arm alike: the bare loop,
``watch()`` measuring every step (``overhead_budget=None``, detail tier every 10th measured step)
with the replay switched off, and the same with the replay (it runs on detail steps), and
``--detail-every 1`` to replay on every step. Figures: the median over rounds
of each arm's mean step time, ratios against the bare loop; and, steadier, the replay alone
(``total_time_grads`` on one captured call) timed against one bare training step, interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recurrent_time.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recurrent_time.py --detail-every 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recurrent_time.py --cell gru --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui.channel import Channel
from vgtui.recurrent import total_time_grads


CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Classifier(nn.Module):
    def __init__(self, inputs: int, hidden: int, layers: int, cell: str = "lstm"):
        super().__init__()
        self.embed = nn.Linear(inputs, hidden)
        self.lstm = CELLS[cell](hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0][:, -1])


def build(args):
    torch.manual_seed(0)
    model = Classifier(args.inputs, args.hidden, args.layers, args.cell)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch, args.steps, args.inputs, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(4)]
    return model, data


class Arm:
    def __init__(self, name: str, args, replay: bool | None):
        self.name = name
        self.model, self.data = build(args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.watcher = None
        if replay is not None:
            self.watcher = vgtui.watch(self.model, optimizer=self.opt, channel=Channel(10_000), diagnose=False,
                                       overhead_budget=None, detail_every=args.detail_every)
            if not replay:
                self.watcher._through_time.active = lambda: False
        self.i = 0
        self.times: list[float] = []

    def block(self, steps: int) -> None:
        began = time.perf_counter()
        for _ in range(steps):
            x, y = self.data[self.i % len(self.data)]
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if self.watcher is not None:
                self.watcher.step(self.opt, loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.i += 1
        self.times.append((time.perf_counter() - began) / steps)


def replay_alone(args, pairs: int) -> tuple[float, float]:
    """Median seconds of one bare training step and of one replay, interleaved."""
    model, data = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = data[0]
    h = model.embed(x).detach()
    out, _ = model.lstm(h)
    grad_out = torch.randn_like(out)
    bare, replay = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        total_time_grads(model.lstm, h, None, grad_out, None, None)
        t2 = time.perf_counter()
        bare.append(t1 - t0)
        replay.append(t2 - t1)
    return statistics.median(bare), statistics.median(replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="sequence length")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--detail-every", type=int, default=10)
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    args = parser.parse_args()
    print(f"{CELLS[args.cell].__name__} {args.layers}×{args.hidden}, T={args.steps}, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), detail tier every {args.detail_every}")
    arms = [Arm("bare", args, None), Arm("watch, no replay", args, False), Arm("watch + replay", args, True)]
    for arm in arms:  # warm-up
        arm.block(3)
        arm.times.clear()
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            arm.block(args.block)
    base = statistics.median(arms[0].times)
    for arm in arms:
        med = statistics.median(arm.times)
        ratios = [t / b for t, b in zip(arm.times, arms[0].times)]
        print(f"{arm.name:18s} {med * 1e3:8.2f} ms/step  ×{med / base:.3f} "
              f"(rounds {min(ratios):.2f}–{max(ratios):.2f})")
    for arm in arms:
        if arm.watcher is not None:
            arm.watcher.close()
    step, replay = replay_alone(args, args.pairs)
    print(f"replay alone: {replay * 1e3:.2f} ms per measured step = {replay / step:.2f}× a bare step "
          f"({step * 1e3:.2f} ms), interleaved, medians of {args.pairs}")


if __name__ == "__main__":
    main()
