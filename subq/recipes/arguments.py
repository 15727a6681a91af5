"""The trainer's command-line flags, the same for every ``subq train`` recipe: each
:class:`~subq.recipes.trainer.TrainerConfig` field is a flag (``--checkpoint-every``), a
recipe gives its own defaults, and :func:`trainer_config` reads them back."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from .trainer import TrainerConfig

_HELP = {
    "out": "run folder: checkpoint.pt and metrics.jsonl",
    "steps": "optimiser steps",
    "batch": "rows per optimiser step, over all ranks and micro-batches",
    "accumulate": "micro-batches per step (gradient accumulation)",
    "min_lr_ratio": "cosine floor as a fraction of --lr (1 = constant after the warm-up)",
    "warmup": "linear warm-up steps",
    "decay_all": "weight decay on every parameter, not only on matrices",
    "grad_clip": "clip the gradient's global 2-norm (0 = off)",
    "ema": "decay of the weights' moving average that evaluations score (0 = off)",
    "bf16": "bfloat16 autocast",
    "eval_every": "evaluate every K steps (0 = at the end only)",
    "eval_first": "evaluate before the first step too (the starting point of a fine-tune)",
    "checkpoint_every": "checkpoint every K steps (0 = at the end only)",
    "time_limit": "stop (with a checkpoint) after this many seconds; --resume continues",
    "resume": "continue the run in --out from its checkpoint (a fresh start when none)",
    "progress": "progress bar (--no-progress to hide it)",
}


def add_trainer_arguments(parser: argparse.ArgumentParser, defaults: TrainerConfig) -> None:
    """One flag per trainer field, with ``defaults`` (a recipe's) as the defaults."""
    group = parser.add_argument_group("trainer")
    for field in fields(TrainerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = _HELP.get(field.name, "")
        if isinstance(default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=default, help=text)
        else:
            shown = default if default != "" else "chosen by the recipe"
            group.add_argument(flag, dest=field.name, type=type(default), default=default,
                               help=f"{text} (default {shown})".strip())


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    """The :class:`TrainerConfig` of parsed arguments."""
    return replace(TrainerConfig(), **{f.name: getattr(args, f.name)
                                       for f in fields(TrainerConfig)})
