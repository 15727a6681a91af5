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


def test_a_call_is_predicted_from_its_ratio_to_dense_where_dense_is_measured():
    """One slow timing at 2K (1.5x dense where 1K was 1.1x) would extrapolate to 3.3 s at 4K
    (log-log slope 2.45) and skip a method as fast as dense; its mean ratio to dense over
    the last two lengths times dense's 1.6 s at 4K predicts 2.1 s, within the budget."""
    grid = Grid(methods=["dense"], patterns=[Pattern.CAUSAL_SELF], lengths=[1], time_s=2.0,
                time_vs_dense=1.5)
    dense = [{"status": "ok", "length": n, "fwd_ms": t / 4, "fwd_bwd_ms": t}
             for n, t in ((1000, 100.0), (2000, 400.0), (4000, 1600.0))]
    mine = [{"status": "ok", "length": 1000, "fwd_ms": 27.5, "fwd_bwd_ms": 110.0},
            {"status": "ok", "length": 2000, "fwd_ms": 150.0, "fwd_bwd_ms": 600.0}]
    assert "predicted 3.3 s" in budget_reason(mine, 4000, grid, 0.0)
    assert budget_reason(mine, 4000, grid, 0.0, dense) is None
    faster_dense = [{**row, "fwd_bwd_ms": row["fwd_bwd_ms"] / 2} for row in dense]
    assert "predicted 2.1 s per call > time budget 2.0 s" in budget_reason(
        mine, 4000, grid, 0.0, faster_dense)
