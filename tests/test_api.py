"""vgtui.watch on a user-style model in a user-style loop, checked against plain autograd.

The model is a small CNN with BatchNorm and a residual block; the loop uses bfloat16 autocast on
the CPU with a GradScaler, accumulates gradients over micro-batches and clips them itself. The
reference computes the same quantities with torch.autograd.grad and no vgtui at all.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vgtui
from vgtui import LayerSpec
from vgtui.channel import Channel
from vgtui.jsonl import LAYER_DIGITS, read_recording
from vgtui.records import RunEvent, RunHeader, StepRecord

STEPS, ACCUM, CLIP, SCALE = 3, 2, 0.5, 2.0**10


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)  # registered first, runs last: the watcher must sort
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Residual(8)
        self.act = nn.ReLU()  # no parameters: not a layer

    def forward(self, x):
        h = self.block(self.act(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


LAYERS = ["stem", "bn", "block.conv1", "block.bn1", "block.conv2", "block.bn2", "head"]


def make_model():
    torch.manual_seed(7)
    return SmallCNN()


def batch(step: int, micro: int):
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(6, 1, 7, 7, generator=g), torch.randint(0, 3, (6,), generator=g)


def forward_loss(model, step, micro):
    x, y = batch(step, micro)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return F.cross_entropy(out.float(), y) / ACCUM


def watched_run(path, **watch_kwargs):
    """The documented loop: scaler, accumulation, the user's own clip observed by before_clip()."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    watch_kwargs.setdefault("detail_every", 1)
    watcher = vgtui.watch(model, record=path, optimizer=opt, scaler=scaler, **watch_kwargs)
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUM):
            loss = forward_loss(model, step, micro)
            scaler.scale(loss).backward()
            total = total + loss.detach()
        scaler.unscale_(opt)
        watcher.before_clip()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        watcher.step(opt, total)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    return model, opt, watcher


