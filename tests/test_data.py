"""Data: synthetic is deterministic and learnable; IDX files are read exactly; offline is explicit."""

import gzip
import struct

import pytest
import torch

from vgtui.config import load_preset
from vgtui.data import (
    FASHION_MNIST_DIR,
    DataError,
    RecallData,
    SyntheticData,
    heldout_batches,
    load_fashion_mnist,
    load_mnist,
    make_data,
    read_idx,
)

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() or \
    (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists()


def test_synthetic_is_deterministic_by_seed_and_mnist_shaped():
    a, b, c = SyntheticData(3, 50), SyntheticData(3, 50), SyntheticData(4, 50)
    xa, ya = a.batch(17)
    xb, yb = b.batch(17)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, c.batch(17)[0])
    assert xa.shape == (50, 784) and xa.min() >= 0 and xa.max() <= 1
    assert set(ya.tolist()) <= set(range(10))


def test_synthetic_is_learnable():
    """A linear classifier gets well above chance within 200 steps: the classes carry signal."""
    data = SyntheticData(0, 100)
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(200):
        x, y = data.batch(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = data.batch(10_000)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6


def write_idx(path, array: torch.Tensor):
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.to(torch.uint8).numpy().tobytes())


def test_idx_reader_round_trip_and_damage(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), dtype=torch.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    data = load_fashion_mnist(tmp_path, seed=0, batch_size=3, device="cpu")
    x, y = data.batch(0)
    assert x.shape == (3, 784) and float(x.max()) <= 1.0
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, 0, 10, "cpu")


def test_mnist_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_mnist(tmp_path, 0, 10, "cpu", download=False)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package():
    data = load_fashion_mnist(None, seed=0, batch_size=100, device="cpu")
    assert data.images.shape == (60_000, 784)
    x, y = data.batch(0)
    assert x.shape == (100, 784) and y.shape == (100,)
    assert torch.equal(x, load_fashion_mnist(None, 0, 100, "cpu").batch(0)[0])


def test_recall_is_deterministic_and_labelled_by_its_first_symbol():
    a, b, c = RecallData(3, 16, 40), RecallData(3, 16, 40), RecallData(4, 16, 40)
    x, y = a.batch(5)
    assert torch.equal(x, b.batch(5)[0]) and torch.equal(y, b.batch(5)[1])
    assert not torch.equal(x, c.batch(5)[0]) and not torch.equal(x, a.batch(6)[0])
    assert x.shape == (16, 40, 11) and y.shape == (16,) and y.dtype == torch.long
    assert torch.equal(x[..., :10].sum(-1), torch.ones(16, 40))  # one-hot symbols
    assert torch.equal(x[:, 0, :10].argmax(-1), y)
    assert torch.equal(x[..., 10].sum(0), torch.tensor([16.0] + [0.0] * 39))  # the marker: first step only
    assert len(set(y.tolist())) > 3  # the label varies


def _rows(batches) -> set[bytes]:
    return {row.numpy().tobytes() for x, _ in batches for row in x.reshape(len(x), -1)}


@pytest.mark.parametrize("name", ["lstm", "sigmoid-deep"])
def test_heldout_batches_are_fixed_and_never_drawn_for_training(name):
    preset = load_preset(name).replace(batch_size=20)
    held = heldout_batches(preset, 3)
    again = heldout_batches(preset, 3)
    assert len(held) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(held, again))
    train = make_data(preset.data, preset.seed, preset.batch_size, "cpu", seq_len=preset.seq_len)
    assert held[0][0].shape == train.batch(0)[0].shape
    assert not _rows(held) & _rows(train.batch(i) for i in range(200))
    other_seed = heldout_batches(preset.replace(seed=1), 1)
    assert not torch.equal(other_seed[0][0], held[0][0])


def test_synthetic_heldout_is_the_same_task():
    train, held = SyntheticData(2, 10), SyntheticData(2, 10, split="heldout")
    assert torch.equal(train.prototypes, held.prototypes)


def test_heldout_asks_for_a_known_split():
    with pytest.raises(ValueError, match="split"):
        make_data("synthetic", 0, 10, "cpu", split="test")
    assert heldout_batches(load_preset("lstm"), 0) == []


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_heldout_is_its_test_set_in_order():
    preset = load_preset("cnn-plain").replace(data="fashion-mnist", batch_size=4000)
    held = heldout_batches(preset, 5)
    assert len(held) == 2  # 10,000 test images hold two whole batches of 4,000
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(held[1][0], images[4000:8000].reshape(4000, -1).float() / 255)
    assert torch.equal(held[1][1], labels[4000:8000].long())
