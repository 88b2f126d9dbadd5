"""Convolutional presets: He et al. 2016's picture, per conv layer, against autograd.

The truth is ‖∂L/∂h‖ of each conv layer's output, kept by forward hooks the test installs on the
conv blocks and differentiated with ``torch.autograd.grad``; at initialisation, fixed seeds.
"""

import math

import numpy as np
import pytest
import torch

from vgtui.config import PresetError, load_preset
from vgtui.data import FASHION_MNIST_DIR, make_data
from vgtui.models import ConvBlock, build_model
from vgtui.records import RunError, StepRecord
from vgtui.trainer import run_to_completion

CNN_PRESETS = ["cnn-plain", "cnn-residual", "cnn-sigmoid"]


def conv_output_grad_norms(name: str, **changes) -> tuple[np.ndarray, float]:
    """‖∂L/∂h‖ of every conv block's output (input to output) of preset ``name`` at init on its
    training batch 0, via hooks and autograd; and the loss."""
    preset = load_preset(name).replace(**changes) if changes else load_preset(name)
    model = build_model(preset).model
    outputs = []
    handles = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out))
               for m in model.modules() if isinstance(m, ConvBlock)]
    x, y = make_data(preset.data, preset.seed, preset.batch_size, "cpu").batch(0)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, outputs)
    for handle in handles:
        handle.remove()
    return np.array([float(g.norm()) for g in grads]), float(loss.detach())


def test_plain_and_sigmoid_nets_lose_the_gradient_the_residual_net_keeps():
    plain = conv_output_grad_norms("cnn-plain")[0]
    residual = conv_output_grad_norms("cnn-residual")[0]
    sigmoid = conv_output_grad_norms("cnn-sigmoid")[0]
    assert len(plain) == len(residual) == len(sigmoid) == 19
    ratio = {k: v[0] / v[-1] for k, v in (("plain", plain), ("residual", residual), ("sigmoid", sigmoid))}
    assert ratio["residual"] > 0.1
    assert ratio["plain"] < 1e-4 * ratio["residual"]
    assert ratio["sigmoid"] < 1e-4 * ratio["plain"]


def test_trainer_records_the_same_per_layer_gradients():
    """Step 0's record against the independent hooks-and-autograd computation, layer by layer."""
    for name in ("cnn-residual", "cnn-plain"):
        truth, loss = conv_output_grad_norms(name)
        record = [r for r in run_to_completion(load_preset(name), 1) if isinstance(r, StepRecord)][0]
        assert record.loss == pytest.approx(loss, rel=1e-5)
        np.testing.assert_allclose(record.layers["act_grad_norm"][:-1], truth, rtol=1e-4)
        assert record.first_last_ratio().value == pytest.approx(
            truth[0] / record.layers["act_grad_norm"][-1], rel=1e-4)


def test_layout_stem_three_stages_and_residual_blocks():
    built = build_model(load_preset("cnn-residual"))
    model = built.model
    assert [layer.name for layer in built.layers] == [f"conv{i}" for i in range(1, 20)] + ["output"]
    assert sum(block.residual for block in model.convs) == 9  # 18 convs after the stem, in pairs
    taps = []
    model(torch.zeros(2, 784), taps=taps)
    shapes = [tuple(h.shape[1:]) for _, h in taps[:-1]]
    assert shapes[0] == (16, 14, 14) and shapes[1] == (16, 14, 14)
    assert shapes[7] == (32, 7, 7) and shapes[-1] == (64, 4, 4)
    plain = build_model(load_preset("cnn-plain")).model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


def test_residual_cnn_needs_an_odd_depth():
    with pytest.raises(PresetError, match="odd"):
        load_preset("cnn-residual").replace(depth=18)
    assert len(build_model(load_preset("cnn-plain").replace(depth=4)).layers) == 5


@pytest.mark.parametrize("name", CNN_PRESETS)
def test_each_cnn_preset_builds_and_trains(name):
    preset = load_preset(name)
    records = run_to_completion(preset.replace(batch_size=4, depth=5), 3)
    assert not [r for r in records if isinstance(r, RunError)]
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [0, 1, 2] and all(math.isfinite(r.loss) for r in steps)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_cnn_trains_on_fashion_mnist():
    records = run_to_completion(load_preset("cnn-residual").replace(data="fashion-mnist", batch_size=4), 2)
    assert not [r for r in records if isinstance(r, RunError)]
    assert len([r for r in records if isinstance(r, StepRecord)]) == 2
