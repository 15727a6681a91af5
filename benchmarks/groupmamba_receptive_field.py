"""Where a GroupMamba output token looks: input-gradient maps of one token, per scan group.

    python benchmarks/groupmamba_receptive_field.py --out docs/img/groupmamba_receptive_field.png

For a freshly initialised ``GroupMambaLayer`` on a ``size x size`` grid, plots
``log10 |d out[centre] / d x|`` (summed over channels) over the grid for each of the four
one-direction scans (``mamba_g1`` ... ``mamba_g4``: each sees only the tokens before the
centre in its own scan order, plus the 3x3 conv halo) and for the whole layer (the channel
affinity pools every token, so it sees the whole grid).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from subq.nn.groupmamba import GroupMambaLayer  # noqa: E402
from subq.nn.visual_scan import DIRECTIONS  # noqa: E402


def influence(call, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """``sum_c |d sum(out[row, col]) / d x[:, :, c]|`` as an ``(H, W)`` map."""
    x = x.detach().requires_grad_(True)
    call(x)[0, row, col].sum().backward()
    return x.grad[0].abs().sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=15)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", default="docs/img/groupmamba_receptive_field.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    side, dim = args.size, args.dim
    layer = GroupMambaLayer(dim).double()
    grid = torch.randn(1, side, side, dim, dtype=torch.float64)
    centre = side // 2
    maps = [influence(g, grid[..., k * dim // 4:(k + 1) * dim // 4], centre, centre)
            for k, g in enumerate(layer.groups)]
    maps.append(influence(lambda t: layer(t.flatten(1, 2), side, side).view(1, side, side, dim),
                          grid, centre, centre))
    titles = [f"mamba_g{k + 1}: {d}" for k, d in enumerate(DIRECTIONS)] + ["whole layer"]
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
    for ax, m, title in zip(axes, maps, titles, strict=True):
        image = ax.imshow(torch.log10(m + 1e-12).numpy(), cmap="magma", vmin=-8)
        ax.plot(centre, centre, "c+", markersize=10)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="log10 |d out[centre] / d x|")
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
