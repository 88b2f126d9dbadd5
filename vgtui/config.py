"""Presets: TOML files of plain data, validated into a frozen :class:`Preset`.

A preset is the whole recipe of a run: which network, which data, which optimiser. Every key is
checked here, once, so that the rest of the engine can trust it; a bad file produces a
:class:`PresetError` whose message is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "silu")
#: Activations whose units can saturate (gradient ~0 near the asymptotes).
SATURATING = ("sigmoid", "tanh")
#: Activations whose units can die (output 0, or near-constant, for every input).
RECTIFYING = ("relu", "leaky_relu", "elu", "silu")
INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "normal",
)
TASKS = ("classifier", "autoencoder")
#: mlp: fully connected; cnn: 3x3 convolutions on 28x28 images; rnn: recurrent layers on sequences.
NETWORKS = ("mlp", "cnn", "rnn")
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
RECURRENT_INITS = ("default", "orthogonal", "spectral")
#: recall: sequences of random symbols whose label is the first one (generated, see data.py).
DATASETS = ("synthetic", "fashion-mnist", "mnist", "recall")
IMAGE_DATASETS = ("synthetic", "fashion-mnist", "mnist")
SEQUENCE_DATASETS = ("recall",)
CLIPS = ("none", "norm", "value")
OPTIMIZERS = ("sgd", "adam")

DEFAULT_PRESET = "sigmoid-deep"


class PresetError(ValueError):
    """A preset that cannot be used. ``str(err)`` is one line: ``file: key: what is allowed``."""

    def __init__(self, source: str, key: str | None, message: str):
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Preset:
    """A validated run recipe. Field defaults are what an omitted key means."""

    name: str = "custom"
    description: str = ""
    # model
    task: str = "classifier"
    network: str = "mlp"
    depth: int = 5  # mlp: hidden layers; cnn: conv layers; rnn: stacked recurrent layers
    width: int = 1000  # mlp: units; cnn: channels of the first stage; rnn: hidden size
    code_width: int = 32
    activation: str = "sigmoid"
    leaky_slope: float = 0.01
    batch_norm: bool = False
    skip: bool = False
    init: str = "default"
    init_std: float = 0.01
    bias_init: float = 0.0
    # recurrent networks (network = "rnn")
    cell: str = "rnn_tanh"
    seq_len: int = 50
    recurrent_init: str = "default"  # of the hidden-to-hidden weights
    spectral_radius: float = 1.0  # recurrent_init = "spectral": largest |eigenvalue| of each W_hh block
    forget_bias: float = 1.0  # LSTM forget gate / GRU update gate bias: > 0 keeps the past
    # data
    data: str = "synthetic"
    batch_size: int = 100
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: str = "none"
    clip_threshold: float = 1.0
    # autoencoder greedy layer-wise pre-training: steps per layer (0 = none)
    pretrain_steps: int = 0
    # run
    seed: int = 0
    sample_every: int = 1
    detail_every: int = 10  # activation stats, update ratios, histograms: every Nth sampled step
    # held-out evaluation: every eval_every steps (0 = never), on the first eval_batches batches of
    # the data set's held-out split; a bounded count keeps its share of wall time small
    eval_every: int = 100
    eval_batches: int = 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Preset":
        """A copy with some keys changed, validated like a file would be."""
        merged = {**self.to_dict(), **changes}
        return preset_from_dict(merged, source=f"<{self.name}>")


# key -> (type, check, what is allowed). bool is checked before int (bool is an int in Python).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "depth": (1, 1000),
    "width": (1, 65536),
    "code_width": (1, 65536),
    "batch_size": (1, 1_000_000),
    "pretrain_steps": (0, 10_000_000),
    "seed": (0, 2**63 - 1),
    "sample_every": (1, 1_000_000),
    "detail_every": (1, 1_000_000),
    "seq_len": (1, 100_000),
    "eval_every": (0, 1_000_000),
    "eval_batches": (1, 100),
}
_FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    # key: (low, high, low is exclusive)
    "leaky_slope": (0.0, 1.0, False),
    "init_std": (0.0, 100.0, True),
    "bias_init": (-100.0, 100.0, False),
    "lr": (0.0, 100.0, True),
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, 10.0, False),
    "clip_threshold": (0.0, 1e12, True),
    "spectral_radius": (0.0, 100.0, True),
    "forget_bias": (-100.0, 100.0, False),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "network": NETWORKS,
    "cell": CELLS,
    "recurrent_init": RECURRENT_INITS,
    "activation": ACTIVATIONS,
    "init": INITS,
    "data": DATASETS,
    "clip": CLIPS,
    "optimizer": OPTIMIZERS,
}
_BOOLS = ("batch_norm", "skip")
_STRINGS = ("name", "description")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _check_value(source: str, key: str, value: Any) -> Any:
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise PresetError(source, key, f"must be true or false, got {_type_name(value)}")
        return value
    if key in _STRINGS:
        if not isinstance(value, str):
            raise PresetError(source, key, f"must be a string, got {_type_name(value)}")
        if len(value) > 500:
            raise PresetError(source, key, "must be at most 500 characters")
        return value
    if key in _CHOICES:
        allowed = ", ".join(_CHOICES[key])
        if not isinstance(value, str) or value not in _CHOICES[key]:
            got = repr(value) if isinstance(value, str) else _type_name(value)
            raise PresetError(source, key, f"must be one of {allowed}; got {got}")
        return value
    if key in _INT_RANGES:
        low, high = _INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise PresetError(source, key, f"must be an integer in {low}..{high}, got {_type_name(value)}")
        if not low <= value <= high:
            raise PresetError(source, key, f"must be an integer in {low}..{high}, got {value}")
        return value
    if key in _FLOAT_RANGES:
        low, high, exclusive = _FLOAT_RANGES[key]
        bracket = "(" if exclusive else "["
        allowed = f"a number in {bracket}{low:g}, {high:g}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PresetError(source, key, f"must be {allowed}, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value) or value > high or value < low or (exclusive and value == low):
            raise PresetError(source, key, f"must be {allowed}, got {value:g}")
        return value
    known = ", ".join(f.name for f in fields(Preset))
    raise PresetError(source, key, f"unknown key (known keys: {known})")


def preset_from_dict(data: dict[str, Any], source: str = "<preset>") -> Preset:
    """Validate a mapping (a parsed TOML file) into a Preset, or raise PresetError."""
    if not isinstance(data, dict):
        raise PresetError(source, None, "must be a table of keys")
    values = {}
    for key, value in data.items():
        values[key] = _check_value(source, str(key), value)
    preset = Preset(**values)
    if preset.task == "autoencoder" and preset.code_width > preset.width:
        raise PresetError(source, "code_width", f"must be at most width ({preset.width}) for an autoencoder")
    if preset.pretrain_steps and preset.task != "autoencoder":
        raise PresetError(source, "pretrain_steps", "layer-wise pre-training needs task = \"autoencoder\"")
    if preset.network == "cnn" and preset.skip and preset.depth % 2 == 0:
        raise PresetError(source, "depth", "with skip = true a cnn has a stem conv and blocks of two convs: "
                          f"depth must be odd; got {preset.depth}")
    if preset.skip and preset.task == "autoencoder":
        raise PresetError(source, "skip", "skip connections are supported for the classifier task only")
    _check_network(preset, data, source)
    return preset


#: Keys that only a recurrent network reads; set to anything but their default elsewhere, they are
#: a mistake worth one line rather than a silently ignored value.
RECURRENT_KEYS = ("cell", "seq_len", "recurrent_init", "spectral_radius", "forget_bias")


def _check_network(preset: Preset, data: dict[str, Any], source: str) -> None:
    """The rules that tie network, data and the recurrent keys together."""
    network = preset.network
    if network != "mlp" and preset.task != "classifier":
        raise PresetError(source, "network", f'must be "mlp" for task = "{preset.task}"; got "{network}"')
    sequences = preset.data in SEQUENCE_DATASETS
    if (network == "rnn") != sequences:
        key = "data" if "data" in data else "network"
        wanted = "a sequence data set (recall)" if network == "rnn" else "an image data set (" + \
            ", ".join(IMAGE_DATASETS) + ")"
        raise PresetError(source, key,
                          f'network = "{network}" trains on {wanted}; got data = "{preset.data}"')
    defaults = Preset()
    if network != "rnn":
        for key in RECURRENT_KEYS:
            if getattr(preset, key) != getattr(defaults, key):
                raise PresetError(source, key, 'applies to network = "rnn" only')
        return
    for key in ("batch_norm", "skip"):
        if getattr(preset, key):
            raise PresetError(source, key, 'is not supported for network = "rnn"')
    if preset.spectral_radius != defaults.spectral_radius and preset.recurrent_init != "spectral":
        raise PresetError(source, "spectral_radius", 'applies to recurrent_init = "spectral" only')
    if preset.forget_bias != defaults.forget_bias and preset.cell not in ("lstm", "gru"):
        raise PresetError(source, "forget_bias",
                          f'applies to cell = "lstm" or "gru" only; got cell = "{preset.cell}"')


def load_preset_file(path: str | Path) -> Preset:
    """Read and validate one TOML preset file."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PresetError(source, None, "no such file") from None
    except IsADirectoryError:
        raise PresetError(source, None, "is a directory, not a preset file") from None
    except OSError as exc:
        raise PresetError(source, None, f"cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PresetError(source, None, "is not UTF-8 text (is it a TOML preset?)") from None
    if not text.strip():
        raise PresetError(source, None, "is empty; a preset needs at least a description")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(source, None, f"is not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    return preset_from_dict(data, source)


def _builtin_dir():
    """Installed wheels carry the presets as ``vgtui.presets``; an editable checkout reads ``presets/``."""
    try:
        return resources.files("vgtui.presets")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "presets"


def builtin_names() -> list[str]:
    """Names of the presets that ship with vgtui, in catalogue order."""
    names = [entry.name[:-5] for entry in _builtin_dir().iterdir() if entry.name.endswith(".toml")]
    return sorted(names, key=lambda n: (CATALOGUE_ORDER.index(n) if n in CATALOGUE_ORDER else 999, n))


#: The order the picker and `vgtui presets` show built-ins in; the first nine get number keys.
CATALOGUE_ORDER = [
    "sigmoid-deep",
    "relu-he",
    "sigmoid-batchnorm",
    "sigmoid-residual",
    "tanh-deep",
    "exploding",
    "exploding-clipped",
    "relu-30-xavier",
    "relu-30-he",
    "sigmoid-xavier",
    "relu-default",
    "leaky-relu",
    "elu",
    "swish",
    "init-too-small",
    "clip-by-value",
    "shallow",
    "relu-dead",
    "autoencoder-sigmoid",
    "autoencoder-sigmoid-pretrained",
    "autoencoder-relu",
    "rnn-tanh",
    "lstm",
    "gru",
    "rnn-orthogonal",
    "rnn-exploding",
    "rnn-clipped",
    "cnn-plain",
    "cnn-residual",
    "cnn-sigmoid",
]


def load_preset(name_or_path: str | Path) -> Preset:
    """A built-in preset by name, or a preset file by path."""
    text = str(name_or_path)
    candidate = Path(text)
    if text.endswith(".toml") or candidate.exists() or "/" in text:
        return load_preset_file(candidate)
    entry = _builtin_dir() / f"{text}.toml"
    if not entry.is_file():
        names = ", ".join(builtin_names())
        raise PresetError(text, None, f"no such preset (built-in presets: {names})")
    with resources.as_file(entry) as path:
        preset = load_preset_file(path)
    return preset


def all_builtin() -> list[Preset]:
    return [load_preset(name) for name in builtin_names()]
