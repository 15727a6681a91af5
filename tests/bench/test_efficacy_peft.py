"""The PEFT side of ``subq bench efficacy`` (subq/bench/efficacy_peft.py): the grid holds what
the PEFT issue compares, its commands, and the report of run folders as the recipe and the
grid runner leave them (the recipe itself is trained end to end in tests/recipes/test_peft.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

from subq.bench.efficacy import RESULT
from subq.bench.efficacy_peft import (
    PEFT_GRID,
    PEFT_MARKERS,
    PeftBudget,
    PeftEntry,
    collect_peft,
    prefix_length_table,
    write_peft_report,
)
from subq.recipes.peft import RECORD


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


def _finished_run(folder, curve, trainable, seconds_per_step, rss):
    """A run folder as ``subq train peft`` and the grid runner leave it."""
    folder.mkdir(parents=True)
    lines = [{"step": 5, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 250.0}]
    lines += [{"step": step, "split": "valid", "exact_match": em, "nll": nll, "examples": 8}
              for step, em, nll in curve]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (folder / RECORD).write_text(json.dumps({"trainable": trainable,
                                             "seconds_per_step": seconds_per_step}))
    (folder / "rusage.jsonl").write_text(json.dumps({"exit": 0, "wall_s": 9.0,
                                                     "max_rss_mib": rss}) + "\n")
    (folder / RESULT).write_text("{}")


def test_a_grid_of_finished_runs_is_collected_and_reported(tmp_path):
    grid = (PeftEntry("lookup-ntk", "lookup", "ntk"),
            PeftEntry("lookup-lora-r2", "lookup", "lora", {"rank": 2}),
            PeftEntry("domain-ntk", "domain", "ntk"))
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "budget.json").write_text(json.dumps(asdict(PeftBudget(steps=2))))
    _finished_run(out / "runs" / "lookup-ntk-s0", [(0, 0.0, 6.8), (2, 0.5, 1.5)], 1_123_200,
                  2.5, 2392.0)
    _finished_run(out / "runs" / "lookup-lora-r2-s0", [(0, 0.0, 6.8), (2, 0.75, 0.9)], 115_200,
                  2.4, 1813.0)
    rows = {r["name"]: r for r in collect_peft(out, grid)}
    assert rows["domain-ntk"]["status"] == "missing"
    ntk = rows["lookup-ntk"]
    assert ntk["status"] == "finished" and ntk["start"] == 0.0 and ntk["score"] == 0.5
    assert ntk["curve"] == [(0, 0.0), (2, 0.5)] and ntk["nll"] == 1.5
    assert ntk["peak_rss_mib"] == 2392.0 and ntk["seconds_per_step"] == 2.5
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "peft.md").write_text(f"# PEFT\n\n{PEFT_MARKERS[0]}\n{PEFT_MARKERS[1]}\n")
    write_peft_report(out, grid, docs)
    text = (docs / "peft.md").read_text()
    assert "| step 0 | step 2 | final NLL (nats) |" in text
    assert text.index("`lookup-lora-r2` | 115,200 | 0.000 | 0.750 |") < text.index(
        "`lookup-ntk` | 1,123,200 | 0.000 | 0.500 |")  # best first
    assert "| `domain-ntk` | — |" in text
    assert (docs / "img" / "peft_curves.png").stat().st_size > 0
    saved = json.loads((docs / "data" / "peft.json").read_text())
    assert {r["name"] for r in saved["rows"]} == {"lookup-ntk", "lookup-lora-r2", "domain-ntk"}


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


def test_runs_missing_here_are_kept_from_the_record_of_the_same_budget(tmp_path):
    """A grid that spans sessions: a run finished earlier (in docs/data/peft.json) and absent
    from this run folder stays in the report, listed as kept; under another budget it does
    not."""
    grid = (PeftEntry("lookup-ntk", "lookup", "ntk"), PeftEntry("lookup-lora", "lookup", "lora"))
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    budget = asdict(PeftBudget(steps=2))
    (out / "budget.json").write_text(json.dumps(budget))
    _finished_run(out / "runs" / "lookup-ntk-s0", [(0, 0.0, 3.2), (2, 0.5, 3.0)], 1_123_200,
                  9.9, 4187.0)
    docs = tmp_path / "docs"
    (docs / "data").mkdir(parents=True)
    (docs / "peft.md").write_text(f"{PEFT_MARKERS[0]}\n{PEFT_MARKERS[1]}\n")
    ntk = collect_peft(out, grid)[0]
    lora = {**ntk, "name": "lookup-lora", "method": "lora", "score": 0.75,
            "curve": [(0, 0.0), (2, 0.75)]}
    record = {"budget": budget, "rows": [{**ntk, "score": 0.1}, lora]}
    (docs / "data" / "peft.json").write_text(json.dumps(record))
    write_peft_report(out, grid, docs)
    saved = {r["name"]: r for r in json.loads((docs / "data" / "peft.json").read_text())["rows"]}
    assert saved["lookup-lora"]["score"] == 0.75  # kept
    assert saved["lookup-ntk"]["score"] == 0.5  # this folder's run wins over the record
    assert "kept from its record" in (docs / "peft.md").read_text()
    (docs / "data" / "peft.json").write_text(json.dumps({**record, "budget": {**budget,
                                                                              "steps": 3}}))
    write_peft_report(out, grid, docs)
    saved = {r["name"]: r for r in json.loads((docs / "data" / "peft.json").read_text())["rows"]}
    assert saved["lookup-lora"]["status"] == "missing"
