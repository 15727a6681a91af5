"""Tiny generated Fashion-MNIST-like idx files for the tests of the image recipes (never the
network, never the real data): each image is noise with a bright block whose brightness is
set by its class."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from subq.tasks.fashion_mnist import IDX_FILES, encode_idx


def write_tiny_fashion_mnist(folder: Path, n_train: int = 16, n_test: int = 8) -> Path:
    """The four gzipped idx files of ``n_train`` training and ``n_test`` test images in
    ``folder``; labels cycle through the 10 classes; returns ``folder``."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.arange(n, dtype=torch.uint8) % 10
        images = torch.randint(0, 64, (n, 28, 28), generator=g, dtype=torch.uint8)
        images[:, 8:20, 8:20] += (labels * 19).to(torch.uint8)[:, None, None]
        for key, values in (("images", images), ("labels", labels)):
            path = folder / f"{IDX_FILES[f'{split}_{key}']}.gz"
            path.write_bytes(gzip.compress(encode_idx(values)))
    return folder
