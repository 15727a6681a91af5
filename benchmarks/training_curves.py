"""The curves of LM training runs (``subq train lm``) as a picture and a summary: held-out bits
per byte against steps, the training loss, and a JSON of every point and each run's latest
evaluation, so the docs keep what a run showed after its folder is gone.

    python benchmarks/training_curves.py runs/lm/dense-small-L256-s0 runs/lm/local-... \\
        --png docs/img/training_lm.png --json docs/data/training_lm.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from subq.recipes.summary import summarise


def common_eval_step(runs: list[dict]) -> int:
    """The last step at which every run was evaluated."""
    steps = [{e["step"] for e in run["evals"]} for run in runs]
    return max(set.intersection(*steps), default=0)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_loss, ax_bpb, ax_len) = plt.subplots(1, 3, figsize=(15, 4))
    common = common_eval_step(runs)
    for run in runs:
        mixer = run["config"]["task"]["mixer"]
        steps, loss = zip(*run["loss"], strict=True) if run["loss"] else ((), ())
        ax_loss.plot(steps, [x / math.log(2) for x in loss], lw=0.8, label=mixer)
        valid = [e for e in run["evals"]
                 if e["split"] == "valid" and e["length"] == run["config"]["task"]["seq_len"]]
        ax_bpb.plot([e["step"] for e in valid], [e["bpb"] for e in valid], marker="o",
                    label=mixer)
        at = sorted((e["length"], e["bpb"]) for e in run["evals"]
                    if e["split"] == "valid" and e["step"] == common)
        ax_len.plot(*zip(*at, strict=True), marker="o", label=mixer)
    ax_loss.set(xlabel="step", ylabel="training loss (bits per byte)", title="training")
    ax_bpb.set(xlabel="step", ylabel="held-out bits per byte", title="held-out, training length")
    ax_len.set(xlabel="evaluation length (bytes)", ylabel="held-out bits per byte",
               title=f"length extrapolation at step {common}", xscale="log")
    ax_len.set_xticks(sorted({e["length"] for r in runs for e in r["evals"]}))
    ax_len.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_len.minorticks_off()
    for ax in (ax_loss, ax_bpb, ax_len):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    runs = [summarise(run) for run in args.runs]
    plot(runs, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(runs, indent=1) + "\n")
    for run in runs:
        latest = ", ".join(f"{e['split']}@{e['length']} {e['bpb']:.3f}" for e in run["latest"])
        print(f"{run['run']}: step {run['step']}, {run['parameters']:,} parameters, "
              f"{run['median_tokens_per_s']} tokens/s, {run['train_seconds']} s; {latest}")


if __name__ == "__main__":
    main()
