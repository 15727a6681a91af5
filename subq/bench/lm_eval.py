"""``subq eval lm``: perplexity and prefill time of a pretrained LM with its attention swapped.

For each context length C the text's first ``--tokens`` tokens are cut into windows of C
tokens; each window is scored on its own (no cache, no overlap) and the perplexity is
``exp(total next-token NLL / predicted tokens)``. Prefill time is the median wall time of one
window's forward pass. Every method runs on the same windows: ``dense`` patches every layer
with subq's dense attention (equal to the stock model); the other methods patch layers
``--dense-layers`` and up, as HiP keeps its first layers dense. ``--keys`` sets the number
of keys a query of ``local`` sees (``window = keys - 1``), the equal-budget baseline;
``--option METHOD.NAME=VALUE`` sets one method's option (typed by its registry record); a
bare ``NAME=VALUE`` goes to every method that has the option.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import subq
from subq.registry import get

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096)


def parse_options(method: str, pairs: list[str]) -> dict[str, Any]:
    """``["METHOD.NAME=VALUE", ...]`` -> typed options of ``method``; pairs for other methods
    are skipped, as is a bare ``NAME=VALUE`` that ``method`` lacks."""
    known = {o.name: o for o in get(method).options}
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--option wants METHOD.NAME=VALUE, got {pair!r}")
        owner, dot, bare = name.rpartition(".")
        if dot:
            if owner != method:
                continue
            name = bare
            if name not in known:
                raise ValueError(f"{method!r} has no option {name!r}; it has {sorted(known)}")
        elif name not in known:
            continue
        kind = known[name].type
        if kind is bool:
            value: Any = text.lower() in ("1", "true", "yes")
        elif kind in (int, float, str):
            value = kind(text)
        else:
            raise ValueError(f"option {name!r} of {method!r} cannot be set from the command line")
        options[name] = value
    return options


def method_options(method: str, keys: int, pairs: list[str]) -> dict[str, Any]:
    """The options a method runs with: ``local`` gets ``window = keys - 1`` unless given."""
    options = {"window": keys - 1} if method == "local" else {}
    options.update(parse_options(method, pairs))
    get(method).resolve_options(options)
    return options


def windows(ids: torch.Tensor, context: int, tokens: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``context`` tokens covering the first ``tokens`` ids."""
    usable = min(ids.numel(), max(tokens, context))
    count = usable // context
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {context}")
    return [ids[i * context:(i + 1) * context] for i in range(count)]


def window_nll(model, window: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """(sum of next-token NLL over the window, forward seconds); logits in row chunks."""
    start = time.perf_counter()
    hidden = model.get_decoder()(input_ids=window[None], use_cache=False).last_hidden_state[0]
    seconds = time.perf_counter() - start
    head, nll = model.get_output_embeddings(), 0.0
    for lo in range(0, window.numel() - 1, chunk):
        hi = min(lo + chunk, window.numel() - 1)
        logits = head(hidden[lo:hi]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[lo + 1:hi + 1],
                                                       reduction="sum"))
    return nll, seconds


def evaluate(model, ids: torch.Tensor, method: str, options: dict[str, Any], dense_layers: int,
             contexts: list[int], tokens: int) -> list[dict[str, Any]]:
    """One row per context: perplexity, predicted tokens, median prefill seconds."""
    from subq.integrations.transformers import attention_modules, patch, unpatch

    unpatch(model)
    layers = list(attention_modules(model))
    patch(model, method, layers=layers if method == "dense" else layers[dense_layers:],
          **options)
    rows = []
    with torch.inference_mode():
        for context in contexts:
            total, count, times = 0.0, 0, []
            for window in windows(ids, context, tokens):
                nll, seconds = window_nll(model, window)
                total, count = total + nll, count + window.numel() - 1
                times.append(seconds)
            rows.append({"method": method, "context": context, "ppl": math.exp(total / count),
                         "tokens": count, "prefill_s": statistics.median(times)})
            print(f"{method:<8} C={context:<6} ppl={rows[-1]['ppl']:.3f} "
                  f"prefill={rows[-1]['prefill_s']:.2f}s", flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Perplexity (prefill seconds) by method and context."""
    contexts = sorted({r["context"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["context"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"C={c}" for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    for m in methods:
        cells = [f"{cell[m, c]['ppl']:.3f} ({cell[m, c]['prefill_s']:.2f} s)"
                 if (m, c) in cell else "—" for c in contexts]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity and prefill time against context, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context"])
        xs = [r["context"] for r in mine]
        left.plot(xs, [r["ppl"] for r in mine], marker="o", label=method)
        right.plot(xs, [r["prefill_s"] for r in mine], marker="o", label=method)
    for ax, label in ((left, "perplexity"), (right, "prefill time per window (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from subq.integrations.models import load
    from subq.integrations.transformers import attention_modules
    from subq.tasks.text import load_text

    torch.set_grad_enabled(False)
    model, tokenizer = load(args.model)
    text = load_text(args.text)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    print(f"# {args.model}: {len(attention_modules(model))} layers; text "
          f"{args.text or 'pydoc_data.topics (Python reference)'}: {ids.numel()} tokens; "
          f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    rows, settings = [], {}
    for method in args.method:
        options = method_options(method, args.keys, args.option)
        settings[method] = options
        rows += evaluate(model, ids, method, options, args.dense_layers, args.context,
                         args.tokens)
    table = markdown_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lm_eval_{args.model}"
    record = {"model": args.model, "text": args.text or "pydoc_data.topics",
              "tokens_per_context": args.tokens, "dense_layers": args.dense_layers,
              "keys": args.keys, "options": settings, "subq": subq.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"),
         f"{args.model}: training-free attention swap ({args.tokens} tokens per context)")
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _eval_subcommands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``subq eval``, creating ``eval`` if no other module has."""
    parser = commands.choices.get("eval")
    if parser is None:
        parser = commands.add_parser("eval", help="evaluate mechanisms on tasks and models")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="eval_command", required=True)


def add_command(commands: argparse._SubParsersAction) -> None:
    lm = _eval_subcommands(commands).add_parser(
        "lm", help="perplexity of a pretrained LM with its attention swapped (needs [hf])",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lm.add_argument("--model", default="smollm2", choices=["smollm2"])
    lm.add_argument("--method", nargs="+", default=["dense", "local"],
                    help="subq mechanisms (e.g. dense hip local)")
    lm.add_argument("--text", default=None,
                    help="UTF-8 text file (default: Python's pydoc_data reference topics)")
    lm.add_argument("--context", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    lm.add_argument("--tokens", type=int, default=8192,
                    help="tokens scored per context (whole windows)")
    lm.add_argument("--dense-layers", type=int, default=3,
                    help="first layers kept dense for non-dense methods")
    lm.add_argument("--keys", type=int, default=512,
                    help="keys per query of the equal-budget local baseline")
    lm.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="one method's option (bare NAME=VALUE: every method having it)")
    lm.add_argument("--out", default="results")
    lm.set_defaults(run=run)
