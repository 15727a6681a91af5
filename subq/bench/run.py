"""The efficiency grid: every method x pattern it supports x length, length by length, with
budgets, progress and the ``results/<timestamp>/`` folder (results.json, results.csv)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import subq
from subq.registry import Pattern

from .measure import (
    MEMORY_PROBE,
    REPEATS,
    TIME_TARGET_MS,
    Config,
    make_inputs,
    measure_config,
    repeats_for,
)
from .methods import Method, all_methods, missing_peers

GIB = 2.0 ** 30
CSV_FIELDS = ["method", "source", "pattern", "length", "status", "reason", "fwd_ms",
              "fwd_bwd_ms", "mem_fwd_mib", "mem_fwd_bwd_mib", "rel_rms_vs_dense", "repeats"]


@dataclass
class Grid:
    """What to measure and the budgets: ``memory_gib`` per configuration; for one call (the
    forward+backward, the longer), the larger of ``time_s`` and ``time_vs_dense`` times dense's
    own call at that pattern and length (a method about as fast as the yardstick is measured
    wherever dense is); ``total_s`` for the whole run (none by default)."""

    methods: list[str]
    patterns: list[Pattern]
    lengths: list[int]
    batch: int = 1
    heads: int = 8
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)
    seed: int = 0
    memory_gib: float = 12.0
    time_s: float = 60.0
    time_vs_dense: float = 1.5
    total_s: float = math.inf
    error_max_length: int = 4096


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def host_info() -> dict:
    """CPU, platform, versions and commit of the machine running a benchmark."""
    return {"cpu": _cpu_model(), "machine": platform.machine(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "subq": subq.__version__, "git_commit": _git_commit()}


def machine_info(grid: Grid) -> dict:
    """The machine line of a run: CPU, threads, versions, commit, device."""
    info = {**host_info(), "threads": grid.threads, "device": grid.device}
    if grid.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(grid.device))
    return info


def _predict(series: list[dict], key: str, length: int) -> float | None:
    """Extrapolate ``key`` to ``length`` from the last three measured points: the least-squares
    log-log slope (clamped to [1, 2.5]; slope 2 from a single point) through the last one.
    Three points, not two: one noisy timing tilts a two-point slope twice as much."""
    points = [(math.log(r["length"]), math.log(r[key])) for r in series
              if r.get("status") == "ok" and r.get(key)][-3:]
    if not points:
        return None
    slope = 2.0
    if len(points) >= 2:
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        fitted = (sum((x - mean_x) * (y - mean_y) for x, y in points)
                  / sum((x - mean_x) ** 2 for x, _ in points))
        slope = min(2.5, max(1.0, fitted))
    last_x, last_y = points[-1]
    return math.exp(last_y + slope * (math.log(length) - last_x))


def budget_reason(series: list[dict], length: int, grid: Grid, elapsed: float,
                  dense_series: list[dict] | None = None) -> str | None:
    """Why one configuration is skipped, or ``None`` to measure it.

    Each reason names the budget and the prediction for this call, extrapolated from the
    lengths measured before it (:func:`_predict`; a length skipped for a budget only predicts
    a longer one past it too); dense's call at this length comes from ``dense_series``
    (dense is measured first at every length). A method that failed at a smaller length is
    not retried. The run budget applies only when one is set (``grid.total_s``): the
    default grid is chosen to fit without it, so that no cell it lists goes unmeasured for
    lack of run time.
    """
    failed = [r for r in series if r["status"] == "error"]
    if failed:
        return f"failed at L={failed[0]['length']} ({failed[0].get('reason', 'error')[:80]})"
    mem = max(filter(None, [_predict(series, "mem_fwd_mib", length),
                            _predict(series, "mem_fwd_bwd_mib", length)]), default=None)
    if mem is not None and mem * 2.0 ** 20 > grid.memory_gib * GIB:
        return f"predicted {mem / 1024:.1f} GiB > memory budget {grid.memory_gib:g} GiB"
    call_ms = max(filter(None, [_predict(series, "fwd_ms", length),
                                _predict(series, "fwd_bwd_ms", length)]), default=None)
    dense_now = next((r for r in dense_series or []
                      if r.get("length") == length and r["status"] == "ok"), {})
    dense_call_ms = max(dense_now.get("fwd_ms") or 0.0, dense_now.get("fwd_bwd_ms") or 0.0)
    yardstick = bool(series) and series[0].get("method") == "dense"  # every ratio needs it
    budget_s = max(grid.time_s, grid.time_vs_dense * dense_call_ms / 1e3)
    if call_ms is not None and call_ms / 1e3 > budget_s and not yardstick:
        dense = ("" if not dense_call_ms else f" (the larger of {grid.time_s:g} s and "
                 f"{grid.time_vs_dense:g}x dense's {dense_call_ms / 1e3:.1f} s)")
        return f"predicted {call_ms / 1e3:.1f} s per call > time budget {budget_s:.1f} s{dense}"
    if call_ms is not None and math.isfinite(grid.total_s):
        cost = predicted_cost_s(_predict(series, "fwd_ms", length),
                                _predict(series, "fwd_bwd_ms", length))
        if elapsed + cost > grid.total_s:
            return f"predicted {cost:.0f} s would pass the run budget {grid.total_s:g} s"
    return None


def predicted_cost_s(fwd_ms: float | None, fwd_bwd_ms: float | None) -> float:
    """Seconds one configuration takes (:func:`measure_config` with its defaults): the
    timed runs (:func:`repeats_for`) and the untimed ones, for the forward its warm-up and its
    memory probe, for the forward+backward its warm-up (which is probed)."""
    total = 0.0
    for call_ms, untimed in ((fwd_ms, 2), (fwd_bwd_ms, 1)):
        if call_ms:
            total += (repeats_for(call_ms, TIME_TARGET_MS, *REPEATS) + untimed) * call_ms
    return total / 1e3


def _dense_output(config: Config) -> torch.Tensor:
    q, k, v = make_inputs(config)
    pattern = Pattern(config.pattern)
    with torch.no_grad():
        return subq.attention(q, k, v, method="dense", causal=pattern.causal, cross=pattern.cross)


def measure_one(config: Config, dense_out: torch.Tensor | None) -> dict:
    """Its times, error and memory (:func:`measure_config`); never raises."""
    try:
        return {"status": "ok", **measure_config(config, dense_out, memory=True)}
    except Exception as exc:  # recorded, the run goes on
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}


def run_grid(grid: Grid, progress=None) -> dict:
    """Measure the grid length by length and, at each length, pattern by pattern, so every
    pattern reaches the long lengths (a run budget, when one is set, cuts the longest lengths
    of every pattern alike); return the results document (machine, grid, missing peers, one
    row per configuration)."""
    torch.set_num_threads(grid.threads)
    methods = all_methods()
    chosen: list[Method] = [methods[name] for name in grid.methods if name in methods]
    rows: list[dict] = []
    series: dict[tuple[str, Pattern], list[dict]] = {}
    start = time.perf_counter()
    for length in sorted(grid.lengths):
        for pattern in grid.patterns:
            dense_out = None
            for method in chosen:
                if pattern not in method.patterns:
                    continue
                config = Config(method.name, pattern.value, length, grid.batch, grid.heads,
                                grid.dim, grid.dtype, grid.device, grid.seed, grid.threads)
                history = series.setdefault((method.name, pattern), [])
                reason = budget_reason(history, length, grid, time.perf_counter() - start,
                                       series.get(("dense", pattern)))
                if reason is not None:
                    row = {"status": "skipped", "reason": reason}
                else:
                    if dense_out is None and length <= grid.error_max_length:
                        dense_out = _dense_output(config)
                    started = time.perf_counter()
                    row = measure_one(config, dense_out)
                    row["wall_s"] = time.perf_counter() - started
                row.update(method=method.name, source=method.source, label=method.label,
                           pattern=pattern.value, length=length)
                history.append(row)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return {
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(grid),
        "grid": {**{k: v for k, v in vars(grid).items() if k != "patterns"},
                 "patterns": [p.value for p in grid.patterns],
                 "total_s": None if math.isinf(grid.total_s) else grid.total_s},
        "unknown_methods": [n for n in grid.methods if n not in methods],
        "missing_peers": missing_peers(),
        "memory_probe": MEMORY_PROBE,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }


def count_configs(grid: Grid) -> int:
    methods = all_methods()
    return len(grid.lengths) * sum(p in methods[n].patterns for n in grid.methods if n in methods
                                   for p in grid.patterns)


def write_results(results: dict, folder: Path) -> None:
    """results.json (everything) and results.csv (one row per configuration)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
