"""The probe's numbers against an independent autograd computation (no hooks, no probe)."""

import math

import numpy as np
import pytest
import torch

from vgtui.models import build_model, make_optimizer
from vgtui.config import load_preset
from vgtui.data import SyntheticData
from vgtui.probe import HIST_MAX_ELEMENTS, Probe
from vgtui.records import HIST_BINS, HIST_LOG10_MAX, HIST_LOG10_MIN

RTOL = 1e-5


def small(name, **changes):
    base = {"depth": 3, "width": 64, "batch_size": 32, "code_width": 8}
    return load_preset(name).replace(**{**base, **changes})


def reference_norms(preset, x, y):
    """‖∂L/∂h‖ per probe point and ‖∂L/∂W‖ per layer, by running the blocks by hand and asking
    torch.autograd.grad for the gradient of each intermediate output."""
    built = build_model(preset)
    model = built.model
    outputs = []
    if built.task == "classifier":
        h = x
        for block in model.blocks:
            h = block(h)
            outputs.append(h)
        out = model.head(h)
        target = y
    else:
        h = x
        for block in list(model.encoder) + list(model.decoder):
            h = block(h)
            outputs.append(h)
        out = model.head(h)
        target = x
    outputs.append(out)
    loss = built.loss_fn(out, target)
    weights = [layer.weight for layer in built.layers]
    # ‖∂L/∂W‖ of a layer covers every parameter of its module (weights, biases, norms).
    owned = [list(layer.output_module.parameters()) for layer in built.layers]
    flat = [p for params in owned for p in params]
    grads = torch.autograd.grad(loss, outputs + weights + flat)
    n = len(outputs)
    act = np.array([g.norm().item() for g in grads[:n]])
    by_param = iter(grads[2 * n:])
    wgt = np.array([math.sqrt(sum(next(by_param).norm().item() ** 2 for _ in params)) for params in owned])
    return loss.item(), act, wgt, [g.detach().numpy() for g in grads[n:2 * n]]


def _flat(layer):
    """Every parameter of a layer as one vector (what its ‖W‖ and update ratio cover)."""
    return torch.cat([p.detach().reshape(-1) for p in layer.output_module.parameters()])


def probed_step(preset, x, y, steps=1, owns_backward=False, taps=False):
    """``steps`` probed training steps: module hooks and tensor hooks; or (``owns_backward``)
    ∂L/∂h from Probe.backward; or (``taps``) that, with h reported by the model itself, as the
    trainer does."""
    built = build_model(preset)
    model = built.model
    probe = Probe(built.layers, list(model.parameters()), detail_every=1,
                  owns_backward=owns_backward or taps)
    if not taps:
        probe.attach()
    optimizer = make_optimizer(model.parameters(), preset)
    records, before, after = [], [], []
    for step in range(steps):
        probe.begin(True)
        optimizer.zero_grad()
        out = probe.forward(model, x) if taps else model(x)
        loss = built.loss_fn(out, y if built.task == "classifier" else x)
        probe.backward(loss)
        probe.after_backward()
        probe.clip(preset.clip, preset.clip_threshold)
        probe.before_step(optimizer)
        before.append([_flat(layer) for layer in built.layers])
        optimizer.step()
        after.append([_flat(layer) for layer in built.layers])
        acc = (out.argmax(1) == y).float().mean() if built.task == "classifier" else None
        probe.finish(step, loss, acc, optimizer)
        records += probe.poll()
    probe.detach()
    return records, before, after, built


@pytest.mark.parametrize(
    "name,changes",
    [
        ("sigmoid-deep", {}),
        ("relu-he", {}),
        ("sigmoid-batchnorm", {}),
        ("sigmoid-residual", {}),
        ("tanh-deep", {"width": 48}),  # 784 -> 48: the residual projection path is exercised below
        ("sigmoid-residual", {"width": 784}),  # identity shortcut on the first block
        ("autoencoder-sigmoid", {"depth": 3, "width": 64}),
        ("autoencoder-relu", {"depth": 2, "width": 32}),
    ],
)
@pytest.mark.parametrize("path", ["hooks", "autograd.grad", "taps"])
def test_norms_match_autograd(name, changes, path):
    preset = small(name, **changes)
    x, y = SyntheticData(preset.seed, preset.batch_size).batch(0)
    loss, act, wgt, weight_grads = reference_norms(preset, x, y)
    (record,), _, _, built = probed_step(preset, x, y, owns_backward=path == "autograd.grad",
                                         taps=path == "taps")
    assert record.loss == pytest.approx(loss, rel=RTOL)
    np.testing.assert_allclose(record.layers["act_grad_norm"], act, rtol=RTOL)
    np.testing.assert_allclose(record.layers["weight_grad_norm"], wgt, rtol=RTOL)
    assert record.nonfinite is None
    # Histograms: log-spaced bins of |dL/dW| over the evenly strided sample, counted by numpy.
    inner = np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)[1:-1]
    for i, grad in enumerate(weight_grads):
        flat = np.abs(grad.reshape(-1))
        sample = flat[:: max(1, math.ceil(flat.size / HIST_MAX_ELEMENTS))]
        expected = np.bincount(np.searchsorted(inner.astype(np.float32), sample), minlength=HIST_BINS)
        np.testing.assert_array_equal(record.hist[i], expected)


