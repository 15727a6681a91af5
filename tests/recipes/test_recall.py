"""The recall recipe (subq/recipes/recall.py) on the trainer: a few steps run, write the table
and the plot, and a resumed run equals a straight run."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from subq.cli import main
from subq.recipes.recall import TRAINER_DEFAULTS, RecallConfig, train
from subq.recipes.trainer import read_metrics


def _cfg(tmp_path, **kw):
    base = dict(d_model=16, k_total=4, n_context=(2, 2), n_key=(2, 2), valid_samples=4,
                results=str(tmp_path / "res"))
    return RecallConfig(**{**base, **kw})


def _trainer(tmp_path, **kw):
    base = dict(steps=2, batch=2, eval_every=1, checkpoint_every=1, log_every=1,
                out=str(tmp_path / "ck"), progress=False)
    return replace(TRAINER_DEFAULTS, **{**base, **kw})


def _run_dir(tmp_path, cfg, seed=0) -> Path:
    return tmp_path / "ck" / cfg.run_name(seed)


@pytest.mark.parametrize("mixer", ["mamba+ks", "dense"])
def test_smoke_writes_table_plot_and_checkpoint(tmp_path, mixer):
    cfg = _cfg(tmp_path, mixer=mixer)
    row = train(cfg, _trainer(tmp_path))
    assert 0.0 <= row["accuracy"] <= 100.0
    with open(tmp_path / "res" / "recall.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mixer"] for r in rows] == [mixer]
    assert (tmp_path / "res" / "recall.png").stat().st_size > 0
    saved = torch.load(_run_dir(tmp_path, cfg) / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2
    evals = [m for m in read_metrics(_run_dir(tmp_path, cfg)) if m.get("split") == "valid"]
    assert [m["step"] for m in evals] == [1, 2]


def test_resume_equals_straight_run(tmp_path):
    cfg = _cfg(tmp_path, mixer="mamba+hax")
    train(cfg, _trainer(tmp_path / "a", steps=3))
    train(cfg, _trainer(tmp_path / "b", steps=2))
    train(cfg, _trainer(tmp_path / "b", steps=3))
    a = torch.load(_run_dir(tmp_path / "a", cfg) / "checkpoint.pt", weights_only=False)
    b = torch.load(_run_dir(tmp_path / "b", cfg) / "checkpoint.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"}
             for m in read_metrics(_run_dir(tmp_path / "a", cfg))]
    assert strip == [{k: v for k, v in m.items() if k != "tokens_per_s"}
                     for m in read_metrics(_run_dir(tmp_path / "b", cfg))]


def test_cli_subcommand(tmp_path, capsys):
    assert main(["train", "recall", "--task", "mqar", "--mixer", "mamba", "--steps", "1",
                 "--batch", "2", "--mqar-length", "16", "--mqar-pairs", "2",
                 "--mqar-vocab", "16", "--valid-samples", "2", "--d-model", "16",
                 "--no-progress", "--out", str(tmp_path / "ck"),
                 "--results", str(tmp_path / "res")]) == 0
    assert "accuracy=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mixer"):
        train(_cfg(tmp_path, mixer="nope"), _trainer(tmp_path))
