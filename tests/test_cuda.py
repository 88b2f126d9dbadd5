"""The CUDA path: same numbers as the CPU and autograd, and the training loop never waits on the
monitor (no device synchronisation from the probe). Skipped where there is no GPU; run by hand on
one with ``pytest tests/test_cuda.py`` (docs/BENCHMARKS.md says when it last ran)."""

import math

import numpy as np
import pytest
import torch

from test_probe import reference_norms, small
from vgtui.models import build_model, make_optimizer
from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.probe import HIST_MAX_ELEMENTS, Probe
from vgtui.records import StepRecord
from vgtui.trainer import run_to_completion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """Matmuls in full float32 (TF32 would differ from the CPU reference by ~1e-3)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def probe_steps(preset, steps, *, detail_every=1, sync_check_after=None):
    """Train ``steps`` steps on the GPU with the probe on every step; from step
    ``sync_check_after`` on, any synchronising CUDA call raises, except inside the optimiser's
    own step (not ours to answer for)."""
    built = build_model(preset, CUDA)
    model = built.model
    probe = Probe(built.layers, list(model.parameters()), detail_every=detail_every).attach()
    optimizer = make_optimizer(model.parameters(), preset)
    data = SyntheticData(preset.seed, preset.batch_size, CUDA)
    batches = [data.batch(i) for i in range(steps)]
    torch.cuda.synchronize()
    checking = lambda on: torch.cuda.set_sync_debug_mode("error" if on else "default")  # noqa: E731
    records = []
    try:
        for step in range(steps):
            check = sync_check_after is not None and step >= sync_check_after
            if check and step == sync_check_after:
                torch.cuda.synchronize()
            checking(check)
            x, y = batches[step]
            probe.begin(True)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = built.loss_fn(out, y if built.task == "classifier" else x)
            loss.backward()
            probe.after_backward()
            probe.clip(preset.clip, preset.clip_threshold)
            probe.before_step(optimizer)
            checking(False)
            optimizer.step()
            checking(check)
            acc = (out.detach().argmax(1) == y).float().mean() if built.task == "classifier" else None
            probe.finish(step, loss, acc, optimizer)
            records += probe.poll()  # never waits: only copies whose event has completed
    finally:
        checking(False)
    records += probe.poll(wait=True)
    return records


@pytest.mark.parametrize("name,changes", [
    ("sigmoid-deep", {}),
    ("relu-he", {}),
    ("sigmoid-batchnorm", {}),
    ("sigmoid-residual", {"width": 784}),
    ("autoencoder-sigmoid", {"depth": 3, "width": 64}),
])
def test_norms_on_cuda_match_autograd(name, changes):
    preset = small(name, **changes)
    x, y = SyntheticData(preset.seed, preset.batch_size).batch(0)
    loss, act, wgt, _ = reference_norms(preset, x, y)  # on the CPU, float32
    (record,) = probe_steps(preset, 1)
    assert record.loss == pytest.approx(loss, rel=1e-4)
    np.testing.assert_allclose(record.layers["act_grad_norm"], act, rtol=1e-4)
    np.testing.assert_allclose(record.layers["weight_grad_norm"], wgt, rtol=1e-4)
    assert record.nonfinite is None
    sizes = [layer.weight.numel() for layer in build_model(preset).layers]
    sampled = [len(range(0, n, math.ceil(n / HIST_MAX_ELEMENTS))) for n in sizes]
    np.testing.assert_array_equal(record.hist.sum(axis=1), sampled)


@pytest.mark.parametrize("name,changes", [
    ("sigmoid-deep", {}),                                   # SGD with momentum: buffers read
    ("relu-he", {"optimizer": "adam", "lr": 1e-3}),          # Adam: weights snapshotted
    ("exploding-clipped", {}),                               # clip by norm
    ("clip-by-value", {}),                                   # clip by value
])
def test_probe_never_synchronises_the_gpu(name, changes):
    """Every step sampled with the detail tier on every other one; after two warm-up steps (cached
    plans, pinned buffers, cuBLAS handles) any synchronising call would raise."""
    preset = small(name, **changes)
    records = probe_steps(preset, 8, detail_every=2, sync_check_after=2)
    assert [r.step for r in records] == list(range(8))
    assert all(np.isfinite(r.layers["weight_grad_norm"]).all() for r in records)
    assert [r.detail for r in records] == [True, False] * 4


def test_trainer_on_cuda_matches_the_cpu_and_finds_where_nan_began():
    preset = load_preset("sigmoid-deep").replace(sample_every=1)
    steps = lambda device: [r for r in run_to_completion(preset, 5, device=device)  # noqa: E731
                            if isinstance(r, StepRecord)]
    gpu, cpu = steps("cuda"), steps("cpu")
    assert [r.step for r in gpu] == [r.step for r in cpu] == list(range(5))
    for a, b in zip(gpu, cpu):
        np.testing.assert_allclose(a.layers["act_grad_norm"], b.layers["act_grad_norm"], rtol=1e-3)
    exploding = load_preset("exploding")
    first_bad = lambda device: next(r for r in run_to_completion(exploding, 12, device=device)  # noqa: E731
                                    if isinstance(r, StepRecord) and r.nonfinite)
    on_gpu, on_cpu = first_bad("cuda"), first_bad("cpu")
    print(f"first non-finite: cuda step {on_gpu.step} {on_gpu.nonfinite}, cpu step {on_cpu.step} {on_cpu.nonfinite}")
    assert on_gpu.nonfinite[1] in ("forward", "backward")
    assert abs(on_gpu.step - on_cpu.step) <= 1


def test_marks_tell_huge_finite_gradients_from_infinite_ones_on_cuda():
    """A float32 sum of squares overflows at entries ~1e19; the marks must not call that
    non-finite, and must catch one real inf or NaN among a million entries."""
    from vgtui.probe import norms_and_marks

    huge = torch.full((1000, 1000), 1e37, device=CUDA)  # norm 1e40: over float32
    inf, nan = huge.clone(), huge.clone()
    inf[500, 7] = float("inf")
    nan[999, 999] = float("nan")
    norms, marks = norms_and_marks([huge, inf, nan, torch.randn(100, 256, device=CUDA)])
    marks = marks.cpu()
    assert marks[0] == 0 and marks[3] == 0
    assert not torch.isfinite(marks[1]) and torch.isnan(marks[2])
    assert torch.isinf(norms[0].cpu())  # reported in float32: too large to show, yet finite entries
