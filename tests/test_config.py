"""Presets: every built-in loads and trains; bad files give one line naming file and key, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgtui.cli import main
from vgtui.config import (
    CATALOGUE_ORDER,
    Preset,
    PresetError,
    builtin_names,
    load_preset,
    load_preset_file,
    preset_from_dict,
)

REPO = Path(__file__).resolve().parent.parent

REQUIRED = [
    "sigmoid-deep", "tanh-deep", "relu-default", "relu-he", "leaky-relu", "elu", "swish",
    "sigmoid-batchnorm", "sigmoid-residual", "sigmoid-xavier", "init-too-small", "exploding",
    "exploding-clipped", "clip-by-value", "shallow", "relu-30-xavier", "relu-30-he",
    "autoencoder-sigmoid", "autoencoder-relu", "autoencoder-sigmoid-pretrained",
    "rnn-tanh", "lstm", "gru", "rnn-orthogonal", "rnn-exploding", "rnn-clipped",
    "cnn-plain", "cnn-residual", "cnn-sigmoid",
]


def test_every_required_preset_ships_with_a_description():
    names = builtin_names()
    assert set(REQUIRED) <= set(names)
    assert set(names) <= set(CATALOGUE_ORDER), "add new presets to CATALOGUE_ORDER"
    for name in names:
        preset = load_preset(name)
        assert preset.name == name
        assert 10 < len(preset.description) <= 120, name


def test_sigmoid_deep_is_exactly_the_seed_network():
    p = load_preset("sigmoid-deep")
    assert (p.task, p.depth, p.width, p.activation, p.init) == ("classifier", 5, 1000, "sigmoid", "default")
    assert (p.optimizer, p.lr, p.momentum, p.batch_size, p.data) == ("sgd", 0.01, 0.9, 100, "synthetic")


@pytest.mark.parametrize(
    "text,key,fragment",
    [
        ("depth = 0", "depth", "1..1000"),
        ("depth = 2.5", "depth", "integer"),
        ("depth = true", "depth", "integer"),
        ("activation = 'softmax'", "activation", "sigmoid, tanh, relu"),
        ("lr = -1", "lr", "(0, 100]"),
        ("lr = nan", "lr", "number"),
        ("batch_norm = 1", "batch_norm", "true or false"),
        ("colour = 'red'", "colour", "unknown key"),
        ("[model]\ndepth = 3", "model", "unknown key"),
        ("clip = 'norm'\nclip_threshold = 0", "clip_threshold", "(0,"),
        ("task = 'classifier'\npretrain_steps = 10", "pretrain_steps", "autoencoder"),
        # networks and the recurrent keys
        ("network = 'transformer'", "network", "mlp, cnn, rnn"),
        ("network = 'cnn'\ntask = 'autoencoder'", "network", '"mlp"'),
        ("network = 'cnn'\nskip = true\ndepth = 6", "depth", "odd"),
        ("network = 'rnn'", "network", "recall"),
        ("network = 'rnn'\ndata = 'fashion-mnist'", "data", "recall"),
        ("data = 'recall'", "data", "image data set"),
        ("network = 'rnn'\ndata = 'recall'\ncell = 'lstmm'", "cell", "rnn_tanh, rnn_relu, lstm, gru"),
        ("network = 'rnn'\ndata = 'recall'\nseq_len = 0", "seq_len", "1..100000"),
        ("network = 'rnn'\ndata = 'recall'\nseq_len = 2.5", "seq_len", "integer"),
        ("network = 'rnn'\ndata = 'recall'\nrecurrent_init = 'identity'", "recurrent_init",
         "default, orthogonal, spectral"),
        ("network = 'rnn'\ndata = 'recall'\nrecurrent_init = 'spectral'\nspectral_radius = 0",
         "spectral_radius", "(0, 100]"),
        ("network = 'rnn'\ndata = 'recall'\nspectral_radius = 2.0", "spectral_radius",
         'recurrent_init = "spectral"'),
        ("network = 'rnn'\ndata = 'recall'\ncell = 'gru'\nforget_bias = 'high'", "forget_bias", "number"),
        ("network = 'rnn'\ndata = 'recall'\ncell = 'lstm'\nforget_bias = inf", "forget_bias", "[-100, 100]"),
        ("network = 'rnn'\ndata = 'recall'\nbatch_norm = true", "batch_norm", "not supported"),
        ("network = 'rnn'\ndata = 'recall'\nforget_bias = 3", "forget_bias", 'cell = "lstm" or "gru"'),
        ("cell = 'lstm'", "cell", 'network = "rnn" only'),
        ("network = 'cnn'\nseq_len = 20", "seq_len", 'network = "rnn" only'),
        # held-out evaluation
        ("eval_every = -1", "eval_every", "0..1000000"),
        ("eval_every = 2.5", "eval_every", "integer"),
        ("eval_every = true", "eval_every", "integer"),
        ("eval_batches = 0", "eval_batches", "1..100"),
        ("eval_batches = 1000", "eval_batches", "1..100"),
        ("eval_batches = 'all'", "eval_batches", "integer"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(PresetError) as err:
        load_preset_file(path)
    message = str(err.value)
    assert err.value.key == key
    assert message.startswith(f"{path}: {key}: ")
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"", "empty"),
        (b"depth = [", "not valid TOML"),
        (b"\xff\xfe\x00garbage\x00", "not UTF-8"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path, content, fragment):
    path = tmp_path / "p.toml"
    path.write_bytes(content)
    with pytest.raises(PresetError) as err:
        load_preset_file(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(PresetError, match="no such file"):
        load_preset(tmp_path / "nope.toml")
    with pytest.raises(PresetError, match="no such preset"):
        load_preset("no-such-preset")


def test_recurrent_and_conv_keys_load(tmp_path):
    path = tmp_path / "seq.toml"
    path.write_text('network = "rnn"\ndata = "recall"\ncell = "gru"\nseq_len = 80\nwidth = 32\n'
                    'recurrent_init = "spectral"\nspectral_radius = 1.5\nforget_bias = 2\n')
    p = load_preset_file(path)
    assert (p.network, p.cell, p.seq_len, p.width, p.recurrent_init, p.spectral_radius, p.forget_bias) == \
        ("rnn", "gru", 80, 32, "spectral", 1.5, 2.0)
    assert p.replace(seq_len=10).seq_len == 10  # replace re-validates every key, cross-key rules included
    assert load_preset("cnn-residual").replace(depth=21).depth == 21


def test_eval_keys_load_with_defaults(tmp_path):
    path = tmp_path / "eval.toml"
    path.write_text("eval_every = 0\neval_batches = 10\n")
    p = load_preset_file(path)
    assert (p.eval_every, p.eval_batches) == (0, 10)
    assert (load_preset("relu-he").eval_every, load_preset("relu-he").eval_batches) == (100, 4)


def test_cli_bad_eval_key_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad-eval.toml"
    path.write_text("eval_batches = 0\n")
    assert main(["run", "--preset", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: eval_batches: " in err and "Traceback" not in err


def test_cli_bad_recurrent_key_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad-rnn.toml"
    path.write_text('network = "rnn"\ndata = "recall"\ncell = "transformer"\n')
    assert main(["run", "--preset", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: cell: " in err and "Traceback" not in err


def test_cli_exit_code_2_and_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("width = 'wide'\n")
    assert main(["run", "--preset", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width" in err and str(path) in err and "Traceback" not in err
    assert main(["--preset", "no-such"]) == 2
    assert main(["run", "--steps", "0"]) == 2


# Values of every TOML type, including ones no key accepts.
toml_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)
keys = st.sampled_from([f.name for f in Preset.__dataclass_fields__.values()] + ["depht", "Model", "x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, toml_values, max_size=6))
def test_generated_presets_validate_or_fail_in_one_line(data):
    """Every generated table is either a valid Preset or one PresetError naming a key."""
    try:
        preset = preset_from_dict(data, source="gen.toml")
    except PresetError as err:
        message = str(err)
        assert message.startswith("gen.toml")
        assert "\n" not in message
        assert err.key is None or err.key in data or err.key in ("code_width", "pretrain_steps", "skip", "network", "depth")
    else:
        assert isinstance(preset, Preset)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_generated_garbage_files_never_escape_as_tracebacks(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("g") / "g.toml"
    path.write_bytes(blob)
    try:
        load_preset_file(path)
    except PresetError as err:
        assert "\n" not in str(err)


def test_cli_process_prints_no_traceback(tmp_path):
    """The real process: one line on stderr, exit 2 (no torch import needed to say so)."""
    path = tmp_path / "broken.toml"
    path.write_bytes(b"depth = \x00\x01")
    proc = subprocess.run([sys.executable, "-m", "vgtui", "run", "--preset", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_presets_ship_inside_an_installed_package(tmp_path):
    """A non-editable install (wheel layout) lists the presets from any directory."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    assert (target / "vgtui" / "presets" / "sigmoid-deep.toml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "vgtui", "presets"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sigmoid-deep" in proc.stdout and "relu-30-he" in proc.stdout
