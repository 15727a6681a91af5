"""HiP's two causal query selections (``queries="prefix"``, subq's default, and ``"block"``,
the paper's reading) compared by the recall of the keys they select: for each causal row, the
share of its true top-k keys (by logit, among keys before the row's window) that the selected
blocks contain. Random and smooth (random-walk) queries; random blocks as the floor.

    python benchmarks/hip_query_selection.py --length 2048 --top 128
"""

from __future__ import annotations

import argparse
import platform

import torch

from subq.ops.hip import _select


def smooth(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random walk along the sequence, normalised per position: neighbours are alike."""
    walk = torch.randn(shape, generator=generator).cumsum(-2)
    return walk / walk.norm(dim=-1, keepdim=True) * shape[-1] ** 0.5


def recall(q, k, options, queries, top, random_blocks=False, generator=None) -> float:
    """Mean over causal rows (with at least ``top`` far keys) of |true top-``top`` far keys
    that are selected| / ``top``; far keys are those before the prefix window ``s - w``."""
    length = q.shape[2]
    bq, bk, w = options["block_q"], options["block_k"], options["window"]
    sel = _select(q, k, True, None, options["topk"], bq, bk, options["query_stride"], w,
                  "center", queries)
    n_blocks = -(-length // bq)
    blocks = sel.blocks.view(q.shape[1], n_blocks, -1)
    valid = sel.valid.view(q.shape[1], n_blocks, -1)
    logits = q[0] @ k[0].transpose(-1, -2)
    hits, rows = 0.0, 0
    for i in range(0, length):
        s = i - i % bq
        far = s - w
        if far < top:
            continue
        true = logits[:, i, :far].topk(top, dim=-1).indices // bk  # (H, top) key blocks
        if random_blocks:
            n = blocks.shape[-1]
            chosen = torch.stack([torch.randperm(far // bk, generator=generator)[:n]
                                  for _ in range(q.shape[1])])
            ok = torch.ones_like(chosen, dtype=torch.bool)
        else:
            chosen, ok = blocks[:, i // bq], valid[:, i // bq]
        picked = ((true[..., None] == chosen[:, None, :]) & ok[:, None, :]).any(-1)
        hits += float(picked.float().mean())
        rows += 1
    return hits / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--top", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = dict(topk=512, block_q=32, block_k=2, query_stride=2, window=256)
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, args.heads, args.length, args.dim)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}; L = "
          f"{args.length}, H = {args.heads}, D = {args.dim}, paper defaults {options}, recall "
          f"of the true top-{args.top} far keys, seed {args.seed}")
    print("| queries | prefix (default) | block (paper) | random blocks |")
    print("|---|---|---|---|")
    for name in ("random", "smooth"):
        make = (lambda: torch.randn(shape, generator=g)) if name == "random" else (
            lambda: smooth(shape, g))
        q, k = make(), make()
        cells = [recall(q, k, options, "prefix", args.top), recall(q, k, options, "block",
                                                                   args.top),
                 recall(q, k, options, "prefix", args.top, random_blocks=True, generator=g)]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
