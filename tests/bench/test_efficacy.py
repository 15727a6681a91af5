"""The efficacy grid (``subq bench efficacy``): parameter parity, the plan and its skipping of
finished runs, a real two-run grid with a training-free entry on generated text, and the
report on synthetic results."""

from __future__ import annotations

import json

import pytest

from subq.bench.efficacy import (
    DEFAULT_GRID,
    RESULT,
    RUSAGE,
    Budget,
    Entry,
    plan,
    run_grid,
    run_name,
    select,
)
from subq.bench.efficacy_report import (
    DOCS_MARKERS,
    IMAGES,
    collect,
    render_markdown,
    write_docs,
    write_report,
)
from subq.models.lm import LM, lm_config

from ..recipes.test_lm import write_corpus


def test_default_grid_has_equal_parameters():
    budget = Budget()
    counts = {e.name: LM(lm_config(budget.preset, e.mixer, options=dict(e.options),
                                   max_len=4 * budget.seq_len)).num_parameters()
              for e in DEFAULT_GRID}
    dense = counts["dense"]
    for name, count in counts.items():
        assert abs(count - dense) <= 0.05 * dense, f"{name}: {count:,} vs dense {dense:,}"


def test_default_grid_names_what_the_issue_compares():
    mixers = {e.mixer for e in DEFAULT_GRID}
    assert {"dense", "local", "linear", "kernelized_rpe", "combiner", "fixed", "axial",
            "scout+swa", "scout+mamba", "mamba", "mamba+hax"} <= mixers
    variants = {e.options.get("variant") for e in DEFAULT_GRID if e.mixer == "combiner"}
    assert variants == {"fixed", "axial"}
    luo = [e for e in DEFAULT_GRID if e.mixer == "kernelized_rpe"]
    assert any(e.options == {"normalize": False, "rpe": False} for e in luo)
    assert all(len(e.seeds) == 3 for e in luo)
    hip = [e for e in DEFAULT_GRID if e.mixer == "hip"]
    assert hip and hip[0].transplant == "dense"


def test_plan_skips_finished_runs_and_orders_transplants_last(tmp_path):
    grid = select(["hip (dense weights)", "local"])
    assert [e.name for e in grid] == ["dense", "local", "hip (dense weights)"]
    budget = Budget(steps=10)
    jobs = plan(grid, budget, tmp_path, chunk=30)
    assert [j.folder.name for j in jobs] == ["dense-s0", "local-s0", "hip_dense_weights-s0"]
    assert "--resume" in jobs[0].command and "--time-limit" in jobs[0].command
    assert jobs[2].source == tmp_path / "runs" / "dense-s0"
    (tmp_path / "runs" / "local-s0").mkdir(parents=True)
    (tmp_path / "runs" / "local-s0" / RESULT).write_text("{}")
    assert [j.folder.name for j in plan(grid, budget, tmp_path, None)] == [
        "dense-s0", "hip_dense_weights-s0"]
    with pytest.raises(ValueError, match="unknown entries"):
        select(["no-such-entry"])


