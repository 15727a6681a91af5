"""``torchrun`` data parallelism: two gloo processes train the same steps as one process on
the same global batch (each rank takes half of it; DDP averages the gradients), for the LM and
the recall recipe. The recall mixer is Mamba: HAX's ranking loss samples its key pairs per
batch, so its value depends on how the batch is split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from subq.recipes.trainer import read_metrics

from .test_lm import write_corpus

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _losses(prefix: list[str], args: list[str], out: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *prefix, "-m", "subq", *args, "--out", str(out)],
                   check=True, env=env, timeout=240, capture_output=True)
    metrics = read_metrics(out) or read_metrics(next(out.iterdir()))
    return [m["loss"] for m in metrics if "loss" in m]


def _lm_args(tmp_path: Path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus")
    return ["train", "lm", "--mixer", "dense", "--preset", "tiny", "--seq-len", "32",
            "--batch", "4", "--steps", "3", "--text", str(corpus), "--log-every", "1",
            "--eval-bytes", "256", "--no-progress"]


def _recall_args(tmp_path: Path) -> list[str]:
    return ["train", "recall", "--task", "mqar", "--mixer", "mamba", "--steps", "3",
            "--batch", "4", "--mqar-length", "16", "--mqar-pairs", "2", "--mqar-vocab", "16",
            "--valid-samples", "2", "--d-model", "16", "--log-every", "1", "--no-progress",
            "--results", str(tmp_path / "res")]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [_lm_args, _recall_args])
def test_two_gloo_processes_equal_one(tmp_path, recipe):
    args = recipe(tmp_path)
    two = _losses(TORCHRUN, args, tmp_path / "two")
    one = _losses([], args, tmp_path / "one")
    assert len(one) == 3
    assert two == pytest.approx(one, rel=1e-5)
