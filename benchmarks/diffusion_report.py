"""The report of LiT's ablation (benchmarks/diffusion_lit.sh): a table of the held-out diffusion
loss and FID-FMNIST per run and evaluation step, the steps each student needs to reach the
teacher's final FID-FMNIST, the curves as a picture, sample grids of every run, and a JSON of
every point, so the docs keep what the runs showed after their folders are gone.

    python benchmarks/diffusion_report.py results/diffusion --teacher teacher-softmax \\
        --students lit-scratch lit-inherit lit-inherit-hybrid --docs docs
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from subq.bench.docs_section import write_section
from subq.recipes.summary import summarise

MARKERS = ("<!-- diffusion-report:start -->", "<!-- diffusion-report:end -->")


def collect(out: Path, names: list[str]) -> dict[str, Any]:
    runs = {}
    for name in names:
        run = summarise(out / name)
        task = run["config"]["task"]
        tests = [e for e in run["evals"] if e["split"] == "test"]
        runs[name] = {
            "attention": task["attention"], "heads": task["model"]["attention_heads"]
            or task["model"]["heads"], "init": task["init"], "distill": task["distill"],
            "parameters": run["parameters"], "steps": run["step"],
            "train_seconds": run["train_seconds"],
            "images_per_s": run["median_tokens_per_s"],
            "trainer": {k: run["config"]["trainer"][k]
                        for k in ("batch", "lr", "warmup", "min_lr_ratio", "seed")},
            "fid_samples": task["fid_samples"], "sample_steps": task["sample_steps"],
            "sampler": task["sampler"], "cfg_scale": task["cfg_scale"],
            "eval_images": tests[-1]["images"] if tests else 0,
            "evals": [{k: e[k] for k in ("step", "loss", "mse", "vb", "fid_fmnist") if k in e}
                      for e in tests],
        }
    return runs


def steps_to_reach(evals: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluated step whose FID-FMNIST is at most ``target``."""
    return next((e["step"] for e in evals if e.get("fid_fmnist", float("inf")) <= target), None)


def render(runs: dict[str, Any], teacher: str, students: list[str], images: str) -> str:
    final = runs[teacher]["evals"][-1]
    target = final["fid_fmnist"]
    steps = sorted({e["step"] for name in students for e in runs[name]["evals"]})
    head = ("| run | attention (heads) | init | distill | parameters | images/s | "
            + " | ".join(f"FID @ {s}" for s in steps)
            + " | held-out loss (final) | steps to teacher's FID |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in [teacher, *students]:
        run = runs[name]
        fid = {e["step"]: e["fid_fmnist"] for e in run["evals"]}
        reach = steps_to_reach(run["evals"], target) if name != teacher else None
        lines.append(
            f"| {name} | {run['attention']} ({run['heads']}) | {run['init']} | "
            f"{run['distill']} | {run['parameters']:,} | {run['images_per_s']:.0f} | "
            + " | ".join(f"{fid[s]:.2f}" if s in fid else "—" for s in steps)
            + f" | {run['evals'][-1]['loss']:.4f} | "
            + ("(teacher: " + f"{target:.2f} at {final['step']})" if name == teacher
               else (f"{reach}" if reach is not None else f"not within {run['steps']}"))
            + " |")
    sample = runs[teacher]
    lines += [
        "",
        f"FID-FMNIST: {sample['fid_samples']} samples ({sample['sampler']}, "
        f"{sample['sample_steps']} steps, guidance {sample['cfg_scale']}) against all the "
        "test images, features of the project's CNN (`subq train vision --backbone cnn`); "
        f"held-out loss: IDDPM's L_hybrid on the first {sample['eval_images']:,} test images "
        "at fixed timesteps and noise. images/s: median training throughput (one thread per "
        "run, runs sharing the machine).",
        "",
        f"![FID-FMNIST and held-out loss against steps]({images}diffusion_lit_curves.png)",
        "",
        "| " + " | ".join(name for name in [teacher, *students]) + " |",
        "|" + "---|" * (1 + len(students)),
        "| " + " | ".join(f"![{name}]({images}diffusion_{name}.png)"
                          for name in [teacher, *students]) + " |",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        evals = run["evals"]
        ax_fid.plot([e["step"] for e in evals], [e["fid_fmnist"] for e in evals], marker="o",
                    label=name)
        ax_loss.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="o",
                     label=name)
    ax_fid.set(xlabel="step", ylabel="FID-FMNIST (lower is better)", yscale="log",
               title="sample quality")
    ax_loss.set(xlabel="step", ylabel="held-out L_hybrid", title="held-out diffusion loss")
    for ax in (ax_fid, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--students", nargs="+", required=True)
    parser.add_argument("--docs", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--data", default=None, help="the Fashion-MNIST idx folder")
    args = parser.parse_args()
    names = [args.teacher, *args.students]
    runs = collect(args.out, names)
    docs = args.docs
    images = docs / "img" if docs else args.out
    for name in names:
        grid = images / f"diffusion_{name}.png"
        subprocess.run([sys.executable, "-m", "subq", "sample", "dit", "--checkpoint",
                        str(args.out / name), "--out", str(grid), "--per-class",
                        str(args.per_class), "--steps", "50",
                        *(["--data", args.data] if args.data else [])], check=True)
        runs[name]["grid"] = json.loads(grid.with_suffix(".json").read_text())
        grid.with_suffix(".json").unlink()
    plot(runs, images / "diffusion_lit_curves.png")
    record = {"machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "runs": runs}
    text = render(runs, args.teacher, args.students, "img/" if docs else "")
    print(text)
    if docs:
        (docs / "data").mkdir(parents=True, exist_ok=True)
        (docs / "data" / "diffusion_lit.json").write_text(json.dumps(record, indent=1) + "\n")
        write_section(docs / "diffusion.md", MARKERS, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
