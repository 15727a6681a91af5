"""The ``subq`` command (also ``python -m subq``)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .registry import Pattern, mechanisms

_TABLE_COLUMNS = ["mechanism", "paper", *[p.short for p in Pattern], "exact", "decode",
                  "options (defaults)", "what it is"]


def capability_rows() -> list[list[str]]:
    """One row per registered mechanism: patterns, exactness, decoding, options."""
    rows = []
    for m in mechanisms():
        rows.append([
            m.name, m.paper,
            *["✓" if p in m.patterns else "—" for p in Pattern],
            "✓" if m.exact else "—",
            "✓" if m.decodes else "—",
            ", ".join(o.describe() for o in m.options) or "—",
            m.summary,
        ])
    return rows


def capability_markdown() -> str:
    """The README's capability table (NS/CS/NC/CC: CAB's four patterns)."""
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in _TABLE_COLUMNS) + "|"]
    for row in capability_rows():
        cells = [f"`{row[0]}`", *row[1:]]
        cells[-2] = cells[-2] if cells[-2] == "—" else f"`{cells[-2]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def capability_text() -> str:
    rows = [_TABLE_COLUMNS, *capability_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows) + "\n"


def _list(args: argparse.Namespace) -> int:
    sys.stdout.write(capability_markdown() if args.markdown else capability_text())
    return 0


#: Modules that add a subcommand through ``add_command(subparsers)``; each sets ``run``
#: (a function of the parsed arguments returning the exit status) as a parser default.
COMMAND_MODULES: tuple[str, ...] = (
    "subq.bench.command",
    "subq.bench.lm_eval",
    "subq.bench.lm_generate",
    "subq.recipes.recall",
    "subq.recipes.lm",
    "subq.recipes.vision",
    "subq.recipes.dit",
    "subq.recipes.scale_dit",
    "subq.recipes.sample_dit",
    "subq.recipes.peft",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print the mechanisms and what they support")
    listing.add_argument("--markdown", action="store_true", help="the README's table")
    listing.set_defaults(run=_list)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
