"""Data: synthetic is deterministic and learnable; IDX files are read exactly; offline is explicit."""

import gzip
import struct

import pytest
import torch

from vgtui.data import FASHION_MNIST_DIR, DataError, SyntheticData, load_fashion_mnist, load_mnist, read_idx


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
