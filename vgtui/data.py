"""Training data as random-access batch sources: batch ``i`` is the same for the same seed.

Random access (rather than an iterator) is what makes "switch preset, same batches" and side by
side comparisons exact: two runs with one seed read identical batches step for step.

Every built-in data set also has a held-out split (:func:`heldout_batches`): for the generated
ones fresh draws from a seed stream that training never reads, for Fashion-MNIST and MNIST their
test sets.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

INPUT_DIM = 784
NUM_CLASSES = 10
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The recall task's alphabet: one-hot symbols, the label being the first symbol of the sequence.
RECALL_SYMBOLS = NUM_CLASSES
#: Recall inputs: the one-hot symbol plus a marker channel that is 1 on the symbol to remember.
RECALL_INPUTS = RECALL_SYMBOLS + 1
_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF
SPLITS = ("train", "heldout")


def _batch_seed(seed: int, index: int, split: str) -> int:
    """The generator seed of batch ``index``. Training counts up from the seed's base, held-out
    down from base - 1: torch's CPU generator keeps only the low 32 bits of a seed, so the two
    streams meet only after 2^32 batches."""
    offset = index if split == "train" else -1 - index
    return (seed * 1_000_003 + offset) & _SEED_MASK


class DataError(RuntimeError):
    """Data that cannot be had (missing files, offline download): one line for the user."""


class SyntheticData:
    """MNIST-shaped (784 inputs, 10 classes), generated in-process, deterministic by seed.

    Each class is a smooth 28x28 prototype made of a few Gaussian blobs; a sample is its class
    prototype, randomly shifted in brightness and mixed with a distractor class and pixel noise.
    A healthy network learns it within a few hundred steps; a vanishing one sits at ln(10).
    """

    def __init__(self, seed: int, batch_size: int, device: torch.device | str = "cpu", split: str = "train"):
        self.seed = seed
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.split = split
        # The prototypes (the task itself) depend on the seed only: both splits share them.
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
        gen = torch.Generator().manual_seed(_batch_seed(self.seed, index, self.split))
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


class RecallData:
    """Sequences of ``seq_len`` random symbols (one-hot over ``RECALL_SYMBOLS``) whose label is the
    FIRST symbol, marked by an extra input channel (1 there, 0 elsewhere: a network can tell what
    to keep). Every later symbol is a distractor from the same alphabet, so the answer depends on
    an input ``seq_len - 1`` steps back and nothing else: the gradient that could teach it has to
    travel back through every step. Chance is 1/10 (loss ln 10). Generated in-process,
    deterministic by seed; x is (batch, seq_len, RECALL_INPUTS), y is (batch,).
    """

    def __init__(self, seed: int, batch_size: int, seq_len: int, device: torch.device | str = "cpu",
                 split: str = "train"):
        self.seed = seed
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.split = split

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_batch_seed(self.seed, index, self.split))
        symbols = torch.randint(0, RECALL_SYMBOLS, (self.batch_size, self.seq_len), generator=gen)
        x = torch.nn.functional.one_hot(symbols, RECALL_INPUTS).float()
        x[:, 0, RECALL_SYMBOLS] = 1.0
        return x.to(self.device, non_blocking=True), symbols[:, 0].to(self.device, non_blocking=True)


class TensorData:
    """A dataset held as tensors; batch ``i`` comes from a per-epoch permutation seeded by seed
    (``shuffle=False``: the file's own order, as a fixed evaluation set wants)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int,
                 device: torch.device | str = "cpu", shuffle: bool = True):
        self.images = images.reshape(len(images), -1).float().div_(255.0).to(device)
        self.labels = labels.long().to(device)
        self.seed = seed
        self.batch_size = min(batch_size, len(self.images))
        self.per_epoch = len(self.images) // self.batch_size
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, within = divmod(index, self.per_epoch)
        if not self.shuffle:
            rows = slice(within * self.batch_size, (within + 1) * self.batch_size)
            return self.images[rows], self.labels[rows]
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


def load_fashion_mnist(root: Path | None, seed: int, batch_size: int, device,
                       split: str = "train") -> TensorData:
    """Fashion-MNIST's 60,000 training images, or (``split="heldout"``) its 10,000 t10k test
    images in file order."""
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    return TensorData(images, labels, seed, batch_size, device, shuffle=split == "train")


def load_mnist(root: Path | None, seed: int, batch_size: int, device, download: bool,
               split: str = "train") -> TensorData:
    """MNIST through torchvision (held out: its test set, in order); downloads only when asked,
    with a clear error when offline."""
    from torchvision.datasets import MNIST

    root = Path(root) if root else Path.home() / ".cache" / "vgtui" / "mnist"
    try:
        dataset = MNIST(str(root), train=split == "train", download=download)
    except RuntimeError as exc:
        if not download:
            raise DataError(f"{root}: MNIST not found; pass --download to fetch it (needs internet)") from None
        raise DataError(f"MNIST download failed ({exc}); are you online?") from None
    except OSError as exc:
        raise DataError(f"MNIST download failed ({exc}); are you online?") from None
    return TensorData(dataset.data, dataset.targets, seed, batch_size, device, shuffle=split == "train")


def make_data(name: str, seed: int, batch_size: int, device, root: Path | None = None,
              download: bool = False, *, seq_len: int = 50, split: str = "train"):
    """The batch source of data set ``name`` (``seq_len``: the recall task's sequence length)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "synthetic":
        return SyntheticData(seed, batch_size, device, split=split)
    if name == "recall":
        return RecallData(seed, batch_size, seq_len, device, split=split)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, seed, batch_size, device, split=split)
    if name == "mnist":
        return load_mnist(root, seed, batch_size, device, download, split=split)
    raise DataError(f"unknown data set {name!r}")


def heldout_batches(preset, n_batches: int, device: torch.device | str = "cpu", root: Path | None = None,
                    download: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches`` batches (``preset.batch_size`` each) of the preset's held-out split:
    the same batches on every call, so held-out numbers at different steps compare. Generated
    data: draws no training batch ever makes; Fashion-MNIST / MNIST: their test sets, in file
    order (fewer batches if the test set runs out). Load once and keep the list: a file-backed
    split reads its files on every call."""
    if n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    source = make_data(preset.data, preset.seed, preset.batch_size, device, root, download,
                       seq_len=preset.seq_len, split="heldout")
    available = getattr(source, "per_epoch", n_batches)
    return [source.batch(i) for i in range(min(n_batches, available))]
