"""Preset -> (model, probe layer specs, optimiser, loss). Pure PyTorch; nothing here knows of a UI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import Preset
from .layers import LayerSpec, Taps
from .data import INPUT_DIM, NUM_CLASSES


def make_activation(name: str, leaky_slope: float = 0.01) -> nn.Module:
    return {
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(leaky_slope),
        "elu": nn.ELU,
        "silu": nn.SiLU,
    }[name]()




class Block(nn.Module):
    """Linear -> (BatchNorm) -> activation, plus an optional residual shortcut around all three."""

    def __init__(self, fan_in: int, fan_out: int, preset: Preset):
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out)
        self.norm = nn.BatchNorm1d(fan_out) if preset.batch_norm else None
        self.act = make_activation(preset.activation, preset.leaky_slope)
        self.shortcut: nn.Module | None = None
        if preset.skip:
            # A projection where widths differ keeps the residual path a plain sum.
            self.shortcut = nn.Identity() if fan_in == fan_out else nn.Linear(fan_in, fan_out, bias=False)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        z = self.linear(x)
        if self.norm is not None:
            z = self.norm(z)
        a = self.act(z)
        h = a if self.shortcut is None else a + self.shortcut(x)
        if taps is not None:
            taps.append((a, h))
        return h


class MLP(nn.Module):
    """The classifier: 784 -> depth x width -> 10 (the seed network at depth 5, width 1000)."""

    def __init__(self, preset: Preset):
        super().__init__()
        widths = [INPUT_DIM] + [preset.width] * preset.depth
        self.blocks = nn.ModuleList(Block(a, b, preset) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, taps=taps)
        return _head(self.head, x, taps)


def _head(head: nn.Linear, x: torch.Tensor, taps: Taps) -> torch.Tensor:
    out = head(x)
    if taps is not None:
        taps.append((out, out))
    return out


def autoencoder_widths(preset: Preset) -> list[int]:
    """Encoder widths tapering geometrically from ``width`` to ``code_width`` over ``depth`` layers."""
    if preset.depth == 1:
        return [preset.code_width]
    ratio = preset.code_width / preset.width
    return [round(preset.width * ratio ** (i / (preset.depth - 1))) for i in range(preset.depth)]


class AutoEncoder(nn.Module):
    """784 -> encoder widths -> code -> mirrored decoder -> 784 (sigmoid output, MSE loss)."""

    def __init__(self, preset: Preset):
        super().__init__()
        enc = autoencoder_widths(preset)
        dims = [INPUT_DIM] + enc
        self.encoder = nn.ModuleList(Block(a, b, preset) for a, b in zip(dims[:-1], dims[1:]))
        back = dims[::-1]  # code ... 784
        self.decoder = nn.ModuleList(Block(a, b, preset) for a, b in zip(back[:-2], back[1:-1]))
        self.head = nn.Linear(back[-2], INPUT_DIM)

    def encode(self, x: torch.Tensor, upto: int | None = None, taps: Taps = None) -> torch.Tensor:
        for block in self.encoder[:upto]:
            x = block(x, taps=taps)
        return x

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        x = self.encode(x, taps=taps)
        for block in self.decoder:
            x = block(x, taps=taps)
        return _head(self.head, x, taps)


def _init_linear(linear: nn.Linear, preset: Preset) -> None:
    kind = preset.init
    w = linear.weight
    nonlinearity = "leaky_relu" if preset.activation == "leaky_relu" else "relu"
    with torch.no_grad():
        if kind == "default":
            pass  # PyTorch's own: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        elif kind == "xavier_uniform":
            nn.init.xavier_uniform_(w)
        elif kind == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif kind == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, a=preset.leaky_slope, nonlinearity=nonlinearity)
        elif kind == "kaiming_normal":
            nn.init.kaiming_normal_(w, a=preset.leaky_slope, nonlinearity=nonlinearity)
        elif kind == "normal":
            nn.init.normal_(w, 0.0, preset.init_std)
        if linear.bias is not None and (kind != "default" or preset.bias_init != 0.0):
            nn.init.constant_(linear.bias, preset.bias_init)


def _block_spec(name: str, block: Block, preset: Preset) -> LayerSpec:
    return LayerSpec(name, block, block.linear.weight, block.act, preset.activation,
                     act_is_output=block.shortcut is None)


@dataclass
class Built:
    model: nn.Module
    layers: list[LayerSpec]
    loss_fn: object
    task: str


def build_model(preset: Preset, device: torch.device | str = "cpu") -> Built:
    """The network for a preset, initialised as the preset says, with its probe points in order."""
    torch.manual_seed(preset.seed)
    if preset.task == "classifier":
        model = MLP(preset)
        layers = [_block_spec(f"hidden{i + 1}", b, preset) for i, b in enumerate(model.blocks)]
        loss_fn = nn.functional.cross_entropy
    else:
        model = AutoEncoder(preset)
        n_enc = len(model.encoder)
        layers = [_block_spec(f"enc{i + 1}", b, preset) for i, b in enumerate(model.encoder)]
        layers[-1].name = "code"
        layers += [_block_spec(f"dec{n_enc - 1 - i}", b, preset) for i, b in enumerate(model.decoder)]

        def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(torch.sigmoid(output), target)

    layers.append(LayerSpec("output", model.head, model.head.weight, None, "linear"))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module, preset)
    model.to(device)
    return Built(model, layers, loss_fn, preset.task)


def make_optimizer(params, preset: Preset) -> torch.optim.Optimizer:
    params = list(params)
    if preset.optimizer == "sgd":
        return torch.optim.SGD(params, lr=preset.lr, momentum=preset.momentum,
                               weight_decay=preset.weight_decay, foreach=True)
    return torch.optim.Adam(params, lr=preset.lr, weight_decay=preset.weight_decay, foreach=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_initial_loss(task: str) -> float:
    return math.log(NUM_CLASSES) if task == "classifier" else float("nan")
