"""report.md and the PNG plots of an efficiency run, from its results.json alone."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from subq.registry import Pattern

from .cab import (
    EXTRAPOLATION_FACTOR,
    efficiency_length,
    efficiency_text,
    measured_crossover,
)
from .measure import LONG_CALL_MS, LONG_CALL_REPEATS, REPEATS, TIME_TARGET_MS

BASELINES = ("dense", "vanilla")
_METRICS = {"fwd_ms": "forward time (ms)", "fwd_bwd_ms": "forward+backward time (ms)",
            "mem_fwd_mib": "forward peak memory (MiB)",
            "mem_fwd_bwd_mib": "forward+backward peak memory (MiB)"}


def load(folder: Path) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


def _index(results: dict) -> dict[tuple[str, str, int], dict]:
    return {(r["method"], r["pattern"], r["length"]): r for r in results["rows"]}


def _methods(results: dict, pattern: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in results["rows"]:
        if r["pattern"] == pattern:
            seen.setdefault(r["method"], None)
    return list(seen)


def _lengths(results: dict) -> list[int]:
    return sorted({r["length"] for r in results["rows"]})


def _patterns(results: dict) -> list[str]:
    present = {r["pattern"] for r in results["rows"]}
    return [p.value for p in Pattern if p.value in present]


def _source(results: dict, method: str) -> str:
    row = next(r for r in results["rows"] if r["method"] == method)
    return {"subq": "subq", "peer": f"peer ({row.get('label', '').removeprefix('peer: ')})",
            "baseline": "baseline"}.get(row["source"], row["source"])


def series(results: dict, method: str, pattern: str, key: str) -> list[tuple[int, float]]:
    """(L, value) for every length where ``method`` has ``key`` measured."""
    index = _index(results)
    out = []
    for n in _lengths(results):
        row = index.get((method, pattern, n))
        if row and row.get("status") == "ok" and row.get(key) is not None:
            out.append((n, float(row[key])))
    return out


def efficiency_cell(results: dict, method: str, pattern: str, key: str,
                    baseline: str = "dense") -> str:
    """:func:`subq.bench.cab.efficiency_text` of ``method`` against ``baseline`` on ``key``."""
    base = dict(series(results, baseline, pattern, key))
    mine = dict(series(results, method, pattern, key))
    common = sorted(set(base) & set(mine))
    fitted, _ = efficiency(results, method, pattern, key, baseline)
    return efficiency_text(common, [base[n] for n in common], [mine[n] for n in common], fitted)


def efficiency(results: dict, method: str, pattern: str, key: str, baseline: str = "dense"
               ) -> tuple[float | None, int | None]:
    """CAB's efficiency length and the measured crossover of ``method`` against ``baseline``
    on ``key``; times fit the line without the smallest common length, as CAB does."""
    base = dict(series(results, baseline, pattern, key))
    mine = dict(series(results, method, pattern, key))
    common = sorted(set(base) & set(mine))
    if not common:
        return None, None
    line_from = common[1] if key.endswith("_ms") and len(common) >= 4 else 0
    length = efficiency_length(common, [base[n] for n in common], [mine[n] for n in common],
                               line_from=line_from)
    return length, measured_crossover(common, [base[n] for n in common],
                                      [mine[n] for n in common])


def _cell(row: dict | None, key: str, dense: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    value = row.get(key)
    if value is None:
        return "error" if row.get("fwd_bwd_error") or row.get("memory_error") else "—"
    text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    base = None if dense is None or dense.get("status") != "ok" else dense.get(key)
    return f"{text} ({value / base:.2f}×)" if base else text


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def pattern_section(results: dict, pattern: str) -> list[str]:
    index, lengths = _index(results), _lengths(results)
    methods = _methods(results, pattern)
    lines = [f"## {pattern}", ""]
    for key, title in _METRICS.items():
        lines += [f"**{title}** (ratio to `dense`)", ""]
        lines += _table(["method", "source", *[f"L={n}" for n in lengths]], (
            [f"`{m}`", _source(results, m),
             *[_cell(index.get((m, pattern, n)), key, index.get(("dense", pattern, n)))
               for n in lengths]] for m in methods))
        lines.append("")
    lines += ["**CAB efficiency length** (forward; the length from which the method is "
              "cheaper: quadratic fit of the baseline, line fit of the method, larger root, "
              "with the first measured length where it is cheaper; `< L` when it is cheaper "
              "at every measured length, `> L` when it is at none, the fit's crossing shown "
              f"only within {EXTRAPOLATION_FACTOR}x the longest length)", ""]
    rows = []
    for m in methods:
        if m in BASELINES:
            continue
        cells = [f"`{m}`", _source(results, m)]
        for baseline in BASELINES:
            for key in ("fwd_ms", "mem_fwd_mib"):
                cells.append(efficiency_cell(results, m, pattern, key, baseline))
        rows.append(cells)
    lines += _table(["method", "source", "time vs dense", "memory vs dense", "time vs vanilla",
                     "memory vs vanilla"], rows)
    error_lengths = [n for n in lengths if any(
        index.get((m, pattern, n), {}).get("rel_rms_vs_dense") is not None for m in methods)]
    if error_lengths:
        lines += ["", "**relative RMS error vs dense** (same inputs)", ""]
        lines += _table(["method", *[f"L={n}" for n in error_lengths]], (
            [f"`{m}`", *[_error_cell(index.get((m, pattern, n))) for n in error_lengths]]
            for m in methods))
    return lines + [""]


def headline(results: dict) -> list[dict]:
    """Per pattern and method (``dense`` aside): at the longest length where it and ``dense``
    both have a forward time, the speed-up ``t_dense / t`` and the memory ratio
    ``m / m_dense`` (forward peaks), and the efficiency lengths against ``dense``."""
    index, out = _index(results), []
    for pattern in _patterns(results):
        for method in _methods(results, pattern):
            if method == "dense":
                continue
            both = [n for n, _ in series(results, method, pattern, "fwd_ms")
                    if index.get(("dense", pattern, n), {}).get("status") == "ok"]
            entry = {"pattern": pattern, "method": method,
                     "source": _source(results, method), "length": max(both, default=None)}
            if both:
                mine, base = index[(method, pattern, max(both))], index[
                    ("dense", pattern, max(both))]
                entry["speedup"] = base["fwd_ms"] / mine["fwd_ms"]
                if mine.get("mem_fwd_mib") and base.get("mem_fwd_mib"):
                    entry["memory_ratio"] = mine["mem_fwd_mib"] / base["mem_fwd_mib"]
            baseline = method in BASELINES  # quadratic too: no efficiency length
            entry["time_length"] = "—" if baseline else efficiency_cell(
                results, method, pattern, "fwd_ms")
            entry["memory_length"] = "—" if baseline else efficiency_cell(
                results, method, pattern, "mem_fwd_mib")
            out.append(entry)
    return out


def headline_section(results: dict) -> list[str]:
    """The table a reader looks at first (:func:`headline`): subq's mechanisms, then the
    peers and the materialised baseline, per pattern."""
    order = {"subq": 0, "baseline": 2}
    rows = sorted(headline(results), key=lambda e: (
        _patterns(results).index(e["pattern"]), order.get(e["source"], 1), e["method"]))
    lines = ["## Headline", "",
             "Forward pass, at the longest length where the method and `dense` (SDPA) were "
             "both measured: speed-up `t_dense / t` (above 1: faster than SDPA), memory "
             "`m / m_dense` (below 1: leaner), and CAB's efficiency lengths against SDPA "
             "(the length from which the method is cheaper).", ""]
    lines += _table(["pattern", "method", "source", "at L", "speed-up", "memory",
                     "efficiency length (time)", "efficiency length (memory)"], (
        [e["pattern"], f"`{e['method']}`", e["source"],
         "—" if e["length"] is None else f"{e['length']:,}",
         f"{e['speedup']:.2f}×" if "speedup" in e else "not measured",
         f"{e['memory_ratio']:.2f}×" if "memory_ratio" in e else "—",
         e["time_length"], e["memory_length"]] for e in rows))
    return lines + [""]


def _error_cell(row: dict | None) -> str:
    if row is None:
        return ""
    value = row.get("rel_rms_vs_dense")
    return row["status"] if value is None else f"{value:.2e}"


def machine_line(results: dict) -> str:
    m, g = results["machine"], results["grid"]
    return (f"{results['created']} · {m['cpu']} · {m['threads']} threads · device {m['device']}"
            f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''} · torch {m['torch']} · "
            f"subq {m['subq']} · commit {(m.get('git_commit') or 'unknown')[:10]} · "
            f"B={g['batch']} H={g['heads']} D={g['dim']} {g['dtype']}")


#: How runs before the probe was recorded in results.json measured memory.
_CHILD_PROBE = ("peak resident memory above the baseline after imports and inputs, each "
                "configuration in a fresh child process")


def render_markdown(results: dict, image_prefix: str = "") -> str:
    """The report: machine line, per-pattern tables, plots, skipped and failed configurations."""
    grid = results["grid"]
    lines = ["# subq efficiency benchmark (CAB-style)", "", machine_line(results), "",
             f"Run time {results['wall_s'] / 60:.1f} min. Times: median of the timed runs after a "
             f"warm-up ({REPEATS[0]} to {REPEATS[1]}, as many as fit {TIME_TARGET_MS / 1e3:g} s; "
             f"{LONG_CALL_REPEATS} for a call of {LONG_CALL_MS / 1e3:g} s or more; the counts "
             "are in results.json), forward without autograd; memory: "
             f"{results.get('memory_probe', _CHILD_PROBE)}. Budgets: "
             f"{grid['memory_gib']:g} GiB, {grid['time_s']:g} s per call or "
             f"{grid.get('time_vs_dense', 0):g}x dense's call at the same length, the larger "
             "(a method predicted past both is skipped, the prediction given below: a "
             "log-log fit through its last three measured lengths)"
             + (f", {grid['total_s']:g} s per run" if grid.get("total_s") else "") + ". "
             "`dense` is SDPA (subq's dense mechanism), `vanilla` the materialised "
             "softmax(QK^T)V that CAB compares against; peers are labelled `peer`.", ""]
    lines += headline_section(results)
    if results.get("missing_peers"):
        lines += ["Missing peers (not installed or failed to import): "
                  + ", ".join(f"`{k}` ({v})" for k, v in results["missing_peers"].items()), ""]
    for pattern in _patterns(results):
        lines += pattern_section(results, pattern)
        short = Pattern(pattern).short
        lines += [f"![time {short}]({image_prefix}bench_time_{short}.png) "
                  f"![memory {short}]({image_prefix}bench_memory_{short}.png) "
                  f"![efficiency {short}]({image_prefix}bench_efficiency_{short}.png)", ""]
    lines += ["## error vs L", "", f"![error]({image_prefix}bench_error.png)", ""]
    problems = [r for r in results["rows"] if r["status"] != "ok" or r.get("fwd_bwd_error")
                or r.get("memory_error") or r.get("mem_fwd_bwd_error")]
    if problems:
        lines += ["## skipped and failed configurations", ""]
        lines += _table(["method", "pattern", "L", "status", "reason"], (
            [f"`{r['method']}`", r["pattern"], str(r["length"]), r["status"],
             _reason(r).replace("|", "/").replace("\n", " ")[:200]] for r in problems))
    return "\n".join(lines) + "\n"


def _reason(row: dict) -> str:
    for key in ("reason", "fwd_bwd_error", "memory_error", "mem_fwd_bwd_error"):
        if row.get(key):
            return f"{key}: {row[key]}" if key != "reason" else row[key]
    return ""
