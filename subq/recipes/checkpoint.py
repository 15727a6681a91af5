"""Atomic checkpoints: write to a temporary file in the same folder, then rename over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash mid-save never leaves a
truncated checkpoint and a resume always finds the last complete one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
"""The file name of a run's checkpoint inside its folder."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_if_exists(path: str | os.PathLike, map_location: Any = "cpu") -> Any | None:
    """The object saved at ``path``, or ``None`` when there is no checkpoint yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)


def evaluated_weights(saved: dict[str, Any]) -> dict[str, Any]:
    """The state dict a trained run's evaluations scored: the weights' moving average when
    the run kept one (``ema``), else the weights."""
    return saved["ema"] if "ema" in saved else saved["model"]


def read_run(checkpoint: str | os.PathLike, hint: str) -> tuple[Path, dict[str, Any]]:
    """``(path, saved)`` of a training run's checkpoint, given the run folder ``OUT`` or
    ``OUT/checkpoint.pt``; ``FileNotFoundError`` naming the path and ``hint`` (how to make
    one) when there is none."""
    path = Path(checkpoint)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; {hint}")
    return path, torch.load(path, map_location="cpu", weights_only=False)
