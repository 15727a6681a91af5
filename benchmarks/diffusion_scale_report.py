"""The report of Scale-DiT's experiment (benchmarks/diffusion_scale.sh): the samples' FID-FMNIST
per size, attention and ablation, the cost of one high-resolution step against dense
attention, the bridges' held-out loss, grids, and a JSON of every number, written into
docs/diffusion.md between its scale-dit markers.

    python benchmarks/diffusion_scale_report.py results/diffusion/scale --docs docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy
from PIL import Image

from subq.bench.docs_section import write_section
from subq.models.dit import DiTConfig
from subq.models.scale_dit import ScaleDiT, ScaleDiTConfig
from subq.recipes.summary import summarise

MARKERS = ("<!-- scale-dit-report:start -->", "<!-- scale-dit-report:end -->")
SHOWN_WIDTH = 240
"""Grids in the docs keep as many samples per class as fit this many pixels (at least one)."""


def collect(folder: Path) -> dict[str, Any]:
    samples = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
               if p.stem != "steps"}
    bridges = {}
    for run in sorted(folder.glob("bridge-*")):
        summary = summarise(run)
        tests = [e for e in summary["evals"] if e["split"] == "test"]
        bridges[run.name] = {
            "steps": summary["step"], "train_seconds": summary["train_seconds"],
            "trainer": {k: summary["config"]["trainer"][k] for k in ("batch", "lr", "seed")},
            "lora_parameters": _lora_count(summary), "test": tests}
    steps_path = folder / "steps.json"
    steps = json.loads(steps_path.read_text()) if steps_path.exists() else None
    return {"samples": samples, "bridges": bridges, "steps": steps}


def _lora_count(summary: dict[str, Any]) -> int:
    task = summary["config"]["task"]
    model = ScaleDiT(DiTConfig(**task["model"]), ScaleDiTConfig(**task["scale"]))
    return sum(p.numel() for p in model.lora_parameters())


def _label(record: dict[str, Any]) -> str:
    parts = [record["scale"]["attention"]]
    if not record["guidance"]:
        parts.append("no guide (the DiT directly at this size)")
    elif not record["bridge"]:
        parts.append("no bridge")
    return ", ".join(parts)


def render(data: dict[str, Any], images: dict[str, str]) -> str:
    lines = ["| size | high-res pass | FID-FMNIST (at 28) | FID-FMNIST of its guides | "
             "high-res steps | sampling s / image | grid |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(data["samples"].items(),
                          key=lambda kv: (kv[1]["scale"]["resolution"], kv[0])):
        guide = f"{r['fid_fmnist_low_res']:.1f}" if "fid_fmnist_low_res" in r else "—"
        grid = f"[grid]({images[name]})" if name in images else ""
        lines.append(f"| {r['scale']['resolution']} | {_label(r)} | {r['fid_fmnist']:.1f} | "
                     f"{guide} | {r['high_res_steps']} of {r['steps']} | "
                     f"{r['seconds'] / r['samples']:.3f} | {grid} |")
    some = next(iter(data["samples"].values()), None)
    if some:
        lines.append("")
        lines.append(f"FID-FMNIST on {some['fid_samples']} samples (labels cycling through the "
                     f"classes, seed {some['seed']}, {some['sampler']} with {some['steps']} "
                     f"steps, guidance scale {some['cfg_scale']}), area-downsampled to 28 x 28, "
                     "against the 10,000 test images; the guides are the low-resolution "
                     "pass's samples, the same images for every row of one seed.")
    if data["steps"]:
        s = data["steps"]
        lines += ["", "One high-resolution denoising step (batch "
                  f"{s['rows'][0]['batch']}, guide included, one thread, median of "
                  f"{s['repeats']} after {s['warmup']} warm-ups; {s['cpu']}, torch "
                  f"{s['torch']}):", "",
                  "| size | tokens | mask density | hierarchical local s | dense s | "
                  "dense / local | local MiB | dense MiB |", "|---|---|---|---|---|---|---|---|"]
        by = {(r["resolution"], r["attention"]): r for r in s["rows"]}
        for size in sorted({r["resolution"] for r in s["rows"]}):
            hl, dense = by[(size, "hierarchical_local")], by[(size, "softmax")]
            lines.append(f"| {size} | {hl['tokens']:,} | {hl['mask_density']:.3f} | "
                         f"{hl['seconds']:.3f} | {dense['seconds']:.3f} | "
                         f"{dense['seconds'] / hl['seconds']:.2f}x | "
                         f"{hl['peak_memory_mib']:.0f} | {dense['peak_memory_mib']:.0f} |")
    if data["bridges"]:
        lines += ["", "| bridge | LoRA parameters | steps x batch | training s | held-out loss "
                  "(first / last evaluation) |", "|---|---|---|---|---|"]
        for name, b in data["bridges"].items():
            first, last = b["test"][0], b["test"][-1]
            lines.append(f"| {name} | {b['lora_parameters']:,} | {b['steps']} x "
                         f"{b['trainer']['batch']} | {b['train_seconds']:.0f} | "
                         f"{first['loss']:.4f} (step {first['step']}) / {last['loss']:.4f} "
                         f"(step {last['step']}) |")
    return "\n".join(lines)


def crop_grid(source: Path, target: Path, width: int) -> None:
    """The first columns of a grid (one row per class) that fit ``width`` pixels."""
    pixels = numpy.array(Image.open(source))
    tile = pixels.shape[0] // 10
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[:, :max(1, width // tile) * tile]).save(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--docs", default=None)
    args = parser.parse_args()
    folder = Path(args.folder)
    data = collect(folder)
    images = {}
    if args.docs:
        docs = Path(args.docs)
        for name in data["samples"]:
            target = docs / "img" / f"scale_dit_{name}.png"
            crop_grid(folder / f"{name}.png", target, SHOWN_WIDTH)
            images[name] = f"img/{target.name}"
        (docs / "data").mkdir(parents=True, exist_ok=True)
        (docs / "data" / "scale_dit.json").write_text(json.dumps(data, indent=1) + "\n")
    text = render(data, images)
    print(text)
    if args.docs:
        write_section(Path(args.docs) / "diffusion.md", MARKERS, text)


if __name__ == "__main__":
    main()