def test_grid_runs_resumes_nothing_finished_and_refuses_another_budget(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    grid = [Entry("dense", "dense"), Entry("hip (dense weights)", "hip", transplant="dense",
                                           options={"topk": 4, "block_q": 4, "window": 4,
                                                    "sink": 1})]
    budget = Budget(preset="tiny", steps=4, batch=2, seq_len=32, eval_every=2,
                    eval_bytes=256, text=str(corpus))
    out = tmp_path / "out"
    counts = run_grid(grid, budget, out, jobs=2, log=lambda _: None)
    assert counts == {"finished": 2, "unfinished": 0, "failed": 0}
    dense = json.loads((out / "runs" / "dense-s0" / RESULT).read_text())
    hip = json.loads((out / "runs" / "hip_dense_weights-s0" / RESULT).read_text())
    assert dense["parameters"] == hip["parameters"] > 0
    assert json.loads((out / "runs" / "dense-s0" / RUSAGE).read_text())["max_rss_mib"] > 0
    assert run_grid(grid, budget, out, log=lambda _: None) == {
        "finished": 0, "unfinished": 0, "failed": 0}
    results = collect(out, grid)
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["dense"]["status"] == rows["hip (dense weights)"]["status"] == "finished"
    assert set(rows["hip (dense weights)"]["bpb"]) == {"32", "64", "128"}
    with pytest.raises(ValueError, match="another budget.*steps"):
        run_grid(grid, Budget(preset="tiny", steps=5, batch=2, seq_len=32, eval_every=2,
                              eval_bytes=256, text=str(corpus)), out, log=lambda _: None)


def _fake_run(folder, bpb_by_length, step=10, speed=1000.0, rss=300.0, finished=True):
    folder.mkdir(parents=True)
    lines = [{"step": s, "loss": 2.0 - s / 10, "lr": 1e-3, "tokens_per_s": speed}
             for s in range(1, step + 1)]
    lines += [{"step": step, "split": "valid", "length": n, "bpb": b}
              for n, b in bpb_by_length.items()]
    lines.append({"step": step, "split": "train", "length": 16, "bpb": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / RUSAGE).write_text(json.dumps({"exit": 0, "wall_s": 5.0, "max_rss_mib": rss})
                                 + "\n")
    if finished:
        (folder / RESULT).write_text(json.dumps({"parameters": 1234}))


def test_report_on_synthetic_results(tmp_path):
    grid = [Entry("dense", "dense"), Entry("two-seeds", "local", seeds=(0, 1)),
            Entry("half-done", "mamba", seeds=(0, 1)), Entry("never-run", "linear")]
    budget = Budget(seq_len=16)
    tmp_path.joinpath("budget.json").write_text(json.dumps(vars(budget)))
    runs = tmp_path / "runs"
    _fake_run(runs / run_name(grid[0], 0), {16: 2.0, 32: 3.0, 64: 4.0}, speed=900.0)
    _fake_run(runs / run_name(grid[1], 0), {16: 1.5, 32: 1.6, 64: 1.7}, rss=100.0)
    _fake_run(runs / run_name(grid[1], 1), {16: 1.7, 32: 1.8, 64: 1.9}, rss=200.0)
    _fake_run(runs / run_name(grid[2], 0), {16: 1.0, 32: 1.0, 64: 1.0})
    _fake_run(runs / run_name(grid[2], 1), {16: 9.0, 32: 9.0, 64: 9.0}, finished=False)
    results = collect(tmp_path, grid)
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["two-seeds"]["bpb"]["16"] == pytest.approx(1.6)
    assert rows["two-seeds"]["gap_to_dense"]["64"] == pytest.approx(1.8 - 4.0)
    assert rows["two-seeds"]["peak_rss_mib"] == 200.0
    assert rows["half-done"]["status"] == "partial"
    assert rows["half-done"]["bpb"]["16"] == 1.0  # the unfinished seed is not averaged
    assert rows["never-run"]["status"] == "missing" and rows["never-run"]["bpb"]["16"] is None
    text = render_markdown(results)
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table[:4]] == [
        "half-done", "two-seeds", "dense", "never-run"]
    assert "-2.200" in text  # two-seeds' gap at 4x
    report = write_report(tmp_path, grid)
    assert report.read_text() == render_markdown(json.loads(
        (tmp_path / "efficacy.json").read_text()))
    for image in IMAGES.values():
        assert (tmp_path / image).stat().st_size > 0
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "efficacy.md").write_text(f"# prose before\n{DOCS_MARKERS[0]}\nold\n"
                                      f"{DOCS_MARKERS[1]}\nprose after\n")
    page = write_docs(results, docs).read_text()
    assert page.startswith("# prose before\n") and page.endswith("prose after\n")
    assert "old" not in page and "](img/efficacy_curves.png)" in page and "| `dense` |" in page
    assert json.loads((docs / "data" / "efficacy.json").read_text())["rows"][0]["name"] == "dense"
