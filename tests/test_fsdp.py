"""vgtui.distributed under real FSDP2: `torchrun --nproc_per_node=2`, gloo, CPU.

The claim under test: from each rank's local shards and ONE all_reduce (no full_tensor(), no
all_gather), every rank gets the norms of the unsharded gradients and weights, and the summed
activation-gradient squares give ‖∂L/∂h‖ of the combined batch: equal to a single process
training the same model on the combined batch. Uneven shards (7 and 3 rows over 2 ranks),
Replicate placements, plain replicated tensors and the refusal of Partial placements included.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.torchrun import run_two_ranks

WORKER = r'''
import json, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STEPS, RANKS, MICRO, LR = 3, 2, 4, 0.5  # MICRO: examples per rank and step
LAYERS = (0, 2, 4)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(RANKS * MICRO, 5, generator=g) * 2, torch.randint(0, 3, (RANKS * MICRO,), generator=g)


def act_grad_hooks(model, sums):
    """The test's own hooks: Σ‖∂L/∂h‖² of each layer's output (plain tensors under FSDP2)."""
    def hook(i):
        def forward(module, inputs, output):
            output.register_hook(lambda g: sums.__setitem__(i, sums[i] + g.double().square().sum()))
        return forward
    return [model[j].register_forward_hook(hook(i)) for i, j in enumerate(LAYERS)]


def main(out):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor, init_device_mesh

    from vgtui import distributed as vd

    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    kinds = [vd.sharding_kind(model)]
    for j in LAYERS:
        fully_shard(model[j])
    fully_shard(model)
    kinds.append(vd.sharding_kind(model))
    tp = parallelize_module(make_model(), init_device_mesh("cpu", (RANKS,)), {"2": RowwiseParallel()})
    kinds.append(vd.sharding_kind(tp))
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    results = []
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(rank * MICRO, (rank + 1) * MICRO)
        sums = [torch.zeros((), dtype=torch.float64) for _ in LAYERS]
        handles = act_grad_hooks(model, sums)
        F.cross_entropy(model(x[mine]), y[mine]).backward()  # FSDP2 averages gradients over ranks
        for h in handles:
            h.remove()

        # The measurement, with every gather forbidden and the all_reduces counted.
        calls = {"all_reduce": 0}
        real_all_reduce = dist.all_reduce

        def counting(*a, **k):
            calls["all_reduce"] += 1
            return real_all_reduce(*a, **k)

        def forbidden(*a, **k):
            raise AssertionError("gathered a sharded tensor")

        saved = (dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor, DTensor.full_tensor, DTensor.redistribute)
        dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor = counting, forbidden, forbidden
        DTensor.full_tensor = DTensor.redistribute = forbidden
        try:
            grad_sq, weight_sq, act_sq = vd.reduce_sum([
                vd.local_sq_norms([p.grad for p in params]),
                vd.local_sq_norms(params),
                torch.stack(sums),
            ])
        finally:
            dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor, DTensor.full_tensor, DTensor.redistribute = saved
        assert calls["all_reduce"] == 1, calls
        results.append({
            "grad_sq": grad_sq.tolist(), "weight_sq": weight_sq.tolist(),
            # DDP-style averaging: ∂(mean of the rank losses)/∂h_r = ∂L_r/∂h_r / RANKS
            "act_grad_norm": (act_sq.sqrt() / RANKS).tolist(),
            "local_numel": [p.grad.to_local().numel() for p in params],
        })
        opt.step()
        opt.zero_grad()

    # Placements other than Shard: counted once, or refused.
    mesh = init_device_mesh("cpu", (RANKS,))
    full = torch.arange(12.0).reshape(4, 3)
    replicated = distribute_tensor(full, mesh, [Replicate()])
    extra = vd.sharded_sq_norms([replicated, full.clone(), None])  # DTensor copy, plain copy, nothing
    try:
        vd.sharded_sq_norms([DTensor.from_local(full, mesh, [Partial()])])
        partial = "accepted"
    except ValueError as exc:
        partial = str(exc)
    if rank == 0:
        with open(f"{out}/fsdp.json", "w") as f:
            json.dump({"steps": results, "extra": extra.tolist(), "partial": partial, "kinds": kinds}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
'''


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    worker = run_two_ranks(WORKER, out, "vgtui_fsdp_worker")
    return json.loads((out / "fsdp.json").read_text()), worker


def single_process(worker):
    """The same model trained by one process on the combined batch, measured with plain autograd."""
    model = worker.make_model()
    params = list(model.parameters())
    steps = []
    for step in range(worker.STEPS):
        x, y = worker.batch(step)
        outputs = []
        handles = [model[j].register_forward_hook(lambda m, i, o: outputs.append(o)) for j in worker.LAYERS]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, params + outputs)
        steps.append({
            "grad_sq": [g.double().square().sum().item() for g in grads[:len(params)]],
            "weight_sq": [p.detach().double().square().sum().item() for p in params],
            "act_grad_norm": [g.double().norm().item() for g in grads[len(params):]],
        })
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= worker.LR * g
    return steps


def test_fsdp2_norms_equal_the_unsharded_model_on_the_combined_batch(fsdp_run):
    results, worker = fsdp_run
    expected = single_process(worker)
    for got, want in zip(results["steps"], expected, strict=True):
        for key in ("grad_sq", "weight_sq", "act_grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    numel = results["steps"][0]["local_numel"]
    assert numel[0] == 4 * 5 and numel[2] == 3 * 7 and numel[4] == 2 * 6  # rank 0's uneven shards


def test_replicated_pieces_count_once_and_partial_is_refused(fsdp_run):
    results, _ = fsdp_run
    full_sq = float((torch.arange(12.0) ** 2).sum())
    assert results["extra"] == pytest.approx([full_sq, full_sq, 0.0], rel=1e-6)
    assert "partial sums" in results["partial"]


def test_tensor_parallelism_is_told_apart_from_fsdp(fsdp_run):
    results, _ = fsdp_run
    assert results["kinds"] == ["none", "fsdp", "tensor_parallel"]  # plain, fully_shard, RowwiseParallel


# -- vgtui.watch on an FSDP2 model ------------------------------------------------------------------
WATCH_WORKER = r'''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STEPS, RANKS, MICRO, LR, CLIP = 4, 2, 6, 0.3, 0.8  # MICRO: examples per rank and step
LAYERS = ["0.fc", "0.norm", "1.fc", "1.norm", "2"]


class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.fc = nn.Linear(i, o)
        self.norm = nn.LayerNorm(o)  # per example: no batch statistics to differ between ranks

    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x)))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(Block(5, 7), Block(7, 6), nn.Linear(6, 3))  # 7 rows over 2 ranks: 4 and 3


def batch(step):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(RANKS * MICRO, 5, generator=g) * (1 + step)  # later steps clip
    return x, torch.randint(0, 3, (RANKS * MICRO,), generator=g)


def make_optimizer(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)  # update from the momentum buffers
    return torch.optim.Adam(model.parameters(), lr=0.05)  # update from a copy of the weights


def train(model, watcher, opt, rank=0, world=1, guard=None, own_clip=False):
    """The user's loop; ``guard`` wraps every call into vgtui (and the optimiser step, whose hook
    finalises the measured step). ``own_clip``: the watcher's clip_grad_norm_ instead of torch's."""
    import contextlib
    guard = guard or contextlib.nullcontext
    share = RANKS * MICRO // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(x), y)  # FSDP2 averages the gradients over ranks
        loss.backward()
        if own_clip:
            watcher.clip_grad_norm_(CLIP)
        else:
            with guard():
                watcher.before_clip()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        with guard():
            watcher.step(opt, loss.detach())
            opt.step()
        opt.zero_grad()
    with guard():
        watcher.close()


def main(out):
    import contextlib
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import vgtui

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    calls = {"all_reduce": 0, "reduce": 0}
    real = {"all_reduce": dist.all_reduce, "reduce": dist.reduce}

    def counting(name):
        def call(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return call

    def forbidden(*a, **k):
        raise AssertionError("vgtui gathered a sharded tensor")

    @contextlib.contextmanager
    def guard():
        saved = (dist.all_reduce, dist.reduce, dist.all_gather, dist.all_gather_into_tensor, dist.broadcast,
                 DTensor.full_tensor, DTensor.redistribute)
        dist.all_reduce, dist.reduce = counting("all_reduce"), counting("reduce")
        dist.all_gather = dist.all_gather_into_tensor = dist.broadcast = forbidden
        DTensor.full_tensor = DTensor.redistribute = forbidden
        try:
            yield
        finally:
            (dist.all_reduce, dist.reduce, dist.all_gather, dist.all_gather_into_tensor, dist.broadcast,
             DTensor.full_tensor, DTensor.redistribute) = saved

    def sharded():
        model = make_model()
        fully_shard(model[0])
        fully_shard(model[1])
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        return model

    model = sharded()
    watcher = vgtui.watch(model, record=Path(out) / "fsdp_watch.jsonl", diagnose=False, detail_every=2,
                          overhead_budget=None)
    train(model, watcher, make_optimizer(model, "sgd"), rank, world, guard)
    result = {"rank": rank, "calls": dict(calls), "transfers": watcher.transfers, "writes": watcher.writes,
              "latest": watcher.latest is not None, "sharding": watcher.sharding}
    # Adam (update sizes from a copy of the local shards) and the watcher's own clip_grad_norm_.
    model = sharded()
    watcher = vgtui.watch(model, record=Path(out) / "fsdp_adam.jsonl", diagnose=False, detail_every=1)
    train(model, watcher, make_optimizer(model, "adam"), rank, world, guard, own_clip=True)

    # Tensor parallelism: refused at watch(), with one line.
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    tp = parallelize_module(make_model(), init_device_mesh("cpu", (RANKS,)), {"2": RowwiseParallel()})
    try:
        vgtui.watch(tp)
        result["tensor_parallel"] = "accepted"
    except ValueError as exc:
        result["tensor_parallel"] = str(exc)
    (Path(out) / f"watch{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
'''


@pytest.fixture(scope="module")
def fsdp_watch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_watch")
    module = run_two_ranks(WATCH_WORKER, out, "vgtui_fsdp_watch_worker")
    return out, module


def _recorded(path):
    from vgtui.jsonl import read_recording
    from vgtui.records import RunHeader, StepRecord

    result = read_recording(path)
    assert result.problems == []
    header = next(r for r in result.records if isinstance(r, RunHeader))
    return header, [r for r in result.records if isinstance(r, StepRecord)]


def _reference(worker, optimizer="sgd"):
    """The unsharded model trained by one process on the combined batch, measured with plain
    autograd: per-layer ‖∂L/∂W‖ over each layer's parameters before clipping, ‖∂L/∂h‖, the global
    norm before and after clipping, and on detail steps ‖W‖ after the step and ‖ΔW‖/‖W‖."""
    model = worker.make_model()
    mods = [model.get_submodule(name) for name in worker.LAYERS]
    owned = [list(m.parameters()) for m in mods]
    opt = worker.make_optimizer(model, optimizer)
    steps = []
    for step in range(worker.STEPS):
        x, y = worker.batch(step)
        outs = {}
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, m in zip(worker.LAYERS, mods)]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        flat = [p for params in owned for p in params]
        grads = torch.autograd.grad(loss, [outs[n] for n in worker.LAYERS] + flat)
        act = [float(g.double().norm()) for g in grads[:len(mods)]]
        hs = [outs[n].detach().double() for n in worker.LAYERS]
        it = iter(grads[len(mods):])
        per_layer = [[next(it) for _ in params] for params in owned]
        wgrad = [float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in gs]))) for gs in per_layer]
        total = float(np.sqrt(sum(w ** 2 for w in wgrad)))
        for p, g in zip(flat, grads[len(mods):]):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), worker.CLIP)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in flat])))
        before = [[p.detach().clone() for p in params] for params in owned]
        opt.step()
        opt.zero_grad()
        wnorm = [float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in params]))) for params in owned]
        moved = [float(torch.linalg.vector_norm(torch.stack([(p.detach() - b).norm() for p, b in zip(params, bs)])))
                 for params, bs in zip(owned, before)]
        steps.append({"loss": loss.item(), "wgrad": wgrad, "act": act, "total": total, "after": after,
                      "act_mean": [float(h.mean()) for h in hs], "act_std": [float(h.std()) for h in hs],
                      "weight_norm": wnorm, "update_ratio": [m / w for m, w in zip(moved, wnorm)]})
    return steps


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fsdp2_watch_records_the_unsharded_model_on_the_combined_batch(fsdp_watch_run, optimizer):
    """SGD with momentum and torch's clip, measured on every other step; Adam and the watcher's own
    clip_grad_norm_, every step in detail."""
    from tests.test_ddp import RECORDED

    out, worker = fsdp_watch_run
    header, steps = _recorded(out / ("fsdp_watch.jsonl" if optimizer == "sgd" else "fsdp_adam.jsonl"))
    assert header.layers == worker.LAYERS and header.preset["sharding"] == "fsdp"
    assert header.params == sum(p.numel() for p in worker.make_model().parameters())
    expected = _reference(worker, optimizer)
    every = 2 if optimizer == "sgd" else 1
    assert [r.step for r in steps] == list(range(worker.STEPS))
    for record, want in zip(steps, expected):
        what = f"step {record.step}"
        np.testing.assert_allclose(record.layers["weight_grad_norm"], want["wgrad"], rtol=RECORDED, err_msg=what)
        np.testing.assert_allclose(record.layers["act_grad_norm"], want["act"], rtol=RECORDED, err_msg=what)
        assert record.grad_norm_total == pytest.approx(want["total"], rel=1e-5)
        assert record.grad_norm_clipped == pytest.approx(want["after"], rel=1e-5)
        assert record.clipped == (want["total"] > worker.CLIP)
        assert record.loss == pytest.approx(want["loss"], rel=1e-5)  # the mean of the ranks' losses
        if record.step % every == 0:  # detail steps: ‖W‖ and the update ratio
            np.testing.assert_allclose(record.layers["weight_norm"], want["weight_norm"], rtol=RECORDED, err_msg=what)
            np.testing.assert_allclose(record.layers["update_ratio"], want["update_ratio"], rtol=2 * RECORDED,
                                       err_msg=what)
            # activation statistics pooled over both ranks' halves of the batch
            np.testing.assert_allclose(record.layers["act_mean"], want["act_mean"], rtol=RECORDED, atol=1e-6,
                                       err_msg=what)
            np.testing.assert_allclose(record.layers["act_std"], want["act_std"], rtol=RECORDED, err_msg=what)
            assert record.hist is not None and record.hist.sum(axis=1).tolist() == [
                float(p.numel()) for p in (worker.make_model().get_submodule(n).weight for n in worker.LAYERS)]
        else:
            assert not record.measured("weight_norm").any()
    assert any(r.clipped for r in steps) and not all(r.clipped for r in steps)


def test_fsdp2_watch_one_all_reduce_per_measured_step_no_gather_and_rank0_alone_copies(fsdp_watch_run):
    out, worker = fsdp_watch_run
    rank0 = json.loads((out / "watch0.json").read_text())
    rank1 = json.loads((out / "watch1.json").read_text())
    for result in (rank0, rank1):  # gathers raised inside every vgtui call: none happened
        assert result["calls"] == {"all_reduce": worker.STEPS, "reduce": 0}
        assert result["sharding"] == "fsdp"
    assert (rank0["transfers"], rank0["writes"], rank0["latest"]) == (worker.STEPS, True, True)
    assert (rank1["transfers"], rank1["writes"], rank1["latest"]) == (0, False, False)
    assert not list(out.glob("*.rank1.jsonl"))


def test_tensor_parallel_is_refused_at_watch(fsdp_watch_run):
    out, _ = fsdp_watch_run
    message = json.loads((out / "watch0.json").read_text())["tensor_parallel"]
    assert "tensor parallelism" in message and "\n" not in message
