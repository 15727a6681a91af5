import csv

from subq.bench.run import Grid, budget_reason, run_grid, write_results
from subq.registry import Pattern


def test_over_budget_configuration_is_recorded_as_skipped(tmp_path):
    grid = Grid(methods=["dense", "no-such-method"], patterns=[Pattern.CAUSAL_SELF],
                lengths=[128, 64], memory_gib=1e-9, threads=1)
    results = run_grid(grid)
    first, second = results["rows"]
    assert (first["length"], first["status"]) == (64, "ok")
    assert first["fwd_ms"] > 0 and len(first["fwd_times_ms"]) >= 5
    assert first["mem_fwd_bwd_mib"] > 0 and first["rel_rms_vs_dense"] == 0.0
    assert (second["length"], second["status"]) == (128, "skipped")
    assert "memory budget" in second["reason"]
    assert all(r.get("reason") for r in results["rows"] if r["status"] == "skipped")
    assert results["unknown_methods"] == ["no-such-method"]
    write_results(results, tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "skipped"]


def test_time_budget_and_failed_smaller_length_skip():
    grid = Grid(methods=["dense"], patterns=[Pattern.CAUSAL_SELF], lengths=[1], time_s=2.0)
    fast = {"status": "ok", "length": 1000, "fwd_ms": 100.0, "fwd_bwd_ms": 300.0}
    assert budget_reason([fast], 2000, grid, 0.0) is None
    assert "time budget" in budget_reason([fast], 4000, grid, 0.0)
    # dense is the yardstick of every ratio: never skipped for time, still for memory
    assert budget_reason([{**fast, "method": "dense"}], 4000, grid, 0.0) is None
    huge = {**fast, "method": "dense", "mem_fwd_mib": 2.0 ** 20}
    assert "memory budget" in budget_reason([huge], 4000, grid, 0.0)
    assert "failed at L=10" in budget_reason([{"status": "error", "length": 10}], 20, grid, 0)


def test_a_method_about_as_fast_as_dense_is_measured_wherever_dense_is():
    """The per-call budget is the larger of ``time_s`` and ``time_vs_dense`` x dense's call at
    that length: a 3 s call is measured beside a 2.5 s dense call, not beside a 1 s one."""
    grid = Grid(methods=["dense"], patterns=[Pattern.CAUSAL_SELF], lengths=[1], time_s=2.0,
                time_vs_dense=1.5)
    slow = {"status": "ok", "length": 1000, "fwd_ms": 100.0, "fwd_bwd_ms": 750.0}

    def dense_at_2000(call_ms):
        return [{"status": "ok", "length": 2000, "fwd_ms": 10.0, "fwd_bwd_ms": call_ms}]

    assert budget_reason([slow], 2000, grid, 0.0, dense_at_2000(2500.0)) is None
    reason = budget_reason([slow], 2000, grid, 0.0, dense_at_2000(1000.0))
    assert "predicted 3.0 s per call > time budget 2.0 s" in reason and "dense's 1.0 s" in reason


def test_a_call_is_extrapolated_from_a_fit_through_three_lengths():
    """One slow timing at 4K (slope 2.51 from 2K, where 1K->2K was 1.93) would extrapolate
    to 13.6 s at 8K from the last two lengths; the least-squares slope through three (2.22)
    predicts 11.2 s, within a 12 s budget."""
    grid = Grid(methods=["dense"], patterns=[Pattern.CAUSAL_SELF], lengths=[1], time_s=12.0)
    mine = [{"status": "ok", "length": n, "fwd_ms": t / 4, "fwd_bwd_ms": t}
            for n, t in ((1024, 110.0), (2048, 420.0), (4096, 2400.0))]
    assert budget_reason(mine, 8192, grid, 0.0) is None
    assert "predicted 11.2 s per call > time budget 11.0 s" in budget_reason(
        mine, 8192, Grid(methods=["dense"], patterns=[Pattern.CAUSAL_SELF], lengths=[1],
                         time_s=11.0), 0.0)
    assert "predicted 13.6 s" in budget_reason(mine[1:], 8192, grid, 0.0)
