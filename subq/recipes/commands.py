"""``subq train``: the one parser every recipe adds its subcommand to."""

from __future__ import annotations

import argparse


def train_subparsers(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of ``subq train`` (created on first use), to add a recipe to."""
    if "train" not in commands.choices:
        parser = commands.add_parser("train", help="training recipes (one trainer)")
        parser.add_subparsers(dest="recipe", required=True)
    train = commands.choices["train"]
    return next(a for a in train._actions if isinstance(a, argparse._SubParsersAction))
