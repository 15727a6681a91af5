"""One picture of every registered mechanism's attention matrix A (``subq.weights``).

    python benchmarks/pattern_gallery.py      # writes docs/img/patterns.png

Each panel is one head at L = 64, causal self where the mechanism supports it (else
noncausal self), with the mechanism's ``test_options`` (budgets small enough to show the
pattern at this length) and random queries and keys; colour is log10 A_ij, white where
A_ij = 0, so the support of each mask is visible at a glance.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import subq  # noqa: E402
from subq.registry import Pattern, mechanisms  # noqa: E402


def attention_matrix(mech: subq.Mechanism, length: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, Pattern]:
    pattern = Pattern.CAUSAL_SELF if Pattern.CAUSAL_SELF in mech.patterns \
        else Pattern.NONCAUSAL_SELF
    q, k, v = (torch.randn(1, 1, length, 16, dtype=torch.float64, generator=generator)
               for _ in range(3))
    options = dict(mech.test_options)
    options.update(mech.sample_options(q, k, v, generator=generator))
    a = subq.weights(q, k, method=mech.name, causal=pattern.causal, cross=False, **options)
    return a[0, 0], pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/patterns.png"))
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    shown = [m for m in mechanisms() if m.weights is not None and (
        {Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF} & m.patterns)]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, mech in zip(axes.flat, shown, strict=False):
        a, pattern = attention_matrix(mech, args.length, generator)
        log_a = torch.where(a > 0, a.clamp(min=1e-300).log10(), float("nan"))
        ax.imshow(log_a.numpy(), cmap="viridis", vmin=-4, vmax=0, interpolation="nearest")
        ax.set_title(f"{mech.name} ({pattern.short})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on")
    fig.suptitle(f"Attention matrices at L={args.length} (log10 A, white = 0)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
