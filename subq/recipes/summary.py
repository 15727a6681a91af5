"""What a finished or interrupted training run showed, read back from its folder
(``metrics.jsonl`` and ``checkpoint.pt``), for curves, reports and docs that outlive the run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from .trainer import CHECKPOINT, read_metrics


def summarise(run: str | Path) -> dict[str, Any]:
    """One run's points and settings: ``config`` (trainer and task settings), ``step``,
    ``train_seconds``, ``parameters``, ``median_tokens_per_s`` over the logged windows,
    ``loss`` as ``(step, loss)`` pairs, every evaluation entry (``evals``) and those of the
    last evaluated step (``latest``)."""
    run = Path(run)
    metrics = read_metrics(run)
    losses = [m for m in metrics if "loss" in m and "split" not in m]
    evals = [m for m in metrics if "split" in m]
    saved = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    last = max((e["step"] for e in evals), default=0)
    speeds = [m["tokens_per_s"] for m in losses]
    return {"run": run.name, "config": saved["config"], "step": saved["step"],
            "train_seconds": round(saved["seconds"], 1),
            "parameters": saved["parameters"],
            "median_tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "loss": [(m["step"], round(m["loss"], 5)) for m in losses],
            "evals": evals, "latest": [e for e in evals if e["step"] == last]}