def _norm(tensors):
    return float(torch.stack([t.double().norm() for t in tensors]).norm())


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def reference_run():
    """The same training without vgtui: every number from autograd.grad and plain tensor maths."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mods = [model.get_submodule(n) for n in LAYERS]
    params = list(model.parameters())
    rows = []
    for step in range(STEPS):
        h_sq = np.zeros(len(mods))
        acts: list[list[torch.Tensor]] = [[] for _ in mods]
        total_loss = 0.0
        for micro in range(ACCUM):
            outs = {}
            handles = [m.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o)) for k, m in enumerate(mods)]
            loss = forward_loss(model, step, micro)
            for h in handles:
                h.remove()
            grads = torch.autograd.grad(loss, [outs[k] for k in range(len(mods))] + params)
            for k in range(len(mods)):
                h_sq[k] += float(grads[k].double().norm()) ** 2
                # statistics of what follows the layer: "bn" feeds the ReLU module self.act
                a = F.relu(outs[k]) if LAYERS[k] == "bn" else outs[k]
                acts[k].append(a.detach().float().reshape(-1))
            for p, g in zip(params, grads[len(mods):]):
                p.grad = g.clone() if p.grad is None else p.grad + g
            total_loss += float(loss.detach())
        # A layer's ‖∂L/∂W‖, ‖W‖ and update cover every parameter of its module (bias included).
        w_grad = [_norm([p.grad for p in m.parameters()]) for m in mods]
        total = float(torch.stack([p.grad.norm() for p in params]).norm())
        after = float(torch.nn.utils.clip_grad_norm_(params, CLIP)) and float(torch.stack([p.grad.norm() for p in params]).norm())
        before_w = [_flat(m) for m in mods]
        opt.step()
        opt.zero_grad(set_to_none=True)
        cat = [torch.cat(a) for a in acts]
        rows.append({
            "loss": total_loss,
            "weight_grad_norm": w_grad,
            "act_grad_norm": np.sqrt(h_sq),
            "act_mean": [float(a.mean()) for a in cat],
            "act_std": [float(a.std()) for a in cat],
            "weight_norm": [float(_flat(m).norm()) for m in mods],
            "update_ratio": [float((_flat(m) - b).norm() / _flat(m).norm()) for m, b in zip(mods, before_w)],
            "total": total,
            "after": after,
        })
    return rows


def close(a, b, what, rtol=1e-5, atol=1e-9):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.allclose(a, b, rtol=rtol, atol=atol), f"{what}:\n{a}\n{b}"


#: A recording keeps LAYER_DIGITS significant digits of each per-layer value: half a unit of the last.
RECORDED = 0.5 * 10.0 ** (1 - LAYER_DIGITS) + 1e-5


def steps_of(path):
    result = read_recording(path)
    assert result.problems == []
    return result.records, [r for r in result.records if isinstance(r, StepRecord)]


def test_user_loop_matches_autograd(tmp_path):
    """AMP (bf16 autocast + GradScaler), 2 micro-batches per step, the user's own clipping."""
    model, opt, watcher = watched_run(tmp_path / "run.jsonl")
    records, steps = steps_of(tmp_path / "run.jsonl")
    header = records[0]
    assert isinstance(header, RunHeader) and header.layers == LAYERS and header.source == "api"
    # the ReLU module after "bn" is recognised; F.relu inside the block is not a module
    assert header.layer_kinds == ["linear", "relu", "linear", "linear", "linear", "linear", "linear"]
    assert header.preset["clip"] == "norm" and header.preset["lr"] == 0.1 and header.preset["name"] == "SmallCNN"
    assert [r.step for r in steps] == [0, 1, 2]
    assert [r.kind for r in records if isinstance(r, RunEvent)] == ["started", "finished"]
    ref = reference_run()
    for rec, want in zip(steps, ref):
        where = f"step {rec.step}"
        # After unscaling (not 1024x too large), before clipping, accumulated over micro-batches.
        close(rec.layers["weight_grad_norm"], want["weight_grad_norm"], f"{where} ‖∂L/∂W‖", rtol=RECORDED)
        # sqrt(Σ_micro ‖∂L_k/∂h_k‖²), the loss scale divided out.
        close(rec.layers["act_grad_norm"], want["act_grad_norm"], f"{where} ‖∂L/∂h‖", rtol=RECORDED)
        close(rec.layers["act_mean"], want["act_mean"], f"{where} act mean", rtol=RECORDED)
        close(rec.layers["act_std"], want["act_std"], f"{where} act std", rtol=RECORDED)
        close(rec.layers["weight_norm"], want["weight_norm"], f"{where} ‖W‖", rtol=RECORDED)
        # From step 1 the probe reads lr·‖momentum buffer‖; the reference subtracts float32 weights,
        # whose rounding (eps·‖W‖) is the difference: equal to 1e-5 relative or 1e-6 absolute.
        close(rec.layers["update_ratio"], want["update_ratio"], f"{where} ‖ΔW‖/‖W‖", rtol=RECORDED, atol=1e-6)
        close([rec.grad_norm_total, rec.grad_norm_clipped, rec.loss], [want["total"], want["after"], want["loss"]],
              f"{where} global norms and loss")
        assert rec.clipped == (want["total"] > CLIP)
    assert any(r.clipped for r in steps)
    assert watcher.transfers == STEPS


def test_act_mean_of_balanced_bn_is_near_zero_not_a_relative_match(tmp_path):
    """BatchNorm outputs have mean ~0: compare those absolutely (the relative check above uses 1e-4)."""
    _, _, watcher = watched_run(tmp_path / "run.jsonl")
    bn = [LAYERS.index(n) for n in ("block.bn1", "block.bn2")]  # "bn" feeds a ReLU module
    assert np.all(np.abs(watcher.latest.layers["act_mean"][bn]) < 1e-2)
    assert np.all(np.abs(watcher.latest.layers["act_std"][bn] - 1) < 0.1)


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _mlp_data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=g) * 3, torch.randn(8, 2, generator=g)


