"""The vision side of ``subq bench efficacy`` (subq/bench/efficacy_vision.py): the grid names
what the vision issue compares and pairs real LM entries, a real tiny grid whose distilled
GroupMamba waits for and reads its teacher, and CAB's compositional index over both tasks."""

from __future__ import annotations

import json

import pytest

from subq.bench.efficacy import DEFAULT_GRID, RESULT, plan, run_grid, select
from subq.bench.efficacy_vision import (
    INFERENCE,
    VISION_GRID,
    VISION_MARKERS,
    VisionBudget,
    VisionEntry,
    collect_vision,
    compositional_rows,
    write_vision_report,
)
from tests.fashion_data import write_tiny_fashion_mnist


def test_grid_compares_groupmamba_with_and_without_distillation_and_every_vit():
    names = {e.name for e in VISION_GRID}
    assert {"groupmamba", "groupmamba+distill", "vit-dense", "vit-linear", "vit-combiner",
            "vit-hierarchical_local", "vit-local"} <= names
    distilled = next(e for e in VISION_GRID if e.name == "groupmamba+distill")
    assert distilled.teacher == "cnn" and len(distilled.seeds) == 3
    lm = {e.name for e in DEFAULT_GRID}
    assert all(e.mechanism in lm for e in VISION_GRID if e.mechanism is not None)
    assert [e.name for e in select(["groupmamba+distill"], VISION_GRID)] == [
        "cnn", "groupmamba+distill"]


def test_a_tiny_grid_trains_the_teacher_first_then_distils_it(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_tiny_fashion_mnist(tmp_path / "data", 16, 8)
    grid = (VisionEntry("cnn", "cnn"),
            VisionEntry("gm+distill", "groupmamba", teacher="cnn", mechanism="mamba"),
            VisionEntry("vit", "vit-dense", mechanism="dense"))
    budget = VisionBudget(preset="tiny", steps=2, batch=4, eval_every=2, data=str(data))
    out = tmp_path / "out"
    jobs = plan(grid, budget, out, chunk=None)
    distill = next(j for j in jobs if j.entry.name == "gm+distill")
    assert distill.source == out / "runs" / "cnn-s0"
    assert distill.command[distill.command.index("--teacher") + 1] == str(distill.source)
    counts = run_grid(grid, budget, out, jobs=2, log=lambda _: None)
    assert counts == {"finished": 3, "unfinished": 0, "failed": 0}
    rows = {r["name"]: r for r in collect_vision(out, grid)}
    assert rows["gm+distill"]["status"] == "finished"
    assert 0.0 <= rows["gm+distill"]["accuracy"] <= 1.0
    assert rows["vit"]["parameters"] > 0
    assert rows["vit"]["inference_images_per_s"] > 0  # measured once, then kept in the run
    kept = json.loads((out / "runs" / "vit-s0" / INFERENCE).read_text())
    assert kept["images_per_s"] == rows["vit"]["inference_images_per_s"]
    saved = json.loads((out / "runs" / "gm+distill-s0" / RESULT).read_text())
    assert saved["entry"]["teacher"] == "cnn"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "efficacy.md").write_text("# page\n\nprose kept\n")
    write_vision_report(out, None, grid, docs)
    page = (docs / "efficacy.md").read_text()
    assert page.startswith("# page\n\nprose kept\n") and VISION_MARKERS[1] in page
    assert "`gm+distill`" in page
    assert json.loads((docs / "data" / "efficacy_vision.json").read_text())["rows"]


def test_compositional_index_pairs_mechanisms_by_hand():
    lm = [{"name": "dense", "bpb": {"256": 2.0}}, {"name": "local", "bpb": {"256": 1.0}},
          {"name": "linear", "bpb": {"256": None}}]
    vision = [{"name": "vit-dense", "mechanism": "dense", "accuracy": 0.9},
              {"name": "vit-local", "mechanism": "local", "accuracy": 0.8},
              {"name": "vit-linear", "mechanism": "linear", "accuracy": 0.85},
              {"name": "cnn", "mechanism": None, "accuracy": 0.95}]
    rows = compositional_rows(lm, vision, "256")
    # two paired mechanisms: each metric's z-scores are +-1; dense: bpb z = -1 (worse),
    # accuracy z = +1 -> index 0; local: +1 and -1 -> 0
    assert [r["mechanism"] for r in rows] and {r["mechanism"] for r in rows} == {"dense", "local"}
    assert all(r["index"] == pytest.approx(0.0) for r in rows)
    vision[1]["accuracy"] = 0.95  # local now better on both tasks
    rows = compositional_rows(lm, vision, "256")
    assert rows[0]["mechanism"] == "local" and rows[0]["index"] == pytest.approx(1.0)
    assert rows[1]["index"] == pytest.approx(-1.0)
    assert compositional_rows(lm[:1], vision, "256") == []  # one mechanism: no field
