"""``subq train lm`` (subq/recipes/lm.py) on a small generated corpus: metrics and bits per
byte at 1x, 2x and 4x the training length, and a run killed by SIGKILL and resumed logs the
losses of a run never killed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from subq.cli import main
from subq.recipes.lm import parse_option
from subq.recipes.trainer import CHECKPOINT, read_metrics

WORDS = ("the", "attention", "of", "a", "query", "over", "keys", "is", "softmax", "scores",
         "and", "state", "scan", "carries", "what", "came", "before", "while", "sparse",
         "patterns", "keep", "some")


def write_corpus(folder, documents: int = 24, words: int = 300, seed: int = 0):
    """``documents`` files of seeded random sentences over a small vocabulary."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        picks = torch.randint(len(WORDS), (words,), generator=g).tolist()
        (folder / f"doc{d:03d}.txt").write_text(" ".join(WORDS[i] for i in picks) + ".\n")
    return folder


def _args(corpus, out, *extra):
    return ["train", "lm", "--mixer", "dense", "--preset", "tiny", "--seq-len", "32",
            "--batch", "4", "--text", str(corpus), "--out", str(out), "--log-every", "1",
            "--eval-bytes", "512", "--warmup", "2", "--no-progress", *extra]


def _without_speed(metrics):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


def test_train_lm_logs_losses_and_bpb_at_three_lengths(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert main(_args(corpus, tmp_path / "run", "--steps", "3")) == 0
    assert "parameters" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    evals = [m for m in metrics if "split" in m]
    assert {(m["split"], m["length"]) for m in evals} == {
        ("train", 32), ("valid", 32), ("valid", 64), ("valid", 128)}
    assert all(0 < m["bpb"] < 9 for m in evals)  # an untrained byte model is near 8 bits
    assert math.isfinite(metrics[0]["loss"])


def test_sigkilled_run_resumes_with_the_same_losses(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    steps = ["--steps", "40", "--checkpoint-every", "3", "--eval-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "subq", *_args(corpus, tmp_path / "killed", *steps)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["step"]
    assert killed_at < 40
    subprocess.run([*command, "--resume"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "subq",
                    *_args(corpus, tmp_path / "straight", *steps)],
                   env=env, check=True, capture_output=True)
    straight = _without_speed(read_metrics(tmp_path / "straight"))
    resumed = _without_speed(read_metrics(tmp_path / "killed"))
    assert [m["step"] for m in resumed] == [m["step"] for m in straight]
    for a, b in zip(straight, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a, b)


def test_option_parsing():
    assert parse_option("window=128") == ("window", 128)
    assert parse_option("feature_map=relu") == ("feature_map", "relu")
    assert parse_option("normalize=False") == ("normalize", False)
    with pytest.raises(Exception, match="NAME=VALUE"):
        parse_option("window")
