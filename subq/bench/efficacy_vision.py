"""The noncausal side of CAB's efficacy comparison: Fashion-MNIST classifiers trained by ``subq
train vision`` at equal parameters (every ViT is sized to GroupMamba's count at the preset) and
equal steps, batch, data order and seeds, one fresh process per run (the LM grid's runner,
:func:`subq.bench.efficacy.run_grid`), and the report of their test accuracy beside CAB's
compositional index over the mechanisms the LM grid also measured.

Grid (:data:`VISION_GRID`): GroupMamba with and without its distillation (3 seeds each; the
teacher is the ``cnn`` entry's run), and a ViT for each attention. ``mechanism`` names the LM
grid entry of the same mechanism (GroupMamba's selective scan beside Mamba), which is what
the compositional index pairs:

    z(bpb) = -(bpb - mean) / std,  z(acc) = (acc - mean) / std    (over the paired mechanisms)
    index  = (z(bpb) + z(acc)) / 2                                  (CAB: mean over tasks)

``subq bench efficacy --tasks vision`` runs it into ``OUT/vision``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..recipes.trainer import read_metrics
from .compositional import compositional_index, population_metrics
from .docs_section import write_section
from .efficacy import RESULT, read_rusage, run_name


@dataclass(frozen=True)
class VisionEntry:
    """One backbone of the vision grid; ``teacher``: the entry whose first seed's run GroupMamba
    distils; ``mechanism``: the LM grid entry of the same mechanism (None: no LM twin)."""

    name: str
    backbone: str
    seeds: tuple[int, ...] = (0,)
    teacher: str | None = None
    mechanism: str | None = None
    note: str = ""
    transplant: None = None


_SEEDS = (0, 1, 2)

VISION_GRID: tuple[VisionEntry, ...] = (
    VisionEntry("cnn", "cnn", note="a plain CNN, the distillation teacher (not "
                "parameter-matched)"),
    VisionEntry("groupmamba", "groupmamba", seeds=_SEEDS, mechanism="mamba",
                note="GroupMamba, labels only"),
    VisionEntry("groupmamba+distill", "groupmamba", seeds=_SEEDS, teacher="cnn",
                note="GroupMamba with its hard distillation from the cnn"),
    VisionEntry("vit-dense", "vit-dense", mechanism="dense", note="ViT, softmax attention"),
    VisionEntry("vit-linear", "vit-linear", mechanism="linear",
                note="ViT, LiT's linear attention"),
    VisionEntry("vit-combiner", "vit-combiner", mechanism="combiner-axial",
                note="ViT, Combiner-Axial"),
    VisionEntry("vit-hierarchical_local", "vit-hierarchical_local",
                note="ViT, Scale-DiT's hierarchical local attention"),
    VisionEntry("vit-local", "vit-local", mechanism="local", note="ViT, sliding window"),
)


@dataclass(frozen=True)
class VisionBudget:
    """What every vision run gets: the preset (parameter-matched ViTs), steps, batch of
    images, learning rate, evaluation cadence (on the whole test split) and data."""

    preset: str = "micro"
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    eval_every: int = 250
    data: str | None = None

    def command(self, entry: VisionEntry, seed: int, out: Path, chunk: float | None,
                source: Path | None = None) -> list[str]:
        """The ``subq train vision`` command of one run (resumes from ``out``)."""
        cmd = [sys.executable, "-m", "subq", "train", "vision", "--backbone", entry.backbone,
               "--preset", self.preset, "--steps", str(self.steps), "--batch", str(self.batch),
               "--lr", repr(self.lr), "--seed", str(seed), "--eval-every",
               str(self.eval_every), "--checkpoint-every", "50", "--log-every", "10",
               "--no-progress", "--resume", "--out", str(out)]
        if source is not None:
            cmd += ["--teacher", str(source)]
        if self.data is not None:
            cmd += ["--data", self.data]
        if chunk is not None:
            cmd += ["--time-limit", repr(float(chunk))]
        return cmd


INFERENCE = "inference.json"
INFERENCE_BATCH = 256


def inference_speed(folder: Path, repeats: int = 5) -> float:
    """Test-time images per second of a finished run's model: the forward of
    ``INFERENCE_BATCH`` seeded random 28 x 28 images (eval mode, no gradient, one thread),
    the median of ``repeats`` after one warm-up; measured once, then read from
    ``folder/inference.json``."""
    import torch

    from ..recipes.vision import load_vision_model

    path = folder / INFERENCE
    if path.exists():
        return json.loads(path.read_text())["images_per_s"]
    model = load_vision_model(folder)
    images = torch.rand(INFERENCE_BATCH, 1, 28, 28,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                tic = time.perf_counter()
                model(images)
                if i:
                    times.append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)
    speed = INFERENCE_BATCH / statistics.median(times)
    path.write_text(json.dumps({"images_per_s": speed, "batch": INFERENCE_BATCH,
                                "repeats": repeats, "threads": 1}) + "\n")
    return speed


def _run_summary(folder: Path) -> dict[str, Any]:
    metrics = read_metrics(folder)
    tests = [m for m in metrics if m.get("split") == "test"]
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    rusage = read_rusage(folder)
    finished = (folder / RESULT).exists()
    return {"finished": finished, "accuracy": tests[-1]["accuracy"] if tests else None,
            "curve": [(e["step"], e["accuracy"]) for e in tests],
            "images_per_s": statistics.median(speeds) if speeds else None,
            "inference_images_per_s": inference_speed(folder) if finished else None,
            "peak_rss_mib": max((r["max_rss_mib"] for r in rusage), default=None),
            "wall_s": sum(r["wall_s"] for r in rusage),
            "parameters": (json.loads((folder / RESULT).read_text()).get("parameters")
                           if finished else None)}


def collect_vision(out: Path, grid: tuple[VisionEntry, ...] = VISION_GRID
                   ) -> list[dict[str, Any]]:
    """One row per entry: mean test accuracy over its finished seeds (and each seed's),
    parameters, median images/s, peak RSS, summed wall time, and its status."""
    rows = []
    for entry in grid:
        runs = {seed: _run_summary(out / "runs" / run_name(entry, seed)) for seed in entry.seeds
                if (out / "runs" / run_name(entry, seed)).exists()}
        done = {s: r for s, r in runs.items() if r["finished"]}
        status = "finished" if len(done) == len(entry.seeds) else (
            "partial" if done else "unfinished" if runs else "missing")
        accuracies = [r["accuracy"] for r in done.values()]
        speeds = [r["images_per_s"] for r in done.values() if r["images_per_s"]]
        inference = [r["inference_images_per_s"] for r in done.values()]
        rows.append({
            "name": entry.name, "backbone": entry.backbone, "mechanism": entry.mechanism,
            "note": entry.note, "status": status, "seeds": sorted(done),
            "accuracy": statistics.fmean(accuracies) if accuracies else None,
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "per_seed": {str(s): r["accuracy"] for s, r in done.items()},
            "curves": {str(s): r["curve"] for s, r in runs.items()},
            "parameters": next((r["parameters"] for r in done.values() if r["parameters"]),
                               None),
            "images_per_s": statistics.median(speeds) if speeds else None,
            "inference_images_per_s": statistics.median(inference) if inference else None,
            "peak_rss_mib": max((r["peak_rss_mib"] for r in done.values()
                                 if r["peak_rss_mib"] is not None), default=None),
            "wall_s": sum(r["wall_s"] for r in done.values())})
    return rows


def compositional_rows(lm_rows: list[dict[str, Any]], vision_rows: list[dict[str, Any]],
                       training_length: str) -> list[dict[str, Any]]:
    """CAB's compositional index of every mechanism measured on both tasks (held-out bits
    per byte at the LM's training length, lower better; test accuracy, higher better),
    standardised over those mechanisms; best first."""
    lm = {r["name"]: r["bpb"].get(training_length) for r in lm_rows}
    paired = {r["mechanism"]: {"bpb": lm[r["mechanism"]], "accuracy": r["accuracy"],
                               "vision": r["name"]}
              for r in vision_rows if r["mechanism"] in lm and lm[r["mechanism"]] is not None
              and r["accuracy"] is not None}
    if len(paired) < 2:
        return []
    scores = {m: {"bpb": p["bpb"], "accuracy": p["accuracy"]} for m, p in paired.items()}
    metrics = population_metrics(scores, [("bpb", "lm", False), ("accuracy", "vision", True)])
    rows = [{"mechanism": m, "vision": p["vision"], "bpb": p["bpb"], "accuracy": p["accuracy"],
             "index": compositional_index(scores[m], metrics)} for m, p in paired.items()]
    return sorted(rows, key=lambda r: -r["index"])


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def render_vision(budget: dict[str, Any], rows: list[dict[str, Any]],
                  index_rows: list[dict[str, Any]]) -> str:
    """The vision table and the compositional index as markdown."""
    lines = [
        "## Vision: Fashion-MNIST classifiers at equal parameters and steps", "",
        f"Budget per run: preset `{budget['preset']}`, {budget['steps']:,} steps of "
        f"{budget['batch']} images (random crop and flip), AdamW lr {budget['lr']:g} (the "
        "vision recipe's warm-up, cosine and weight decay), scored on the whole test split "
        "at the end; accuracy: the mean over the entry's seeds (± their standard "
        "deviation). Training images/s: the median logged throughput (one thread, runs "
        f"sharing the machine); inference images/s: the trained model's forward on batches "
        f"of {INFERENCE_BATCH}, one thread, median of 5, measured when the report is first "
        "written; peak RSS: the training process's.", "",
        "| backbone | parameters | test accuracy | per seed | training images/s | "
        "inference images/s | peak RSS (MiB) | wall (s) | status |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["accuracy"] or 0)):
        spread = f" ± {r['accuracy_std']:.4f}" if r["accuracy_std"] is not None else ""
        seeds = ", ".join(f"{a:.4f}" for _, a in sorted(r["per_seed"].items()))
        lines.append(
            f"| `{r['name']}` | {_fmt(r['parameters'], ',')} | {_fmt(r['accuracy'])}{spread} "
            f"| {seeds or '—'} | {_fmt(r['images_per_s'], ',.0f')} | "
            f"{_fmt(r.get('inference_images_per_s'), ',.0f')} | "
            f"{_fmt(r['peak_rss_mib'], ',.0f')} | {r['wall_s']:,.0f} | {r['status']} |")
    lines += ["", "Entries:", ""] + [f"* `{r['name']}`: {r['note']}" for r in rows]
    if index_rows:
        lines += [
            "", "## CAB's compositional index over both tasks", "",
            "Per mechanism measured on both tasks: z-scores over these mechanisms of the LM's "
            "held-out bits per byte at the training length (lower is better, so negated) and "
            "of the ViT's (GroupMamba's, for Mamba) test accuracy, averaged over the two tasks "
            "(CAB's index with its constants taken from the field compared here).", "",
            "| mechanism | vision backbone | LM bits per byte | test accuracy | index |",
            "|---|---|---|---|---|"]
        lines += [f"| `{r['mechanism']}` | `{r['vision']}` | {r['bpb']:.3f} | "
                  f"{r['accuracy']:.4f} | {r['index']:+.3f} |" for r in index_rows]
    return "\n".join(lines) + "\n"


__all__ = ["VISION_GRID", "VisionBudget", "VisionEntry", "collect_vision",
           "compositional_rows", "render_vision"]


VISION_MARKERS = ("<!-- efficacy-vision:start -->", "<!-- efficacy-vision:end -->")
"""Where the vision report goes in ``docs/efficacy.md``."""


def write_vision_report(out: Path, lm_out: Path | None, grid: tuple[VisionEntry, ...],
                        docs: Path | None = None) -> Path:
    """``OUT/vision.json`` and ``OUT/vision.md`` (and with ``docs`` the section between
    :data:`VISION_MARKERS` of ``docs/efficacy.md`` and ``docs/data/efficacy_vision.json``);
    the compositional index reads the LM grid's results in ``lm_out`` when there are any."""
    from .efficacy import DEFAULT_GRID
    from .efficacy_report import collect

    budget = json.loads((out / "budget.json").read_text())
    rows = collect_vision(out, grid)
    index_rows: list[dict[str, Any]] = []
    if lm_out is not None and (lm_out / "budget.json").exists():
        lm = collect(lm_out, DEFAULT_GRID)
        index_rows = compositional_rows(lm["rows"], rows, str(lm["lengths"][0]))
    record = {"budget": budget, "rows": rows, "compositional_index": index_rows}
    text = render_vision(budget, rows, index_rows)
    (out / "vision.json").write_text(json.dumps(record, indent=1) + "\n")
    path = out / "vision.md"
    path.write_text(text)
    if docs is not None:
        (docs / "data").mkdir(parents=True, exist_ok=True)
        (docs / "data" / "efficacy_vision.json").write_text(json.dumps(record, indent=1) + "\n")
        write_section(docs / "efficacy.md", VISION_MARKERS, text)
    return path
