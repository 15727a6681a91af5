"""The recall recipe (subq/recipes/recall.py): a few steps run, write the table and the plot,
and a resumed run equals a straight run."""

from __future__ import annotations

import csv

import pytest
import torch

from subq.cli import main
from subq.recipes.recall import RecallConfig, train


def _cfg(tmp_path, **kw):
    base = dict(steps=2, batch_size=2, d_model=16, k_total=4, n_context=(2, 2), n_key=(2, 2),
                valid_samples=4, eval_every=1, checkpoint_every=1, out=str(tmp_path / "ck"),
                results=str(tmp_path / "res"))
    return RecallConfig(**{**base, **kw})


@pytest.mark.parametrize("mixer", ["mamba+ks", "dense"])
def test_smoke_writes_table_plot_and_checkpoint(tmp_path, mixer):
    row = train(_cfg(tmp_path, mixer=mixer))
    assert 0.0 <= row["accuracy"] <= 100.0
    with open(tmp_path / "res" / "recall.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mixer"] for r in rows] == [mixer]
    assert (tmp_path / "res" / "recall.png").stat().st_size > 0
    saved = torch.load(_cfg(tmp_path, mixer=mixer).checkpoint_path(), weights_only=False)
    assert saved["step"] == 2 and len(saved["history"]) == 2


def test_resume_equals_straight_run(tmp_path):
    straight = _cfg(tmp_path / "a", mixer="mamba+hax")
    train(straight)
    resumed = _cfg(tmp_path / "b", mixer="mamba+hax", steps=1)
    train(resumed)
    resumed.steps = 2
    train(resumed)
    a = torch.load(straight.checkpoint_path(), weights_only=False)
    b = torch.load(resumed.checkpoint_path(), weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    assert a["history"] == pytest.approx(b["history"])


def test_cli_subcommand(tmp_path, capsys):
    assert main(["train", "recall", "--task", "mqar", "--mixer", "mamba", "--steps", "1",
                 "--batch-size", "2", "--mqar-length", "16", "--mqar-pairs", "2",
                 "--mqar-vocab", "16", "--valid-samples", "2", "--d-model", "16",
                 "--out", str(tmp_path / "ck"), "--results", str(tmp_path / "res")]) == 0
    assert "accuracy=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mixer"):
        train(_cfg(tmp_path, mixer="nope"))
