"""``subq eval generate``: prefill time and per-token decode latency of a pretrained LM with its
attention swapped, and the perplexity of the continuation it decodes.

For each prompt length C, method and batch size B, the prompts are B consecutive windows of
C tokens of the text; each is followed by its next ``--decode-tokens`` N tokens, which the
model decodes one at a time through transformers' KV cache with teacher forcing (the true
token is fed, not the sampled one, so every method is scored on the same continuation):

* ``prefill_s``: one forward pass over the ``B x C`` prompt tokens (cache filled, the last
  position's logits only);
* ``first_step_s``: the first decoding step, which also builds each patched layer's decoding
  state from the prefill (:func:`subq.prefill_state`; for dense a view of the cache);
* ``step_ms``: the median of the remaining ``N - 2`` steps, the per-token decode latency;
* ``ppl``: ``exp`` of the mean next-token NLL of the ``N`` continuation tokens (the first
  predicted by the prefill's last position), over the ``B`` rows.

Rows are appended to ``generate_<model>.jsonl`` as they finish, and a rerun skips the rows
already there, so a long sweep resumes where it was stopped. ``dense`` patches every layer;
the other methods patch ``--dense-layers`` and up (HiP keeps its first layers dense);
``local`` sees ``--keys`` keys per query (``window = keys - 1``), as in ``subq eval lm``.
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

from .lm_eval import _eval_subcommands, method_options

DEFAULT_CONTEXTS = (2048, 8192, 16384)


def prompts(ids: torch.Tensor, context: int, batch: int, decode: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C)`` prompts and their ``(B, N)`` continuations: ``B`` consecutive windows of
    ``C + N`` tokens of ``ids``."""
    span = context + decode
    if ids.numel() < batch * span:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {batch} prompts of "
                         f"{context} tokens with {decode} to decode")
    rows = ids[:batch * span].view(batch, span)
    return rows[:, :context], rows[:, context:]


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of each row: ``logits (B, 1, V)``, ``target (B,)`` -> ``(B,)``."""
    return torch.nn.functional.cross_entropy(logits[:, -1].float(), target, reduction="none")


def decode_row(model, prompt: torch.Tensor, continuation: torch.Tensor) -> dict[str, Any]:
    """Prefill ``prompt (B, C)``, then decode ``continuation (B, N)`` with teacher forcing;
    the timings and the continuation's perplexity (see the module docstring)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out, prefill_s = _timed(lambda: model(prompt, past_key_values=cache, use_cache=True,
                                          logits_to_keep=1))
    nll = [_nll(out.logits, continuation[:, 0])]
    steps = []
    for t in range(continuation.shape[1] - 1):
        out, seconds = _timed(lambda t=t: model(continuation[:, t:t + 1], past_key_values=cache,
                                                use_cache=True, logits_to_keep=1))
        nll.append(_nll(out.logits, continuation[:, t + 1]))
        steps.append(seconds)
    mean_nll = float(torch.stack(nll).mean())
    return {"prefill_s": prefill_s, "first_step_s": steps[0],
            "step_ms": statistics.median(steps[1:]) * 1e3, "steps": len(steps) - 1,
            "ppl": math.exp(mean_nll), "nll": mean_nll}


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL record (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _done(path: Path) -> set[tuple[str, int, int]]:
    return {(r["method"], r["context"], r["batch"]) for r in load_rows(path)}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (context, batch, method): prefill, first step, step latency, perplexity,
    and the ratios to dense at the same context and batch."""
    dense = {(r["context"], r["batch"]): r for r in rows if r["method"] == "dense"}
    lines = ["| prompt | batch | method | prefill (s) | first step (s) | per-token decode (ms) "
             "| decode vs dense | continuation ppl |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], r["method"] != "dense")):
        base = dense.get((r["context"], r["batch"]))
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}×" if base else "—"
        lines.append(f"| {r['context']:,} | {r['batch']} | `{r['method']}` | "
                     f"{r['prefill_s']:.1f} | {r['first_step_s']:.2f} | {r['step_ms']:.0f} | "
                     f"{ratio} | {r['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from subq.integrations.models import load
    from subq.integrations.transformers import attention_modules, patch, unpatch
    from subq.tasks.text import load_text

    torch.set_grad_enabled(False)
    model, tokenizer = load(args.model)
    if args.decode_tokens < 3:
        raise SystemExit(f"--decode-tokens must be at least 3, got {args.decode_tokens}")
    ids = torch.tensor(tokenizer(load_text(args.text))["input_ids"], dtype=torch.long)
    layers = list(attention_modules(model))
    model(ids[None, :256])  # one-time costs (allocator, thread pool) out of the first row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate_{args.model}.jsonl"
    done = _done(path)
    print(f"# {args.model}: {len(layers)} layers, max_position_embeddings "
          f"{model.config.max_position_embeddings}; text {args.text or 'pydoc_data.topics'}: "
          f"{ids.numel()} tokens; {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(done)} rows already in {path}", flush=True)
    for context in args.context:
        for batch in args.batch:
            prompt, continuation = prompts(ids, context, batch, args.decode_tokens)
            for method in args.method:
                if (method, context, batch) in done:
                    continue
                options = method_options(method, args.keys, args.option)
                unpatch(model)
                patch(model, method, layers=layers if method == "dense"
                      else layers[args.dense_layers:], **options)
                row = {"method": method, "context": context, "batch": batch,
                       "options": options, "dense_layers": 0 if method == "dense"
                       else args.dense_layers, "decode_tokens": args.decode_tokens,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "subq": subq.__version__,
                       **decode_row(model, prompt, continuation)}
                with path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"C={context:<6} B={batch} {method:<6} prefill {row['prefill_s']:.1f} s, "
                      f"first step {row['first_step_s']:.2f} s, step {row['step_ms']:.0f} ms, "
                      f"ppl {row['ppl']:.3f}", flush=True)
    table = markdown_table(load_rows(path))
    (out / f"generate_{args.model}.md").write_text(table)
    print(table)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    gen = _eval_subcommands(commands).add_parser(
        "generate", help="prefill time, decode latency and continuation perplexity of a "
        "pretrained LM with its attention swapped (needs [hf])",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--model", default="smollm2", choices=["smollm2"])
    gen.add_argument("--method", nargs="+", default=["dense", "hip", "local"])
    gen.add_argument("--text", default=None,
                     help="UTF-8 text file (default: Python's pydoc_data reference topics)")
    gen.add_argument("--context", type=int, nargs="+", default=list(DEFAULT_CONTEXTS),
                     help="prompt lengths in tokens")
    gen.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    gen.add_argument("--decode-tokens", type=int, default=32,
                     help="continuation tokens decoded per prompt (at least 3)")
    gen.add_argument("--dense-layers", type=int, default=3,
                     help="first layers kept dense for non-dense methods")
    gen.add_argument("--keys", type=int, default=784,
                     help="keys per query of the equal-budget local baseline (HiP's "
                     "topk + window + sink at the paper's defaults)")
    gen.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                     help="one method's option (bare NAME=VALUE: every method having it)")
    gen.add_argument("--out", default="results")
    gen.set_defaults(run=run)
