"""A rank's or micro-batch's share of a global batch: the samplers draw the whole batch of a
step from (seed, step) and hand out rows of it, so the math does not depend on the world size
or on gradient accumulation."""

from __future__ import annotations

import hashlib

import torch


def batch_rows(batch: int, start: int = 0, count: int | None = None) -> slice:
    """Rows ``[start, start + count)`` (``count=None``: to the end) of a global batch of
    ``batch`` rows; ``ValueError`` for a selection outside it."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    count = batch - start if count is None else count
    if start < 0 or count < 1 or start + count > batch:
        raise ValueError(f"start={start}, count={count} must select rows of a batch of {batch}")
    return slice(start, start + count)


def seeded_generator(*keys: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``keys`` (e.g. ``(seed, "augment", step)``), so a
    draw is a function of those keys alone and distinct keys give unrelated streams."""
    text = ":".join(str(key) for key in keys)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
