"""vgtui.watch under real multi-process DDP: `torchrun --nproc_per_node=2`, gloo, CPU.

The claim under test: rank 0 records what a single process would record training on the
combined batch (weight gradients after DDP's all-reduce, ‖∂L/∂h‖ and activation statistics pooled
over ranks and micro-batches), rank 1 records nothing and copies nothing to the host, and the
per-rank mode writes one file per rank. One torchrun launch runs both modes (~20 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vgtui.jsonl import LAYER_DIGITS, read_recording
from tests.torchrun import run_two_ranks
from vgtui.records import StepRecord

# The worker: one file, imported by the test as well, so the model, the data and the loop that
# the two ranks run are the very ones the single-process reference runs.
WORKER = r'''
import json, os, sys
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS, ACCUM, MICRO, CLIP = 3, 2, 8, 0.3  # MICRO: examples per micro-batch, all ranks together


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Net(nn.Module):  # no BatchNorm: per-rank batch statistics would differ from the combined batch
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.block(F.relu(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def make_model():
    torch.manual_seed(1234)
    return Net()


def batch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(MICRO, 1, 6, 6, generator=g), torch.randint(0, 3, (MICRO,), generator=g)


def train(model, watcher, rank=0, world=1):
    """The user's loop: accumulation over ACCUM micro-batches (under DDP without the all-reduce on
    all but the last, as usual), their own clipping, SGD with momentum."""
    import contextlib
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    share = MICRO // world
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUM):
            x, y = batch(step, micro)
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            quiet = model.no_sync() if hasattr(model, "no_sync") and micro < ACCUM - 1 else contextlib.nullcontext()
            with quiet:
                loss = F.cross_entropy(model(x), y) / ACCUM
                loss.backward()
            total = total + loss.detach()
        watcher.before_clip()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        watcher.step(opt, total)
        opt.step()
        opt.zero_grad()
    watcher.close()


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def main(out):
    import torch.distributed as dist
    import vgtui
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {"rank": rank}
    for mode, per_rank in (("rank0", False), ("per_rank", True), ("group", False)):
        inner = make_model()
        ddp = nn.parallel.DistributedDataParallel(inner)
        before = hook_count(inner)
        # "group": the inner module and its process group, as Lightning's DDP strategy hands it
        watched, group = (inner, dist.group.WORLD) if mode == "group" else (ddp, None)
        watcher = vgtui.watch(watched, record=Path(out) / f"{mode}.jsonl", per_rank=per_rank, diagnose=False,
                              process_group=group)
        train(ddp, watcher, rank, world)
        result[mode] = {"transfers": watcher.transfers, "latest": watcher.latest is not None,
                        "hooks_left": hook_count(inner) - before, "writes": watcher.writes}
    (Path(out) / f"result{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
'''


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    worker = run_two_ranks(WORKER, out, "vgtui_ddp_worker")
    return out, worker


def _steps(path: Path) -> list[StepRecord]:
    result = read_recording(path)
    assert result.problems == []
    return [r for r in result.records if isinstance(r, StepRecord)]


def _single_process(module, path: Path) -> list[StepRecord]:
    import vgtui

    model = module.make_model()
    watcher = vgtui.watch(model, record=path, diagnose=False)
    module.train(model, watcher)
    return _steps(path)


def _close(a, b, what, rtol=1e-5):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.allclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True), f"{what}: {a} != {b}"


#: A recording keeps LAYER_DIGITS significant digits of each per-layer value: half a unit of the last.
RECORDED = 0.5 * 10.0 ** (1 - LAYER_DIGITS) + 1e-5


COMPARED = ("weight_grad_norm", "act_grad_norm", "act_mean", "act_std", "weight_norm", "update_ratio")


def test_rank0_records_the_combined_batch(ddp_run, tmp_path):
    out, module = ddp_run
    ddp_steps = _steps(out / "rank0.jsonl")
    single = _single_process(module, tmp_path / "single.jsonl")
    assert [r.step for r in ddp_steps] == [r.step for r in single] == list(range(module.STEPS))
    for d, s in zip(ddp_steps, single):
        for metric in COMPARED:
            _close(d.layers[metric], s.layers[metric], f"step {d.step} {metric}")
        _close([d.loss, d.grad_norm_total, d.grad_norm_clipped], [s.loss, s.grad_norm_total, s.grad_norm_clipped],
               f"step {d.step} scalars")
        assert d.clipped == s.clipped
        assert np.isfinite(d.layers["act_grad_norm"]).all()
    assert any(r.clipped for r in ddp_steps)  # the user's clip_grad_norm_ acted and was seen


def test_rank0_matches_plain_autograd_on_the_combined_batch(ddp_run):
    """Step 0, independently: per-layer ‖∂L/∂W‖ and sqrt(Σ_micro ‖∂L/∂h‖²) by torch.autograd.grad."""
    out, module = ddp_run
    record = _steps(out / "rank0.jsonl")[0]
    model = module.make_model()
    names = ["stem", "block.conv1", "block.conv2", "head"]
    mods = [model.get_submodule(n) for n in names]
    h_sq = np.zeros(len(names))
    owned = [list(m.parameters()) for m in mods]  # ‖∂L/∂W‖ covers the module's weight and bias
    flat = [p for params in owned for p in params]
    w_grad = [torch.zeros_like(p) for p in flat]
    for micro in range(module.ACCUM):
        outs = {}
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, m in zip(names, mods)]
        x, y = module.batch(0, micro)
        loss = torch.nn.functional.cross_entropy(model(x), y) / module.ACCUM
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[n] for n in names] + flat)
        h_sq += np.array([float(g.double().norm()) ** 2 for g in grads[: len(names)]])
        for acc, g in zip(w_grad, grads[len(names):]):
            acc += g
    assert record.layers["act_grad_norm"].shape == (4,)
    _close(record.layers["act_grad_norm"], np.sqrt(h_sq), "‖∂L/∂h‖", rtol=RECORDED)
    per_param = iter(float(g.norm()) ** 2 for g in w_grad)
    _close(record.layers["weight_grad_norm"], [np.sqrt(sum(next(per_param) for _ in params)) for params in owned],
           "‖∂L/∂W‖", rtol=RECORDED)


def test_a_module_not_ddp_wrapped_reduces_over_the_given_process_group(ddp_run):
    """watch(inner, process_group=...) records what watch(ddp) records: the combined batch."""
    out, _ = ddp_run
    wrapped, grouped = _steps(out / "rank0.jsonl"), _steps(out / "group.jsonl")
    assert len(grouped) == len(wrapped) == 3
    for g, w in zip(grouped, wrapped):
        for metric in COMPARED:
            _close(g.layers[metric], w.layers[metric], f"step {g.step} {metric}")
        _close([g.loss, g.grad_norm_total], [w.loss, w.grad_norm_total], f"step {g.step} scalars")
    rank1 = json.loads((out / "result1.json").read_text())
    assert rank1["group"] == {"transfers": 0, "latest": False, "hooks_left": 0, "writes": False}


def test_other_ranks_neither_copy_nor_write(ddp_run):
    out, _ = ddp_run
    rank0 = json.loads((out / "result0.json").read_text())
    rank1 = json.loads((out / "result1.json").read_text())
    assert rank0["rank0"] == {"transfers": 3, "latest": True, "hooks_left": 0, "writes": True}
    assert rank1["rank0"] == {"transfers": 0, "latest": False, "hooks_left": 0, "writes": False}
    assert not (out / "rank0.rank1.jsonl").exists()
    assert sorted(p.name for p in out.glob("rank0*.jsonl")) == ["rank0.jsonl"]


def test_per_rank_mode_writes_a_file_per_rank(ddp_run):
    out, _ = ddp_run
    r0, r1 = _steps(out / "per_rank.rank0.jsonl"), _steps(out / "per_rank.rank1.jsonl")
    assert len(r0) == len(r1) == 3
    for a, b in zip(r0, r1):
        # Weight gradients are DDP's all-reduced ones: the same on every rank.
        _close(a.layers["weight_grad_norm"], b.layers["weight_grad_norm"], "all-reduced ‖∂L/∂W‖")
        # Activations are each rank's own half of the batch: they differ.
        assert not np.allclose(a.layers["act_mean"], b.layers["act_mean"])
    # Each rank's local ‖∂L_r/∂h_r‖ pools to rank 0's global one: sqrt(a² + b²) / world.
    combined = _steps(out / "rank0.jsonl")[0].layers["act_grad_norm"]
    local0, local1 = r0[0].layers["act_grad_norm"], r1[0].layers["act_grad_norm"]
    _close(np.sqrt(local0**2 + local1**2) / 2, combined, "pooled local ‖∂L/∂h‖", rtol=2 * RECORDED)
    header = read_recording(out / "per_rank.rank1.jsonl").records[0]
    assert header.preset["rank"] == 1 and header.preset["world_size"] == 2
    assert math.isfinite(r1[0].loss)
