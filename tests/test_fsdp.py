"""vgtui.distributed under real FSDP2: `torchrun --nproc_per_node=2`, gloo, CPU.

The claim under test: from each rank's local shards and ONE all_reduce (no full_tensor(), no
all_gather), every rank gets the norms of the unsharded gradients and weights, and the summed
activation-gradient squares give ‖∂L/∂h‖ of the combined batch: equal to a single process
training the same model on the combined batch. Uneven shards (7 and 3 rows over 2 ranks),
Replicate placements, plain replicated tensors and the refusal of Partial placements included.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _load_worker(path: Path):
    spec = importlib.util.spec_from_file_location("vgtui_fsdp_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    out = tmp_path_factory.mktemp("fsdp")
    worker = out / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    if sys.platform.startswith("linux"):  # containers often resolve the host name to no usable interface
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = _torchrun() + ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                         f"--master_port={_free_port()}", str(worker), str(out)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "fsdp.json").read_text()), _load_worker(worker)


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
