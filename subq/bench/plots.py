"""PNG plots of an efficiency run (matplotlib, Agg): time and memory vs L per pattern on
log-log axes, efficiency lengths as bars (CAB's figure 2 style), error vs L."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from subq.registry import Pattern  # noqa: E402

from .report import BASELINES, _methods, _patterns, efficiency, series  # noqa: E402

_STYLE = {"subq": "-", "peer": "--", "baseline": ":"}


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (110 dpi, the folder made) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _source(results: dict, method: str) -> str:
    return next(r["source"] for r in results["rows"] if r["method"] == method)


def _curves(results: dict, pattern: str, key: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in _methods(results, pattern):
        points = series(results, m, pattern, key)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, _STYLE.get(_source(results, m), "-"), marker="o", label=m,
                    linewidth=2.5 if m in BASELINES else 1.2)
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel=ylabel,
           title=f"{pattern}: {ylabel}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(results: dict, pattern: str, path: Path) -> None:
    names, time_len, mem_len = [], [], []
    for m in _methods(results, pattern):
        if m in BASELINES:
            continue
        names.append(m)
        time_len.append(efficiency(results, m, pattern, "fwd_ms")[0] or 0.0)
        mem_len.append(efficiency(results, m, pattern, "mem_fwd_mib")[0] or 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.8), sharey=True)
    for ax, values, title in ((axes[0], time_len, "running time"), (axes[1], mem_len, "memory")):
        ax.barh(names, values, color="tab:blue")
        ax.set(title=f"efficiency length vs dense: {title}", xlabel="L (0: no crossover)")
        ax.invert_yaxis()
    fig.suptitle(pattern)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _errors(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pattern in _patterns(results):
        for m in _methods(results, pattern):
            points = [(n, max(e, 1e-16)) for n, e in series(results, m, pattern,
                                                             "rel_rms_vs_dense")]
            if points and m != "dense":
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, _STYLE.get(_source(results, m), "-"), marker="o",
                        label=f"{m} ({Pattern(pattern).short})")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L",
           ylabel="relative RMS error vs dense", title="error against dense attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, folder: Path) -> list[Path]:
    """Write every plot into ``folder``; returns the paths (named ``bench_*.png``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pattern in _patterns(results):
        short = Pattern(pattern).short
        for key, label, stem in (("fwd_ms", "forward time (ms)", "time"),
                                 ("mem_fwd_mib", "forward peak memory (MiB)", "memory")):
            path = folder / f"bench_{stem}_{short}.png"
            _curves(results, pattern, key, label, path)
            written.append(path)
        path = folder / f"bench_efficiency_{short}.png"
        _bars(results, pattern, path)
        written.append(path)
    path = folder / "bench_error.png"
    _errors(results, path)
    return [*written, path]
