import json

from subq.bench.command import write_docs, write_report
from subq.bench.report import efficiency, headline, render_markdown

LENGTHS = [256, 512, 1024, 2048]


def _row(method, source, pattern, n, **values):
    return {"method": method, "source": source, "label": f"{source}: {method}",
            "pattern": pattern, "length": n, "status": "ok", **values}


def synthetic_results():
    rows = []
    for n in LENGTHS:
        for pattern in ("noncausal self", "causal self"):
            rows.append(_row("dense", "subq", pattern, n, fwd_ms=n * n * 1e-5,
                             fwd_bwd_ms=3 * n * n * 1e-5, mem_fwd_mib=n * n * 1e-4,
                             mem_fwd_bwd_mib=n * n * 2e-4, rel_rms_vs_dense=0.0))
            rows.append(_row("vanilla", "baseline", pattern, n, fwd_ms=n * n * 2e-5,
                             mem_fwd_mib=n * n * 3e-4, rel_rms_vs_dense=1e-7))
            rows.append(_row("fastthing", "subq", pattern, n, fwd_ms=n * 5e-3, fwd_bwd_ms=n * 1e-2,
                             mem_fwd_mib=n * 0.05, mem_fwd_bwd_mib=n * 0.1,
                             rel_rms_vs_dense=0.3))
    rows.append({**_row("peerthing", "peer", "noncausal self", 256), "status": "skipped",
                 "reason": "predicted 40.0 GiB > memory budget 12 GiB"})
    return {"created": "2026-01-01T00:00:00+00:00", "wall_s": 12.0,
            "machine": {"cpu": "Test CPU", "threads": 2, "torch": "2.x", "subq": "0.1.0",
                        "git_commit": "abc", "device": "cpu"},
            "grid": {"batch": 1, "heads": 8, "dim": 64, "dtype": "float32", "memory_gib": 12,
                     "time_s": 60, "total_s": None},
            "missing_peers": {"reformer-lsh": "ModuleNotFoundError: no"}, "rows": rows}


def test_efficiency_length_of_synthetic_lines():
    results = synthetic_results()
    fitted, measured = efficiency(results, "fastthing", "noncausal self", "fwd_ms")
    assert abs(fitted - 500) < 1e-6  # 1e-5 L^2 = 5e-3 L
    assert measured == 512


def test_report_renders_tables_plots_and_docs(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(synthetic_results()))
    report = write_report(folder).read_text()
    assert "## noncausal self" in report and "## causal self" in report
    assert "| `fastthing` | subq |" in report
    assert "Test CPU" in report and "`reformer-lsh`" in report
    assert "predicted 40.0 GiB" in report
    assert "10.2 (0.24×)" in report  # fastthing at L=2048: 10.24 ms vs dense 41.9 ms
    for name in ("bench_time_NS.png", "bench_memory_CS.png", "bench_efficiency_NS.png",
                 "bench_error.png"):
        assert (folder / name).stat().st_size > 1000
    docs = write_docs(folder, tmp_path / "docs").read_text()
    assert "img/bench_time_NS.png" in docs and (tmp_path / "docs/img/bench_error.png").exists()
    report = render_markdown(synthetic_results())
    assert report[report.index("## noncausal self"):].count("| `vanilla` | baseline |") == 8


def test_headline_reads_speedup_memory_and_efficiency_at_the_longest_common_length():
    """The table at the top of the report (issue 21): per method and pattern, the forward
    speed-up and memory ratio against dense at the longest length both were measured, the
    efficiency lengths; a method never measured says so; the baseline gets no length."""
    rows = {(e["pattern"], e["method"]): e for e in headline(synthetic_results())}
    fast = rows[("noncausal self", "fastthing")]
    assert fast["length"] == 2048
    assert abs(fast["speedup"] - (2048 ** 2 * 1e-5) / (2048 * 5e-3)) < 1e-9  # 4.19
    assert abs(fast["memory_ratio"] - (2048 * 0.05) / (2048 ** 2 * 1e-4)) < 1e-9
    assert fast["time_length"].startswith("500")
    peer = rows[("noncausal self", "peerthing")]
    assert peer["length"] is None and "speedup" not in peer
    assert rows[("causal self", "vanilla")]["time_length"] == "—"
    report = render_markdown(synthetic_results())
    assert report.index("## Headline") < report.index("## noncausal self")
    assert "| noncausal self | `peerthing` | peer (peerthing) | — | not measured |" in report
