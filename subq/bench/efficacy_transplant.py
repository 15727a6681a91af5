"""A training-free entry of the efficacy grid: the weights of a trained LM run, another token
mixer. ``python -m subq.bench.efficacy_transplant --source RUN --mixer hip --out DIR``
evaluates the run's final model with its attention replaced (HiP's claim: a pretrained
softmax model keeps its quality with HiP's attention and no training) on the run's own
evaluation (held-out bits per byte at the training length, 2x and 4x), and writes
``DIR/metrics.jsonl`` (the evaluation entries, at the source's step) and
``DIR/transplant.json``.

The mixer must own exactly the parameters of the source's (the attention mechanisms that
share :class:`subq.nn.scout.RopeAttention`'s projections); otherwise loading fails and names
the parameters that differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..recipes.checkpoint import evaluated_weights
from ..recipes.lm import LMTask, LMTaskConfig, parse_option
from ..recipes.trainer import CHECKPOINT, METRICS, save_lines_atomic
from .efficacy import TRANSPLANT


def transplant(source: Path, mixer: str, options: dict, out: Path) -> list[dict]:
    """Evaluate ``source``'s final weights with ``mixer``; returns the evaluation entries."""
    saved = torch.load(Path(source) / CHECKPOINT, map_location="cpu", weights_only=False)
    settings = saved["config"]["task"]
    names = {f.name for f in dataclasses.fields(LMTaskConfig)}
    task_cfg = LMTaskConfig(**{k: v for k, v in settings.items() if k in names})
    task_cfg = dataclasses.replace(task_cfg, mixer=mixer, options=dict(options),
                                   extrapolate=tuple(task_cfg.extrapolate))
    task = LMTask(task_cfg, saved["config"]["trainer"]["seed"])
    model = task.build_model()
    model.load_state_dict(evaluated_weights(saved))
    model.eval()
    with torch.no_grad():
        evals = [{"step": saved["step"], **e} for e in task.evaluate(model)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_lines_atomic(out / METRICS, [json.dumps(e) for e in evals])
    record = {"source": str(source), "step": saved["step"], "mixer": mixer,
              "options": options, "parameters": model.num_parameters()}
    (out / TRANSPLANT).write_text(json.dumps(record, indent=1) + "\n")
    return evals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a finished LM run folder")
    parser.add_argument("--mixer", required=True)
    parser.add_argument("--option", type=parse_option, action="append", default=[],
                        metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for e in transplant(args.source, args.mixer, dict(args.option), args.out):
        print(f"{e['split']}@{e['length']} {e['bpb']:.4f} bpb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
