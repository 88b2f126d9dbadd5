"""What a probe point is: the unit vgtui measures and names (a "layer")."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LayerSpec:
    """One probe point. ``output_module``'s output is h (its gradient is ‖∂L/∂h‖; None for a
    parameter with no module of its own, e.g. one owned by the root model); ``act_module``'s
    output feeds the activation statistics. ``act_is_output`` says that output *is* h (a block
    without a shortcut): the probe then needs one hook, not two.

    ‖∂L/∂W‖, ‖W‖ and the update ratio cover ``params``: by default every trainable parameter of
    ``output_module`` (weights and biases alike), else ``weight`` alone. ``weight`` is the tensor
    whose |∂L/∂W| histogram is drawn."""

    name: str
    output_module: nn.Module | None
    weight: nn.Parameter
    act_module: nn.Module | None = None
    act_kind: str = "linear"
    act_is_output: bool = False
    #: For a recurrent layer: the dimension of h that is time (1 for batch-first (B, T, H)
    #: outputs, 0 for (T, B, H)); the probe then also records ‖∂L/∂h_t‖ for every t.
    time_dim: int | None = None
    #: The parameters this layer covers, when not every parameter of ``output_module``.
    params: tuple[nn.Parameter, ...] | None = None


#: ``model(x, taps=[])`` appends one (activation, output) pair per probe point, in the order of
#: ``Built.layers``: the probe reads h from the forward pass itself instead of through module
#: hooks (a hooked module takes PyTorch's slow call path: 3 % of relu-30-he's step).
Taps = list | None
