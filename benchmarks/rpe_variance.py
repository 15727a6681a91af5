"""Figure 1b of Luo et al. 2021 on the CPU: why un-normalised positive random features (PRF)
are unstable. One query and 1024 keys, d = 64, drawn uniformly on the sphere of radius R; the
l1 distance between PRF attention weights ``phi(q) . phi(k_j) / sum_j'`` and the exact softmax
weights ``softmax_j(q . k_j)``, averaged over trials, for m = 4 ... 1024 features. Small and
falling in m for R = 1; large and flat for R >= 4 (the variance grows like exp(4 R^2),
Lemma 2), which is what normalising q and k (NPRF) avoids.

    python benchmarks/rpe_variance.py [--trials 10] [--out docs/img/kernelized_rpe_variance.png]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from subq.ops.feature_maps import random_features

DIM, KEYS = 64, 1024
RADII = (1, 2, 4, 8)
FEATURES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def l1_error(radius: float, m: int, trials: int, generator: torch.Generator) -> float:
    errors = []
    for _ in range(trials):
        q = radius * F.normalize(torch.randn(1, DIM, generator=generator, dtype=torch.float64),
                                 dim=-1)
        k = radius * F.normalize(torch.randn(KEYS, DIM, generator=generator,
                                             dtype=torch.float64), dim=-1)
        exact = torch.softmax(q @ k.T, dim=-1)
        w = torch.randn(m, DIM, generator=generator, dtype=torch.float64)
        scores = random_features(q, w, "prf") @ random_features(k, w, "prf").T
        errors.append(float((scores / scores.sum(-1, keepdim=True) - exact).abs().sum()))
    return sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", default="docs/img/kernelized_rpe_variance.png")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    table = {r: [l1_error(r, m, args.trials, generator) for m in FEATURES] for r in RADII}
    print("m      " + "".join(f"R={r:<8d}" for r in RADII))
    for i, m in enumerate(FEATURES):
        print(f"{m:<7d}" + "".join(f"{table[r][i]:<10.3f}" for r in RADII))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in RADII:
        ax.plot(FEATURES, table[r], marker="o", label=f"R = {r}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("random features m")
    ax.set_ylabel("l1 error of attention weights")
    ax.set_title("PRF vs softmax, d = 64, 1024 keys")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
