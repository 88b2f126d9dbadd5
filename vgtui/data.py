"""Training data as random-access batch sources: batch ``i`` is the same for the same seed.

Random access (rather than an iterator) is what makes "switch preset, same batches" and side by
side comparisons exact: two runs with one seed read identical batches step for step.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

INPUT_DIM = 784
NUM_CLASSES = 10
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """Data that cannot be had (missing files, offline download): one line for the user."""


class SyntheticData:
    """MNIST-shaped (784 inputs, 10 classes), generated in-process, deterministic by seed.

    Each class is a smooth 28x28 prototype made of a few Gaussian blobs; a sample is its class
    prototype, randomly shifted in brightness and mixed with a distractor class and pixel noise.
    A healthy network learns it within a few hundred steps; a vanishing one sits at ln(10).
    """

    def __init__(self, seed: int, batch_size: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(10_007 + seed)
        ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        protos = torch.zeros(NUM_CLASSES, 28, 28)
        for c in range(NUM_CLASSES):
            for _ in range(4):
                cy, cx = torch.rand(2, generator=gen) * 20 + 4
                width = 2.0 + torch.rand(1, generator=gen).item() * 3.0
                protos[c] += torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * width**2))
        protos /= protos.amax(dim=(1, 2), keepdim=True)
        self.prototypes = protos.reshape(NUM_CLASSES, INPUT_DIM).to(self.device)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        n = self.batch_size
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        distractor = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        brightness = 0.6 + 0.4 * torch.rand(n, 1, generator=gen)
        mix = 0.45 * torch.rand(n, 1, generator=gen)
        noise = 0.25 * torch.randn(n, INPUT_DIM, generator=gen)
        protos = self.prototypes.cpu()
        x = brightness * protos[labels] + mix * protos[distractor] + noise
        x = x.clamp_(0.0, 1.0)
        return x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class TensorData:
    """A dataset held as tensors; batch ``i`` comes from a per-epoch permutation seeded by seed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int,
                 device: torch.device | str = "cpu"):
        self.images = images.reshape(len(images), -1).float().div_(255.0).to(device)
        self.labels = labels.long().to(device)
        self.seed = seed
        self.batch_size = min(batch_size, len(self.images))
        self.per_epoch = len(self.images) // self.batch_size
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(len(self.images), generator=gen).to(self.images.device)
            self._epoch = epoch
        idx = self._perm[within * self.batch_size : (within + 1) * self.batch_size]
        return self.images[idx], self.labels[idx]


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (optionally gzipped), the format MNIST and Fashion-MNIST ship in."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = 1
    for d in dims:
        count *= d
    if len(body) != count:
        raise DataError(f"{path}: truncated IDX file ({len(body)} of {count} bytes)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: no {stem}[.gz]; install Debian's dataset-fashion-mnist or pass --data-root"
    )


def load_fashion_mnist(root: Path | None, seed: int, batch_size: int, device) -> TensorData:
    root = Path(root) if root else FASHION_MNIST_DIR
    images = read_idx(_find(root, "train-images-idx3-ubyte"))
    labels = read_idx(_find(root, "train-labels-idx1-ubyte"))
    return TensorData(images, labels, seed, batch_size, device)


def load_mnist(root: Path | None, seed: int, batch_size: int, device, download: bool) -> TensorData:
    """MNIST through torchvision; downloads only when asked, with a clear error when offline."""
    from torchvision.datasets import MNIST

    root = Path(root) if root else Path.home() / ".cache" / "vgtui" / "mnist"
    try:
        dataset = MNIST(str(root), train=True, download=download)
    except RuntimeError as exc:
        if not download:
            raise DataError(f"{root}: MNIST not found; pass --download to fetch it (needs internet)") from None
        raise DataError(f"MNIST download failed ({exc}); are you online?") from None
    except OSError as exc:
        raise DataError(f"MNIST download failed ({exc}); are you online?") from None
    return TensorData(dataset.data, dataset.targets, seed, batch_size, device)


def make_data(name: str, seed: int, batch_size: int, device, root: Path | None = None,
              download: bool = False):
    if name == "synthetic":
        return SyntheticData(seed, batch_size, device)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, seed, batch_size, device)
    if name == "mnist":
        return load_mnist(root, seed, batch_size, device, download)
    raise DataError(f"unknown data set {name!r}")
