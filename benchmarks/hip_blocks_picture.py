"""A picture of HiP's selection for one head on a structured input (keys that drift slowly,
plus a planted needle every query looks for), and HiP's relative error against dense
attention on it.

    python benchmarks/hip_blocks_picture.py --out docs/img/hip_blocks.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import subq  # noqa: E402
from subq.ops.hip import hip_mask  # noqa: E402


def structured_qkv(length: int, dim: int, needle: int, generator: torch.Generator):
    """Locality (a slow random walk of keys, queries near the recent keys) plus a needle:
    keys around position ``needle`` that every query matches, with a smooth profile (the
    attention locality HiP's search relies on; an isolated single-key needle is missed)."""
    walk = torch.cumsum(torch.randn(length, dim, generator=generator), 0) / length ** 0.5
    k = walk + 0.3 * torch.randn(length, dim, generator=generator)
    q = walk + 0.3 * torch.randn(length, dim, generator=generator)
    direction = torch.randn(dim, generator=generator)
    bump = torch.exp(-0.5 * ((torch.arange(length) - needle) / 8.0) ** 2)
    k += 3 * bump[:, None] * direction
    q += direction
    v = torch.randn(length, dim, generator=generator)
    return (x[None, None].contiguous() for x in (q, k, v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", default="docs/img/hip_blocks.png")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    q, k, v = structured_qkv(args.length, 32, args.length // 5, generator)
    options = dict(topk=32, block_q=16, block_k=4, sink=4, window=32)
    allowed = hip_mask(q, k, causal=True, **options)[0, 0]
    dense = subq.attention(q, k, v, method="dense", causal=True)
    out = subq.attention(q, k, v, method="hip", causal=True, **options)
    error = float((out - dense).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(allowed.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_title(f"HiP keys per query (L={args.length}, {options})\n"
                 f"rel. RMS error vs dense: {error:.3f}", fontsize=7)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}; relative RMS error vs dense {error:.4f}, "
          f"density {allowed.float().mean():.3f} of all pairs "
          f"(causal dense: {(args.length + 1) / (2 * args.length):.3f})")


if __name__ == "__main__":
    main()
