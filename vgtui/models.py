"""Preset -> (model, probe layer specs, optimiser, loss). Pure PyTorch; nothing here knows of a UI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import Preset
from .layers import LayerSpec, Taps
from .data import INPUT_DIM, NUM_CLASSES, RECALL_INPUTS

IMAGE_SIDE = 28


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


#: Gate blocks stacked in each recurrent weight, in PyTorch's order (LSTM: i, f, g, o; GRU: r, z, n).
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
#: The gate whose bias ``forget_bias`` sets: LSTM's forget gate f, GRU's update gate z (the share
#: of h_{t-1} a step keeps).
_KEEP_GATE = {"lstm": 1, "gru": 1}


class Recurrent(nn.Module):
    """One recurrent layer (tanh/ReLU RNN, LSTM or GRU) with PyTorch's parameter layout and
    equations (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``; a test holds it to
    ``nn.RNN``/``nn.LSTM``/``nn.GRU``), looped over time in Python.

    The loop is what makes the gradient through time measurable: with ``taps`` every h_t gets a
    zero ``delta[:, t]`` added where the next step and the layer above read it, so ∂L/∂delta_t
    is the TOTAL derivative ∂L/∂h_t, through every later step. The output tensor of a fused
    ``nn.LSTM`` only carries the direct path (all zeros before the last step when only h_T
    reaches the loss). Input and output are batch-first (B, T, features).
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        gates = GATES[cell] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        bound = 1.0 / math.sqrt(hidden_size)  # PyTorch's own recurrent init
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        batch, steps, _ = x.shape
        hidden = self.hidden_size
        # Every step's input projection in one matrix product; only h_{t-1} @ W_hh^T is serial.
        # A GRU's b_hh sits inside r * (...): it stays in the loop; the others add it here, once.
        gru = self.cell == "gru"
        bias = self.bias_ih if gru else self.bias_ih + self.bias_hh
        projected = torch.addmm(bias, x.reshape(batch * steps, -1), self.weight_ih.t())
        projected = projected.reshape(batch, steps, -1).unbind(1)
        delta = x.new_zeros(batch, steps, hidden).requires_grad_() if taps is not None else None
        # One unbind (its backward: one stack), not a select per step (each a full-size zero grad).
        deltas = delta.unbind(1) if delta is not None else None
        w_hh_t = self.weight_hh.t()
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden) if self.cell == "lstm" else None
        outputs = []
        for t in range(steps):
            if gru:
                x_r, x_z, x_n = projected[t].chunk(3, 1)
                h_r, h_z, h_n = torch.addmm(self.bias_hh, h, w_hh_t).chunk(3, 1)
                r = torch.sigmoid(x_r + h_r)
                z = torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h = n + z * (h - n)  # (1 - z) * n + z * h
            else:
                pre = torch.addmm(projected[t], h, w_hh_t)
                if self.cell == "lstm":
                    i, f, g, o = pre.chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif self.cell == "rnn_relu":
                    h = torch.relu(pre)
                else:
                    h = torch.tanh(pre)
            if deltas is not None:
                h = h + deltas[t]
            outputs.append(h)
        out = torch.stack(outputs, 1)
        if taps is not None:
            taps.append((out, delta))
        return out


