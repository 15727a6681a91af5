"""Fashion-MNIST: 70,000 grey-scale 28x28 images of Zalando articles in 10 classes, for the
image (diffusion, DiT) and vision tasks.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747) has 60,000 training and 10,000
test images, each ``28 x 28`` uint8 pixels (0 the background .. 255 the brightest), with a
label in ``0..9`` naming one of :data:`CLASSES`. Its licence is MIT (Expat), (c) 2017 Zalando
SE.

The data come from the Debian package ``dataset-fashion-mnist`` (31 MB), which installs the
four gzipped idx files under ``/usr/share/datasets/fashion-mnist``. They are read there when
the package is installed, else fetched once without root with ``apt-get download`` into
``<cache>/debian/dataset-fashion-mnist`` (:mod:`subq.tasks.packages`); or from the user's own
folder (``data=DIR``, ``--data DIR``) holding the same four files, gzipped or not.

The idx format (LeCun et al., the MNIST distribution format) is big-endian: two zero bytes,
a type code (``0x08``: unsigned byte, the only one these files use), the number of dimensions
``d``, then ``d`` uint32 sizes, then the values in row-major order. Images are ``idx3``
``(N, 28, 28)``, labels ``idx1`` ``(N,)``.

For training, :meth:`FashionMNIST.as_tensors` gives float images ``(N, 1, 28, 28)`` scaled to
``[-1, 1]`` (the diffusion convention) and int64 labels, and :class:`ImageSampler` draws the
batch of a step as a function of ``(seed, step)`` alone, so a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .batches import batch_rows, seeded_generator
from .packages import Download, debian_package_root

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
"""Where the package keeps the idx files, relative to its root."""
FASHION_MNIST_MARKER = f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"
"""The path (relative to the root) that tells the package is there; only it provides this."""

IMAGE_SIZE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
"""Class names by label, as Xiao et al. 2017 give them."""

SPLITS = ("train", "test")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The standard file names (without ``.gz``) of the four idx files."""

IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"

DATA_HINT = ("pass a folder holding the four idx files (" + ", ".join(IDX_FILES.values())
             + ", each optionally .gz) with --data DIR")


def parse_idx(raw: bytes, name: str = "idx data") -> torch.Tensor:
    """The uint8 tensor that idx bytes ``raw`` hold, shaped by their header.

    Raises ``ValueError`` naming ``name`` when the magic number is wrong (not two zero bytes
    then type ``0x08``), the header is short, or the values are fewer or more than the
    sizes say (a truncated or padded file).
    """
    if len(raw) < 4:
        raise ValueError(f"{name}: {len(raw)} bytes, too short for an idx header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise ValueError(f"{name}: bad idx magic number 0x{raw[:4].hex()}; expected "
                         f"0x0000{IDX_UBYTE:02x}NN (unsigned bytes, NN dimensions)")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if ndim == 0 or len(raw) < start:
        raise ValueError(f"{name}: idx header of {ndim} dimensions is truncated or empty "
                         f"({len(raw)} bytes)")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 1
    for size in shape:
        expected *= size
    if len(raw) - start != expected:
        state = "truncated" if len(raw) - start < expected else "has trailing bytes"
        raise ValueError(f"{name}: {state}: shape {tuple(shape)} needs {expected} value bytes, "
                         f"the file has {len(raw) - start}")
    values = torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8) if expected else (
        torch.empty(0, dtype=torch.uint8))
    return values.reshape(shape)


def read_idx(path: str | Path) -> torch.Tensor:
    """The uint8 tensor of the idx file ``path``, gzipped (recognised by its magic bytes, not
    its name) or raw; see :func:`parse_idx`. A broken gzip stream raises ``ValueError`` too."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from err
    return parse_idx(raw, str(path))


def encode_idx(values: torch.Tensor) -> bytes:
    """The idx bytes of a uint8 tensor (the inverse of :func:`parse_idx`; meant for small
    tensors, e.g. test files)."""
    if values.dtype != torch.uint8 or values.dim() < 1:
        raise ValueError(f"idx needs a uint8 tensor of >= 1 dimension, got {values.dtype} "
                         f"{tuple(values.shape)}")
    header = bytes([0, 0, IDX_UBYTE, values.dim()]) + b"".join(
        int(size).to_bytes(4, "big") for size in values.shape)
    return header + bytes(values.flatten().tolist())


def idx_path(folder: Path, stem: str) -> Path:
    """``folder/stem`` when present, else ``folder/stem.gz``; ``FileNotFoundError`` if neither."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {stem} or {stem}.gz in {folder}; Fashion-MNIST needs "
                            f"{', '.join(IDX_FILES.values())} (each optionally .gz)")


@dataclass(frozen=True)
class FashionMNIST:
    """The data set: ``*_images`` uint8 ``(N, 28, 28)`` (0 background .. 255), ``*_labels``
    int64 ``(N,)`` in ``0..9`` indexing ``classes``; ``source`` says where it was read."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``"train"`` or ``"test"``, as stored."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")

    def as_tensors(self, split: str, *, normalise: bool = True,
                   device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``split`` for training: images float32 ``(N, 1, 28, 28)``
        (one channel), labels int64 ``(N,)``, on ``device``.

        With ``normalise`` (default) pixels ``p`` become ``p / 127.5 - 1`` in ``[-1, 1]``, the
        scale diffusion models (DDPM, DiT) use; without it ``p / 255`` in ``[0, 1]``.
        :func:`to_uint8` undoes either.
        """
        images, labels = self.split(split)
        images = images.to(device=device, dtype=torch.float32).unsqueeze(1)
        images = images / 127.5 - 1 if normalise else images / 255
        return images, labels.to(device)


