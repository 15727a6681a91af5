"""NTK-Attention's prefix-approximation experiment (spec ntk.md section 4.5, item 2), the
intended version at CPU scale: fixed random W_Q, W_K, W_V and a fixed random prefix P of
length m; target = softmax attention of the L input queries over keys/values [P; X];
prediction = NTK-Attention over X only with trainable Z, k (Adam). Reports the held-out mean
squared error per element against m, beside the error of dropping the prefix (Z = k = 0)::

    python benchmarks/ntk_prefix_error.py --steps 300 --plot docs/img/ntk_prefix_error.png
"""

from __future__ import annotations

import argparse

import torch

import subq


def _target(x, prefix, w):
    q, k, v = x @ w[0], torch.cat([prefix, x], 1) @ w[1], torch.cat([prefix, x], 1) @ w[2]
    return subq.attention(q[:, None], k[:, None], v[:, None])[:, 0]


def _ntk(x, w, z, kz):
    q, k, v = x @ w[0], x @ w[1], x @ w[2]
    return subq.attention(q[:, None], k[:, None], v[:, None], method="ntk", z=z, kz=kz)[:, 0]


def run(m: int, dim: int, length: int, steps: int, batch: int, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, dim, dim, generator=gen) / dim ** 0.5
    prefix = torch.randn(1, m, dim, generator=gen)
    z = torch.nn.Parameter(torch.randn(1, 1, dim, dim, generator=gen) * 0.1)
    kz = torch.nn.Parameter(torch.randn(1, 1, dim, generator=gen) * 0.1)
    optimizer = torch.optim.Adam([z, kz], lr=1e-2)
    for _ in range(steps):
        x = torch.randn(batch, length, dim, generator=gen)
        target = _target(x, prefix.expand(batch, -1, -1), w)
        loss = (_ntk(x, w, z, kz) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.randn(256, length, dim, generator=gen)
        target = _target(x, prefix.expand(256, -1, -1), w)
        trained = (_ntk(x, w, z, kz) - target).pow(2).mean().item()
        dropped = (_ntk(x, w, None, None) - target).pow(2).mean().item()
    return trained, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2, 8, 32, 128, 512, 4096])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the error-vs-m plot here")
    args = parser.parse_args()
    rows = []
    print(f"{'m':>6} {'MSE trained Z,k':>16} {'MSE prefix dropped':>19}")
    for m in args.lengths:
        trained, dropped = run(m, args.dim, args.length, args.steps, args.batch, args.seed)
        rows.append((m, trained, dropped))
        print(f"{m:>6} {trained:>16.3e} {dropped:>19.3e}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog([r[0] for r in rows], [r[1] for r in rows], "o-", label="NTK (trained Z, k)")
        ax.loglog([r[0] for r in rows], [r[2] for r in rows], "s--", label="prefix dropped")
        ax.set_xlabel("prefix length m")
        ax.set_ylabel("held-out MSE per element")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