def test_owning_backward_trains_exactly_like_loss_backward():
    """The trainer's path (one autograd.grad call for parameters and ∂L/∂h) must leave the same
    weights and records as plain loss.backward() with tensor hooks, clipping included."""
    preset = small("relu-he", depth=4, width=32).replace(clip="norm", clip_threshold=0.5)
    x, y = SyntheticData(preset.seed, preset.batch_size).batch(0)
    hooked, _, after_hooked, _ = probed_step(preset, x, y, steps=3)
    owned, _, after_owned, _ = probed_step(preset, x, y, steps=3, owns_backward=True)
    for a, b in zip(after_hooked[-1], after_owned[-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(hooked, owned):
        np.testing.assert_array_equal(a.layers["act_grad_norm"], b.layers["act_grad_norm"])
        assert a.grad_norm_total == b.grad_norm_total and a.clipped == b.clipped


@pytest.mark.parametrize("name", ["relu-he", "sigmoid-residual", "autoencoder-relu"])
def test_taps_measure_exactly_what_hooks_measure(name):
    """The trainer's path (the model reports h and the activation itself) gives the same records,
    every metric, as module hooks, including blocks whose shortcut makes h differ from the
    activation."""
    preset = small(name, depth=3, width=32)
    x, y = SyntheticData(preset.seed, preset.batch_size).batch(0)
    hooked, _, after_hooked, _ = probed_step(preset, x, y, steps=3, owns_backward=True)
    tapped, _, after_tapped, _ = probed_step(preset, x, y, steps=3, taps=True)
    for a, b in zip(after_hooked[-1], after_tapped[-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(hooked, tapped):
        for metric, values in a.layers.items():
            np.testing.assert_array_equal(values, b.layers[metric], err_msg=metric)
        np.testing.assert_array_equal(a.hist, b.hist)


def test_taps_must_cover_every_layer():
    preset = small("relu-he", depth=3, width=32)
    built = build_model(preset)
    probe = Probe(built.layers, list(built.model.parameters()), owns_backward=True)
    probe.begin(True)
    with pytest.raises(ValueError, match="taps"):
        probe.tapped([])


def test_update_ratio_and_weight_norm_match_the_actual_step():
    preset = small("relu-he")
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    records, before, after, _ = probed_step(preset, x, y, steps=3)
    # Step 0 snapshots the weights; later steps read SGD's momentum buffer instead.
    for record, w0, w1 in zip(records, before, after):
        expected = np.array([(b - a).norm().item() / b.norm().item() for a, b in zip(w0, w1)])
        np.testing.assert_allclose(record.layers["update_ratio"], expected, rtol=1e-4)
        np.testing.assert_allclose(record.layers["weight_norm"], [w.norm().item() for w in w1], rtol=RTOL)


def test_total_norm_before_and_after_clipping():
    preset = small("exploding-clipped", depth=4, width=64)
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    built = build_model(preset)
    loss = built.loss_fn(built.model(x), y)
    grads = torch.autograd.grad(loss, list(built.model.parameters()))
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    (record,), _, _, _ = probed_step(preset, x, y)
    assert record.grad_norm_total == pytest.approx(total, rel=RTOL)
    assert total > 1.0 and record.clipped
    assert record.grad_norm_clipped == pytest.approx(1.0, rel=1e-4)


def test_clip_by_value_reports_whether_it_acted():
    preset = small("clip-by-value", clip_threshold=1e-3)
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    (record,), _, _, _ = probed_step(preset, x, y)
    assert record.clipped
    assert record.grad_norm_clipped < record.grad_norm_total
    loose = small("clip-by-value", clip_threshold=1e6)
    (record,), _, _, _ = probed_step(loose, x, y)
    assert not record.clipped
    assert record.grad_norm_clipped == pytest.approx(record.grad_norm_total, rel=RTOL)


def test_saturation_and_dead_fractions_match_a_direct_count():
    preset = small("sigmoid-deep")
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    (record,), _, _, built = probed_step(preset, x, y)
    fresh = build_model(preset).model
    h = x
    for i, block in enumerate(fresh.blocks):
        h = block(h)
        expected = ((h < 0.02) | (h > 0.98)).float().mean().item()
        assert record.layers["saturated"][i] == pytest.approx(expected, abs=1e-6)
        assert record.layers["act_mean"][i] == pytest.approx(h.mean().item(), rel=1e-5)
    assert math.isnan(record.layers["dead"][0])  # sigmoid units do not die

    relu = small("relu-dead", bias_init=-0.5)
    (record,), _, _, _ = probed_step(relu, x, y)
    fresh = build_model(relu).model
    h = x
    for i, block in enumerate(fresh.blocks):
        h = block(h)
        expected = (h <= 0).all(dim=0).float().mean().item()
        assert record.layers["dead"][i] == pytest.approx(expected, abs=1e-6)
    assert math.isnan(record.layers["saturated"][0])


def test_unsampled_steps_measure_nothing_and_transfer_nothing():
    preset = small("relu-he")
    built = build_model(preset)
    probe = Probe(built.layers, list(built.model.parameters())).attach()
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    probe.begin(False)
    built.loss_fn(built.model(x), y).backward()
    probe.after_backward()
    probe.clip("none")
    probe.finish(0, torch.tensor(0.0), None)
    assert probe.poll() == [] and probe.transfers == 0


def test_detach_removes_every_hook():
    preset = small("sigmoid-residual")
    built = build_model(preset)
    probe = Probe(built.layers, list(built.model.parameters())).attach()
    assert any(m._forward_hooks for m in built.model.modules())
    probe.detach()
    assert not any(m._forward_hooks for m in built.model.modules())


def test_hooks_exist_only_on_sampled_steps_one_per_plain_layer():
    """Between measurements the model runs hook-free (a module with any hook takes PyTorch's
    slow call path); a block whose activation is its output needs one hook, not two."""
    hooked = lambda model: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    plain = build_model(small("sigmoid-deep"))
    probe = Probe(plain.layers, list(plain.model.parameters())).attach()
    assert hooked(plain.model) == len(plain.layers)
    probe.begin(False)
    assert hooked(plain.model) == 0
    probe.begin(True)
    assert hooked(plain.model) == len(plain.layers)
    residual = build_model(small("sigmoid-residual"))  # act output + shortcut != act output
    probe = Probe(residual.layers, list(residual.model.parameters())).attach()
    assert hooked(residual.model) == 2 * (len(residual.layers) - 1) + 1
    probe.detach()
    probe.begin(True)
    assert hooked(residual.model) == 0


def measure_one_step(built, preset):
    """One sampled step of ``built`` on batch 0, without an optimiser step."""
    probe = Probe(built.layers, list(built.model.parameters())).attach()
    x, y = SyntheticData(0, preset.batch_size).batch(0)
    probe.begin(True)
    loss = built.loss_fn(built.model(x), y)
    loss.backward()
    probe.after_backward()
    probe.clip("none")
    probe.finish(0, loss, None)
    (record,) = probe.poll()
    return record


def test_nonfinite_forward_names_the_first_layer():
    preset = small("relu-he")
    built = build_model(preset)
    with torch.no_grad():
        built.layers[1].weight[0, 0] = float("inf")
    assert measure_one_step(built, preset).nonfinite == ("hidden2", "forward")


def test_nonfinite_backward_names_the_layer_nearest_the_output():
    preset = small("relu-he")
    built = build_model(preset)
    # A gradient that turns non-finite inside hidden3's backward, with a finite forward.
    built.model.blocks[2].register_full_backward_hook(
        lambda m, gin, gout: (torch.full_like(gin[0], float("nan")),))
    assert measure_one_step(built, preset).nonfinite == ("hidden2", "backward")


def test_detail_tier_every_nth_sampled_step_core_on_all():
    preset = small("relu-he")
    built = build_model(preset)
    probe = Probe(built.layers, list(built.model.parameters()), detail_every=3).attach()
    optimizer = make_optimizer(built.model.parameters(), preset)
    data = SyntheticData(0, preset.batch_size)
    records = []
    for step in range(7):
        x, y = data.batch(step)
        probe.begin(True)
        optimizer.zero_grad()
        loss = built.loss_fn(built.model(x), y)
        loss.backward()
        probe.after_backward()
        probe.clip("none")
        probe.before_step(optimizer)
        optimizer.step()
        probe.finish(step, loss, None, optimizer)
        records += probe.poll()
    assert [r.detail for r in records] == [True, False, False, True, False, False, True]
    for r in records:
        assert np.isfinite(r.layers["act_grad_norm"]).all() and np.isfinite(r.layers["weight_grad_norm"]).all()
        assert (r.hist is not None) == r.detail
        assert np.isfinite(r.layers["update_ratio"]).all() == r.detail
        assert np.isfinite(r.layers["act_mean"]).all() == r.detail