def to_uint8(images: torch.Tensor, *, normalised: bool = True) -> torch.Tensor:
    """Float images back to uint8 pixels (e.g. to save samples): from ``[-1, 1]`` when
    ``normalised``, else from ``[0, 1]``; values outside the range are clipped."""
    scaled = (images.float() + 1) * 127.5 if normalised else images.float() * 255
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _check_split(images: torch.Tensor, labels: torch.Tensor, split: str, where: str) -> None:
    if images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{where}: {split} images have shape {tuple(images.shape)}, expected "
                         f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: {split} labels have shape {tuple(labels.shape)}, expected "
                         f"({images.shape[0]},), one per image")
    if labels.numel() and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{where}: {split} labels reach {int(labels.max())}, expected "
                         f"0..{len(CLASSES) - 1}")


def read_fashion_mnist(folder: str | Path, source: str | None = None) -> FashionMNIST:
    """The data set from the four idx files in ``folder`` (standard names, each raw or
    ``.gz``; :data:`IDX_FILES`). Checks shapes, matching counts and labels in ``0..9``
    (``ValueError``); any number of images per split is accepted."""
    folder = Path(folder)
    tensors = {key: read_idx(idx_path(folder, stem)) for key, stem in IDX_FILES.items()}
    for split in SPLITS:
        _check_split(tensors[f"{split}_images"], tensors[f"{split}_labels"], split, str(folder))
        tensors[f"{split}_labels"] = tensors[f"{split}_labels"].long()
    return FashionMNIST(**tensors, classes=CLASSES, source=source or str(folder))


def fashion_mnist_folder(*, fetch: bool = True, download: Download | None = None,
                         cache: Path | None = None) -> Path:
    """The folder holding the ``dataset-fashion-mnist`` package's idx files: installed under
    ``/``, else in subq's cache, fetched there once when ``fetch``
    (:func:`~subq.tasks.packages.debian_package_root`, whose ``download`` and ``cache`` these
    are). Raises ``FileNotFoundError`` naming the package and ``--data DIR`` otherwise."""
    root = debian_package_root(FASHION_MNIST_PACKAGE, FASHION_MNIST_MARKER, cache=cache,
                               download=download, fetch=fetch, hint=DATA_HINT)
    return root / FASHION_MNIST_DIR


def load_fashion_mnist(data: str | Path | None = None, *, fetch: bool = True,
                       download: Download | None = None, cache: Path | None = None
                       ) -> FashionMNIST:
    """Fashion-MNIST from the user's folder ``data`` (:func:`read_fashion_mnist`) when given,
    else from the Debian package (:func:`fashion_mnist_folder`: installed, cached, or fetched
    once with ``apt-get download`` when ``fetch``; ``download`` replaces that fetcher).

    Raises ``FileNotFoundError`` naming ``apt-get install dataset-fashion-mnist`` and
    ``--data DIR`` when neither is available, ``ValueError`` naming the file when one is
    malformed.
    """
    if data is not None:
        if not Path(data).is_dir():
            raise FileNotFoundError(f"no folder at {data}; {DATA_HINT}")
        return read_fashion_mnist(data)
    folder = fashion_mnist_folder(fetch=fetch, download=download, cache=cache)
    return read_fashion_mnist(folder, source=f"{FASHION_MNIST_PACKAGE} ({folder})")


class ImageSampler:
    """Training batches of ``(images, labels)`` rows, stateless per step.

    The images are read in epochs: epoch ``e`` is a permutation of the ``N`` rows drawn from a
    generator seeded by ``(seed, e)`` alone, the epochs are laid end to end, and step ``s``'s
    global batch of ``B`` is positions ``[s * B, (s + 1) * B)`` of that stream. So a batch is a
    function of ``(seed, step)`` (for a given ``B``), a resumed run sees the same batches, and
    each run of ``N / B`` steps shows every image once. Each data-parallel rank or
    gradient-accumulation micro-batch takes its rows ``[start, start + count)`` of the batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        if images.dim() < 1 or images.shape[0] < 1:
            raise ValueError(f"need at least one image, got shape {tuple(images.shape)}")
        if labels.shape[:1] != images.shape[:1]:
            raise ValueError(f"{images.shape[0]} images but labels of shape "
                             f"{tuple(labels.shape)}")
        self.images, self.labels, self.seed = images, labels, seed
        self._epoch: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The row order ``(N,)`` of epoch ``epoch`` (the last one is kept for reuse)."""
        if self._epoch is None or self._epoch[0] != epoch:
            n = self.images.shape[0]
            order = torch.randperm(n, generator=seeded_generator(self.seed, "epoch", epoch))
            self._epoch = (epoch, order)
        return self._epoch[1]

    def indices(self, step: int, batch: int) -> torch.Tensor:
        """The ``batch`` row indices ``(batch,)`` of step ``step``'s global batch."""
        if batch < 1 or step < 0:
            raise ValueError(f"need step >= 0 and batch >= 1, got step={step}, batch={batch}")
        n, position, stop = self.images.shape[0], step * batch, (step + 1) * batch
        parts = []
        while position < stop:
            epoch, offset = divmod(position, n)
            take = min(stop - position, n - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            position += take
        return torch.cat(parts)

    def batch(self, step: int, batch: int, *, start: int = 0, count: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, start + count)`` (default: to the end) of step ``step``'s global
        batch of ``batch``: ``(images, labels)`` indexed from the tensors given, on their
        device."""
        rows = self.indices(step, batch)[batch_rows(batch, start, count)]
        return self.images[rows.to(self.images.device)], self.labels[rows.to(self.labels.device)]