class SequenceClassifier(nn.Module):
    """(B, T, recall inputs) -> ``depth`` stacked recurrent layers of ``width`` -> linear head on the
    last step's h -> 10 logits."""

    def __init__(self, preset: Preset):
        super().__init__()
        sizes = [RECALL_INPUTS] + [preset.width] * preset.depth
        self.recurrent = nn.ModuleList(Recurrent(preset.cell, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(preset.width, NUM_CLASSES)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        for layer in self.recurrent:
            x = layer(x, taps=taps)
        return _head(self.head, x[:, -1], taps)


def init_recurrent(layer: Recurrent, preset: Preset) -> None:
    """``recurrent_init`` on each gate block of W_hh (default: PyTorch's U(±1/sqrt(H)));
    ``forget_bias`` on the gate that keeps the past (LSTM, GRU)."""
    hidden = layer.hidden_size
    with torch.no_grad():
        for block in layer.weight_hh.split(hidden, 0):
            if preset.recurrent_init == "orthogonal":
                nn.init.orthogonal_(block)
            elif preset.recurrent_init == "spectral":
                nn.init.normal_(block)
                block.mul_(preset.spectral_radius / torch.linalg.eigvals(block.double()).abs().max().float())
        gate = _KEEP_GATE.get(preset.cell)
        if gate is not None:
            span = slice(gate * hidden, (gate + 1) * hidden)
            layer.bias_ih[span] = preset.forget_bias
            layer.bias_hh[span] = 0.0


class ConvBlock(nn.Module):
    """3x3 conv -> (BatchNorm) -> activation: one plain layer, or (``shortcut``) the second half
    of a residual block, where the shortcut joins before the activation as in He et al. 2016."""

    def __init__(self, c_in: int, c_out: int, stride: int, preset: Preset, residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not preset.batch_norm)
        self.norm = nn.BatchNorm2d(c_out) if preset.batch_norm else None
        self.act = make_activation(preset.activation, preset.leaky_slope)
        self.residual = residual

    def forward(self, x: torch.Tensor, taps: Taps = None,
                shortcut: torch.Tensor | None = None) -> torch.Tensor:
        z = self.conv(x)
        if self.norm is not None:
            z = self.norm(z)
        if shortcut is not None:
            z = z + shortcut
        h = self.act(z)
        if taps is not None:
            taps.append((h, h))
        return h


def _shortcut(x: torch.Tensor, channels: int, stride: int) -> torch.Tensor:
    """He et al.'s option A: identity, subsampled and zero-padded in channels where the shape
    changes (no parameters, so plain and residual nets have the same weights to train)."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if x.shape[1] < channels:
        x = nn.functional.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))
    return x


def cnn_stages(depth: int, skip: bool) -> list[int]:
    """Conv layers per stage after the stem (stages of width, 2x width, 4x width channels, the
    first conv of stages 2 and 3 halving the image side), as even as blocks allow."""
    unit = 2 if skip else 1
    units = (depth - 1) // unit
    per = [units // 3 + (1 if k < units % 3 else 0) for k in range(3)]
    return [n * unit for n in per if n]


class ConvNet(nn.Module):
    """28x28 images (the flat 784 inputs reshaped) -> stem conv (stride 2: 14x14) -> up to three
    stages of 3x3 convs (``width``, 2x, 4x channels; 14, 7, 4 pixels) -> global average pool ->
    linear head. ``skip``: the convs after the stem pair up into residual blocks."""

    def __init__(self, preset: Preset):
        super().__init__()
        width = preset.width
        self.stem = ConvBlock(1, width, 2, preset)
        self.convs = nn.ModuleList()
        self.strides: list[int] = []
        channels = width
        for stage, count in enumerate(cnn_stages(preset.depth, preset.skip)):
            out = width * 2**stage
            for k in range(count):
                stride = 2 if stage > 0 and k == 0 else 1
                second_of_block = preset.skip and k % 2 == 1
                self.convs.append(ConvBlock(channels, out, stride, preset, residual=second_of_block))
                self.strides.append(stride)
                channels = out
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor, taps: Taps = None) -> torch.Tensor:
        x = self.stem(x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), taps=taps)
        block_input = x
        block_stride = 1
        for conv, stride in zip(self.convs, self.strides):
            if conv.residual:
                x = conv(x, taps=taps, shortcut=_shortcut(block_input, conv.conv.out_channels, block_stride))
            else:
                block_input, block_stride = x, stride
                x = conv(x, taps=taps)
        return _head(self.head, x.mean(dim=(2, 3)), taps)


def _init_linear(linear: nn.Linear | nn.Conv2d, preset: Preset) -> None:
    _init_weights(linear.weight, linear.bias, preset)


def _init_weights(w: torch.Tensor, bias: torch.Tensor | None, preset: Preset) -> None:
    """``init`` (and ``bias_init``) on one layer's weight (linear, conv or a recurrent input matrix)."""
    kind = preset.init
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
        if bias is not None and (kind != "default" or preset.bias_init != 0.0):
            nn.init.constant_(bias, preset.bias_init)


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
    if preset.network == "rnn":
        return _build_sequence(preset, device)
    if preset.network == "cnn":
        return _build_conv(preset, device)
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


def _build_sequence(preset: Preset, device) -> Built:
    model = SequenceClassifier(preset)
    # The time axis of the tapped h (B, T, H) is 1; h's activation kind is its cell's.
    kind = {"rnn_tanh": "tanh", "rnn_relu": "relu"}.get(preset.cell, preset.cell)
    layers = [LayerSpec(f"{preset.cell}{i + 1}", layer, layer.weight_hh, None, kind,
                        act_is_output=True, time_dim=1)
              for i, layer in enumerate(model.recurrent)]
    layers.append(LayerSpec("output", model.head, model.head.weight, None, "linear"))
    for layer in model.recurrent:
        _init_weights(layer.weight_ih, None, preset)
        init_recurrent(layer, preset)
    _init_linear(model.head, preset)
    model.to(device)
    return Built(model, layers, nn.functional.cross_entropy, "classifier")


def _build_conv(preset: Preset, device) -> Built:
    model = ConvNet(preset)
    blocks = [model.stem, *model.convs]
    layers = [LayerSpec(f"conv{i + 1}", block, block.conv.weight, block.act, preset.activation,
                        act_is_output=True) for i, block in enumerate(blocks)]
    layers.append(LayerSpec("output", model.head, model.head.weight, None, "linear"))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _init_linear(module, preset)
    model.to(device)
    return Built(model, layers, nn.functional.cross_entropy, "classifier")


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
