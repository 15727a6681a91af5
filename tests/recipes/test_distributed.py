"""``torchrun`` data parallelism: two gloo processes train the same steps as one process on
the same global batch (each rank takes half of it; DDP averages the gradients). The mixer is
Mamba: HAX's ranking loss samples its key pairs per batch, so its value depends on how the
batch is split."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from subq.recipes.trainer import read_metrics

ARGS = ["train", "recall", "--task", "mqar", "--mixer", "mamba", "--steps", "3",
        "--batch", "4", "--mqar-length", "16", "--mqar-pairs", "2", "--mqar-vocab", "16",
        "--valid-samples", "2", "--d-model", "16", "--log-every", "1",
        "--no-progress"]


def _run(prefix: list[str], out, tmp_path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *prefix, "-m", "subq", *ARGS, "--out", str(out),
                    "--results", str(tmp_path / "res")], check=True, env=env, timeout=240,
                   capture_output=True)
    (run,) = out.iterdir()
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _run(torchrun, tmp_path / "two", tmp_path)
    one = _run([], tmp_path / "one", tmp_path)
    assert len(one) == 3
    assert two == pytest.approx(one, rel=1e-5)