def test_offered_clip_unscales_and_matches_torch():
    """watcher.clip_grad_norm_ with the scaler known: the user never calls unscale_ themselves."""
    model, ref = _mlp(), _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    channel = Channel()
    watcher = vgtui.watch(model, channel=channel, optimizer=opt, scaler=scaler, sample_every=2)
    returned, expected = [], []
    for step in range(5):
        x, y = _mlp_data(step)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        returned.append(float(watcher.clip_grad_norm_(0.1)))
        watcher.step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        expected.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)))
        ref_opt.step()
        ref_opt.zero_grad()
    watcher.close()
    close(returned, expected, "clip_grad_norm_ return values (unscaled)")
    steps = [r for r in channel.drain() if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [0, 2, 4]  # sample_every=2; one transfer per sampled step
    assert watcher.transfers == 3
    close([r.grad_norm_total for r in steps], [expected[0], expected[2], expected[4]], "pre-clip total")
    assert all(r.clipped and abs(r.grad_norm_clipped - 0.1) < 1e-5 for r in steps)
    for p, q in zip(model.parameters(), ref.parameters()):
        close(p.detach(), q.detach(), "trained weights (no double unscale, no skipped step)")


def test_step_alone_measures_the_applied_gradient():
    """No clipping, no before_clip: per-layer norms are read at step(), unscaled by the watcher."""
    model, ref = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    watcher = vgtui.watch(model, optimizer=opt, scaler=scaler, diagnose=False, channel=Channel())
    x, y = _mlp_data(0)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    watcher.step()
    scaler.step(opt)
    scaler.update()
    watcher.close()
    F.mse_loss(ref(x), y).backward()
    rec = watcher.latest
    close(rec.layers["weight_grad_norm"], [_norm([ref[i].weight.grad, ref[i].bias.grad]) for i in (0, 2, 4)], "‖∂L/∂W‖")
    assert rec.grad_norm_total == rec.grad_norm_clipped and not rec.clipped


def test_amp_skipped_step_is_a_notice_not_an_alarm():
    """A loss scale so large that the scaled gradients overflow: GradScaler skips the step (its
    normal calibration). The record keeps the inf values but raises no non-finite alarm."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    channel = Channel()
    watcher = vgtui.watch(model, optimizer=opt, scaler=scaler, channel=channel, diagnose=False)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _mlp_data(0)
    scaler.scale(F.mse_loss(model(x), y * 100)).backward()
    watcher.step()
    scaler.step(opt)  # skipped: the optimiser's step hook does not fire
    scaler.update()
    watcher.close()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    records = channel.drain()
    notices = [r for r in records if isinstance(r, RunEvent) and r.kind == "notice"]
    step = next(r for r in records if isinstance(r, StepRecord))
    assert len(notices) == 1 and "GradScaler skipped" in notices[0].message and notices[0].step == 0
    assert step.nonfinite is None and not np.isfinite(step.grad_norm_total)


def _hooks(model, opt=None):
    count = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return count + (len(opt._optimizer_step_post_hooks) if opt is not None else 0)


def test_close_removes_every_hook():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hooks(model, opt)
    with vgtui.watch(model, optimizer=opt, diagnose=False) as watcher:
        assert _hooks(model, opt) > before
        forward_loss(model, 0, 0).backward()
        watcher.step()
        opt.step()
        assert _hooks(model, opt) > before
    assert _hooks(model, opt) == before
    with pytest.raises(RuntimeError, match="closed"):
        watcher.step()
    watcher.close()  # idempotent


def test_validation_forwards_do_not_count(tmp_path):
    """A no-grad forward (validation) between backward and step leaves the step's statistics alone."""
    results = []
    for validate in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watcher = vgtui.watch(model, optimizer=opt, diagnose=False, channel=Channel())
        x, y = _mlp_data(0)
        F.mse_loss(model(x), y).backward()
        if validate:
            with torch.no_grad():
                model(torch.randn(50, 5) * 10)
        watcher.step()
        opt.step()
        watcher.close()
        results.append(watcher.latest.layers)
    for metric in ("act_mean", "act_std", "act_grad_norm", "weight_grad_norm"):
        assert np.array_equal(results[0][metric], results[1][metric]), metric


def test_layer_selection():
    model = make_model()
    assert [s.name for s in vgtui.default_layers(model)] == ["head", "stem", "bn", "block.conv1", "block.bn1",
                                                             "block.conv2", "block.bn2"]
    by_name = vgtui.watch(model, layers=["block.conv2", "stem"], diagnose=False)
    assert by_name.layer_names == ["block.conv2", "stem"]  # an explicit list keeps its order
    by_name.close()
    convs = vgtui.watch(model, layers=lambda name, m: isinstance(m, nn.Conv2d), diagnose=False)
    forward_loss(model, 0, 0).backward()
    convs.step()
    assert convs.layer_names == ["stem", "block.conv1", "block.conv2"]  # a predicate: forward order
    convs.close()
    spec = LayerSpec("tanh1", model.stem, model.stem.weight, act_module=model.act, act_kind="relu")
    custom = vgtui.watch(model, layers=[spec, model.head], diagnose=False, channel=Channel())
    forward_loss(model, 0, 0).backward()
    custom.step()
    custom.close()
    assert custom.layer_names == ["tanh1", "head"]
    assert 0.0 <= custom.latest.layers["dead"][0] <= 1.0  # relu statistics on act_module's output
    with pytest.raises(ValueError, match="owns no trainable parameter"):
        vgtui.watch(model, layers=[model.act])
    with pytest.raises(ValueError, match="no module named"):
        vgtui.watch(model, layers=["nope"])
    frozen = _mlp()
    frozen[0].requires_grad_(False)
    assert [s.name for s in vgtui.default_layers(frozen)] == ["2", "4"]


def _tanh_specs(m):
    return [LayerSpec("l1", m[0], m[0].weight, m[1], "tanh"), LayerSpec("l2", m[2], m[2].weight, m[3], "tanh"), m[4]]


def test_pooled_statistics_over_micro_batches_equal_one_big_batch():
    """Without batch statistics in the model, accumulating two halves == one full batch."""
    full, split = _mlp(), _mlp()
    x, y = _mlp_data(1)
    w_full = vgtui.watch(full, layers=_tanh_specs(full), diagnose=False, channel=Channel())
    F.mse_loss(full(x), y).backward()
    w_full.step()
    w_full.close()
    w_split = vgtui.watch(split, layers=_tanh_specs(split), diagnose=False, channel=Channel())
    for half in (slice(0, 4), slice(4, 8)):
        (F.mse_loss(split(x[half]), y[half]) / 2).backward()
    w_split.step()
    w_split.close()
    sat = w_full.latest.layers["saturated"]
    assert 0 < sat[0] < 1 and np.isnan(sat[2])  # tanh layers saturate somewhat; the linear head: n/a
    for metric in ("weight_grad_norm", "act_grad_norm", "act_mean", "act_std", "saturated"):
        a, b = w_split.latest.layers[metric], w_full.latest.layers[metric]
        assert np.array_equal(np.isnan(a), np.isnan(b)), metric
        close(a[~np.isnan(a)], b[~np.isnan(b)], metric)


def test_compiled_model_forward_runs_and_weight_gradients_are_measured():
    """torch.compile (aot_eager backend: dynamo tracing through the hooks, no C compiler needed).

    Inside the compiled region the hooks do nothing, so no graph break: activation statistics and
    ‖∂L/∂h‖ are NaN ("not measured"); everything read outside the forward is measured."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, model = _mlp(), _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for net, runner in ((eager, eager), (model, compiled)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        watcher = vgtui.watch(runner, optimizer=opt, diagnose=False, channel=Channel(), detail_every=1)
        for step in range(2):
            x, y = _mlp_data(step)
            F.mse_loss(runner(x), y).backward()
            watcher.step()
            opt.step()
            opt.zero_grad()
        watcher.close()
        results.append(watcher.latest)
    eager_rec, compiled_rec = results
    close(compiled_rec.layers["weight_grad_norm"], eager_rec.layers["weight_grad_norm"], "‖∂L/∂W‖ compiled")
    close(compiled_rec.layers["update_ratio"], eager_rec.layers["update_ratio"], "update compiled")
    assert np.isnan(compiled_rec.layers["act_grad_norm"]).all()
    assert not compiled_rec.measured("act_grad_norm").any()  # not measured, not non-finite
    assert compiled_rec.nonfinite is None
    assert np.isfinite(eager_rec.layers["act_grad_norm"]).all()
    assert _hooks(model) == 0
    # Watching the plain module and compiling it afterwards works the same way.
    torch._dynamo.reset()
    late = _mlp()
    watcher = vgtui.watch(late, diagnose=False, channel=Channel())
    runner = torch.compile(late, backend="aot_eager")
    x, y = _mlp_data(0)
    F.mse_loss(runner(x), y).backward()
    watcher.step()
    watcher.close()
    assert np.isfinite(watcher.latest.layers["weight_grad_norm"]).all()
    assert np.isnan(watcher.latest.layers["act_mean"]).all() and watcher.latest.nonfinite is None
    assert not counters["graph_break"]  # the hooks never split the compiled graph


def test_nonfinite_is_reported_and_the_file_stays_strict_json(tmp_path):
    model = _mlp()
    watcher = vgtui.watch(model, record=tmp_path / "bad.jsonl", diagnose=False)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    x, y = _mlp_data(0)
    F.mse_loss(model(x), y).backward()
    watcher.step()
    watcher.close()
    _, steps = steps_of(tmp_path / "bad.jsonl")
    assert steps[0].nonfinite is not None


def test_a_run_of_zero_steps_is_a_valid_recording(tmp_path):
    vgtui.watch(_mlp(), record=tmp_path / "empty.jsonl").close()
    records, steps = steps_of(tmp_path / "empty.jsonl")
    assert isinstance(records[0], RunHeader) and steps == []
    assert [r.kind for r in records[1:]] == ["started", "finished"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that the watcher never syncs the device")
def test_no_device_sync_on_cuda():
    """With torch.cuda.set_sync_debug_mode("error") any synchronising call raises: forward hooks,
    activation-gradient hooks, before_clip and step (sampled or not) must not make one."""
    device = torch.device("cuda")
    model = _mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = vgtui.watch(model, optimizer=opt, sample_every=2, diagnose=False, channel=Channel())
    data = [tuple(t.to(device) for t in _mlp_data(step)) for step in range(6)]  # copies sync: before

    def one_step(step):
        x, y = data[step]
        F.mse_loss(model(x), y).backward()
        watcher.before_clip()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
        watcher.step(opt)
        opt.step()
        opt.zero_grad()

    for step in range(2):  # warm-up: cached plans, cuBLAS handles, pinned buffers
        one_step(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            one_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watcher.close()
    assert watcher.transfers == 3 and np.isfinite(watcher.latest.layers["act_grad_norm"]).all()


def test_the_readme_example_runs(tmp_path):
    import os
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "watch_my_model.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(example), "--steps", "3", "--accum", "2", "--sample-every", "1",
                          "--record", str(tmp_path / "run.jsonl")], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    records, steps = steps_of(tmp_path / "run.jsonl")
    assert [r.step for r in steps] == [0, 1, 2] and records[0].layers[0] == "stem"
    assert "vgtui replay" in out.stdout


def test_import_vgtui_is_lazy_and_a_forgotten_close_still_completes_the_file(tmp_path):
    """`import vgtui` must not import torch (`vgtui --help` stays fast); a script that never calls
    close() still leaves a complete recording when the interpreter exits."""
    code = f"""
import sys, vgtui
assert 'torch' not in sys.modules
import torch
model = torch.nn.Sequential(torch.nn.Linear(3, 2))
watcher = vgtui.watch(model, record={str(tmp_path / 'left.jsonl')!r})
for _ in range(2):
    model(torch.randn(4, 3)).sum().backward()
    watcher.step()
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    records, steps = steps_of(tmp_path / "left.jsonl")
    assert [r.step for r in steps] == [0, 1]
    assert isinstance(records[-1], RunEvent) and records[-1].kind == "finished"
