"""The PEFT side of ``subq bench efficacy`` (subq/bench/efficacy_peft.py): the grid holds what
the PEFT issue compares, and a real two-run grid on SmolLM2 (two steps each) is collected and
reported with the counts and scores its runs logged."""

from __future__ import annotations

import json

import pytest

from subq.bench.efficacy import RESULT, run_grid
from subq.bench.efficacy_peft import (
    PEFT_GRID,
    PEFT_MARKERS,
    PeftBudget,
    PeftEntry,
    collect_peft,
    prefix_length_table,
    write_peft_report,
)
from subq.recipes.trainer import read_metrics
from tests.integrations.llama import needs_smollm2


def test_grid_compares_every_method_on_both_tasks_and_the_prefix_lengths():
    by_task = {task: {(e.method, tuple(e.options.items())) for e in PEFT_GRID if e.task == task}
               for task in ("lookup", "domain")}
    for task, entries in by_task.items():
        assert {("ntk", ()), ("lora", ()), ("lora", (("rank", 64),)), ("prefix", ()),
                ("full", ())} <= entries, task
    assert {("prefix", (("prefix_length", m),)) for m in (8, 64, 512)} <= by_task["lookup"]
    assert len({e.name for e in PEFT_GRID}) == len(PEFT_GRID)
    command = PeftBudget().command(PeftEntry("x", "lookup", "lora", {"rank": 64}), 0,
                                   "out", chunk=30.0)
    assert command[command.index("--rank") + 1] == "64"
    assert command[command.index("--time-limit") + 1] == "30.0"
    assert command[command.index("--batch") + 1] == "16"


@needs_smollm2
def test_a_tiny_grid_runs_collects_and_reports(tmp_path):
    grid = (PeftEntry("lookup-ntk", "lookup", "ntk"),
            PeftEntry("lookup-lora-r2", "lookup", "lora", {"rank": 2}))
    budget = PeftBudget(steps=2, lookup_batch=2, eval_every=2, eval_examples=8)
    out = tmp_path / "out"
    counts = run_grid(grid, budget, out, jobs=1, threads=2, log=lambda _: None)
    assert counts == {"finished": 2, "unfinished": 0, "failed": 0}
    rows = {r["name"]: r for r in collect_peft(out, grid)}
    assert rows["lookup-ntk"]["trainable"] == 30 * 9 * (64 * 64 + 64)
    assert rows["lookup-lora-r2"]["trainable"] == 30 * 2 * (576 + 576 + 576 + 192)
    for name, row in rows.items():
        evals = [m for m in read_metrics(out / "runs" / f"{name}-s0") if "split" in m]
        assert row["status"] == "finished" and (out / "runs" / f"{name}-s0" / RESULT).exists()
        assert row["curve"] == [(e["step"], e["exact_match"]) for e in evals]
        assert row["start"] == evals[0]["exact_match"] and row["score"] == evals[-1][
            "exact_match"]
        assert row["seconds_per_step"] > 0 and row["peak_rss_mib"] > 100
    assert rows["lookup-ntk"]["start"] == pytest.approx(rows["lookup-lora-r2"]["start"])
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "peft.md").write_text(f"# PEFT\n\n{PEFT_MARKERS[0]}\n{PEFT_MARKERS[1]}\n")
    write_peft_report(out, grid, docs)
    text = (docs / "peft.md").read_text()
    assert "`lookup-ntk` | 1,123,200 |" in text
    assert "`lookup-lora-r2` | 115,200 |" in text
    assert "| step 0 | step 2 | final NLL (nats) |" in text
    assert (docs / "img" / "peft_curves.png").stat().st_size > 0
    saved = json.loads((docs / "data" / "peft.json").read_text())
    assert {r["name"] for r in saved["rows"]} == {"lookup-ntk", "lookup-lora-r2"}


def test_prefix_length_table_orders_prefixes_by_size_beside_ntk():
    def row(name, method, trainable, score, **options):
        return {"name": name, "task": "lookup", "method": method, "options": options,
                "trainable": trainable, "score": score, "nll": 0.5, "seconds_per_step": 1.0}

    rows = [row("p512", "prefix", 5_898_240, 0.5, prefix_length=512),
            row("p8", "prefix", 92_160, 0.25, prefix_length=8),
            row("ntk", "ntk", 1_123_200, 0.75)]
    lines = "\n".join(prefix_length_table(rows))
    assert lines.index("m = 8 ") < lines.index("m = 512 ") < lines.index("NTK (any m)")
    assert "| NTK (any m) | 1,123,200 | 0.750 | 0.5000 |" in lines
