"""Heat maps of Combiner's implied attention matrix A for each variant at L = 64.

    python benchmarks/combiner_heatmaps.py            # writes docs/img/combiner_<variant>.png

A comes from ``subq.weights`` (the explicit region construction), causal, span 8, one head of
random queries and keys; colour is log10 A, so the direct blocks, the rank-1 region blocks
and the full lower-triangular support are all visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import subq  # noqa: E402
from subq.ops.combiner import VARIANTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--span", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    q, k = (torch.randn(1, 1, args.length, 16, dtype=torch.float64, generator=generator)
            for _ in range(2))
    for variant in VARIANTS:
        a = subq.weights(q, k, method="combiner", causal=True, variant=variant,
                         span=args.span)[0, 0]
        assert torch.allclose(a.sum(-1), torch.ones((), dtype=a.dtype))
        shown = torch.where(a > 0, a.clamp(min=1e-300).log10(), float("nan"))
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        image = ax.imshow(shown.numpy(), cmap="viridis", vmin=-4, vmax=0,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="log10 A_ij")
        title = "logsparse" if variant == "logsparse" else f"{variant}, span {args.span}"
        ax.set_title(f"Combiner-{title} (causal, L={args.length})", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.tight_layout()
        path = args.out / f"combiner_{variant}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
