"""Atomic checkpoints (subq/recipes/checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from subq.recipes.checkpoint import load_if_exists, save_atomic


def test_round_trip_and_missing(tmp_path):
    assert load_if_exists(tmp_path / "none.pt") is None
    obj = {"w": torch.randn(3, 4), "step": 7}
    save_atomic(obj, tmp_path / "sub" / "ck.pt")
    back = load_if_exists(tmp_path / "sub" / "ck.pt")
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ck.pt"]  # no temp files left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert load_if_exists(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
