"""PNG plots of an efficiency run (matplotlib, Agg): time and memory vs L per pattern on
log-log axes, efficiency lengths as bars (CAB's figure 2 style), error vs L."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from subq.registry import Pattern  # noqa: E402

from .cab import EXTRAPOLATION_FACTOR  # noqa: E402
from .report import (  # noqa: E402
    BASELINES,
    _lengths,
    _methods,
    _patterns,
    efficiency,
    efficiency_cell,
    series,
)

#: Line style and marker by source: subq's mechanisms solid with circles, peers dashed with
#: squares, the baselines (dense SDPA, vanilla) thick and dotted with diamonds.
_STYLE = {"subq": ("-", "o"), "peer": ("--", "s"), "baseline": (":", "D")}


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (110 dpi, the folder made) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _source(results: dict, method: str) -> str:
    return next(r["source"] for r in results["rows"] if r["method"] == method)


def method_colours(results: dict) -> dict[str, tuple]:
    """One colour per method of the run, the same in every plot (``dense`` black)."""
    names = list(dict.fromkeys(r["method"] for r in results["rows"]))
    palette = plt.get_cmap("tab20").colors
    others = [m for m in names if m != "dense"]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    colours["dense"] = (0.0, 0.0, 0.0)
    return colours


def _line(ax, results: dict, method: str, points, colours: dict, label: str,
          hollow: bool = False) -> None:
    style, marker = _STYLE.get(_source(results, method), ("-", "o"))
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, linestyle=style, marker=marker, color=colours[method], label=label,
            linewidth=2.5 if method in BASELINES else 1.3, markersize=4,
            markerfacecolor="none" if hollow else colours[method])


def _curves(results: dict, pattern: str, key: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = method_colours(results)
    for m in _methods(results, pattern):
        points = series(results, m, pattern, key)
        if points:
            _line(ax, results, m, points, colours,
                  m if _source(results, m) != "peer" else f"{m} (peer)")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel=ylabel,
           title=f"{pattern}: {ylabel}")
    ax.set_xticks(_lengths(results), [f"{n:,}" for n in _lengths(results)])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def _bars(results: dict, pattern: str, path: Path) -> None:
    """CAB's efficiency lengths against dense as bars on a log axis, each labelled with the
    report's text (``< L_min``, the measured crossover, the extrapolation, ``never``)."""
    colours = method_colours(results)
    names = [m for m in _methods(results, pattern) if m not in BASELINES]
    longest = max(_lengths(results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 1.8), sharey=True)
    for ax, key, title in ((axes[0], "fwd_ms", "running time"),
                           (axes[1], "mem_fwd_mib", "memory")):
        values, texts = [], []
        for m in names:
            fitted, crossover = efficiency(results, m, pattern, key)
            text = efficiency_cell(results, m, pattern, key)
            if text.startswith("<"):
                value = float(min(n for n, _ in series(results, m, pattern, key)))
            elif fitted and fitted <= EXTRAPOLATION_FACTOR * longest:
                value = fitted
            else:
                value = float(crossover or 0)  # 0: no bar, the text says why
            values.append(value)
            texts.append(text)
        left = min(_lengths(results)) / 4
        rows = range(len(names))
        ax.barh(rows, [max(v - left, 0.0) for v in values], left=left,
                color=[colours[m] for m in names])
        for row, (value, text) in zip(rows, zip(values, texts, strict=True), strict=True):
            ax.text(value or left, row, f" {text}", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(left=left, right=EXTRAPOLATION_FACTOR * longest * 8)
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first method on top
        ax.set_yticks(rows, names)
        ax.axvline(longest, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"efficiency length vs dense: {title}",
               xlabel=f"L (dotted: longest measured, {longest:,})")
    fig.suptitle(pattern)
    save_figure(fig, path)


def _errors(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = method_colours(results)
    for index, pattern in enumerate(_patterns(results)):  # later patterns: hollow markers
        for m in _methods(results, pattern):
            points = [(n, max(e, 1e-16)) for n, e in series(results, m, pattern,
                                                             "rel_rms_vs_dense")]
            if points and m != "dense":
                _line(ax, results, m, points, colours, f"{m} ({Pattern(pattern).short})",
                      hollow=index > 0)
    ax.set(xscale="log", yscale="log", xlabel="sequence length L",
           ylabel="relative RMS error vs dense", title="error against dense attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


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
