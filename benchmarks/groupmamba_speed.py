"""GroupMamba layer throughput beside a 4-direction all-channel visual scan of the same width.

    python benchmarks/groupmamba_speed.py --size 56 --dim 96 --batch 1

Rows (all with d_state 1, ssm_ratio 1, a 3x3 depthwise conv, on a ``size x size`` grid):

* ``groupmamba layer``: :class:`subq.nn.groupmamba.GroupMambaLayer` (LN, channel affinity,
  four one-direction scans on ``dim/4`` channels each, LN, projection);
* ``4 grouped scans``: the layer's four one-direction SS2D modules alone;
* ``4-dir all-channel``: one SS2D scanning all four directions over all ``dim`` channels
  (VMamba's cross scan), the unit the paper's ablation replaces.

Prints the fastest of `--repeats` forward and forward+backward times (the machine is shared),
tokens/s and images/s, and parameters.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from subq.bench.measure import run_times_ms
from subq.nn.groupmamba import GroupMambaLayer
from subq.nn.visual_scan import DIRECTIONS, VisualSelectiveScan, scan_jointly


class _Grouped(nn.Module):
    """The layer's four scans on the four channel quarters (one joint scan call), nothing
    else."""

    def __init__(self, layer: GroupMambaLayer) -> None:
        super().__init__()
        self.groups = nn.ModuleList(layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(scan_jointly(self.groups, x.chunk(4, dim=-1)), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=56, help="grid side (56: stage 1 at 224)")
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    side, dim, batch = args.size, args.dim, args.batch
    layer = GroupMambaLayer(dim).to(device)
    grouped = _Grouped(layer)
    full = VisualSelectiveScan(dim, d_state=1, ssm_ratio=1.0, directions=DIRECTIONS).to(device)
    tokens = torch.randn(batch, side * side, dim, device=device)
    grid = tokens.view(batch, side, side, dim)
    rows = (("groupmamba layer", layer, lambda t: layer(t, side, side), tokens),
            ("4 grouped scans", grouped, grouped, grid),
            ("4-dir all-channel", full, full, grid))
    print(f"device={device} grid={side}x{side} (L={side * side}) dim={dim} batch={batch} "
          f"float32 threads={torch.get_num_threads()}")
    print(f"{'':20s} {'params':>8s} {'fwd ms':>9s} {'img/s':>8s} {'fwd+bwd ms':>11s} "
          f"{'img/s':>8s} {'tokens/s fwd':>13s}")
    for name, module, call, x in rows:
        with torch.no_grad():
            call(x)
            fwd = min(run_times_ms(lambda c=call, x=x: c(x), args.repeats, device))
        leaf = x.detach().requires_grad_(True)
        cot = torch.randn_like(leaf)

        def train(c=call, leaf=leaf, cot=cot) -> None:
            c(leaf).backward(cot)

        train()
        both = min(run_times_ms(train, args.repeats, device))
        params = sum(p.numel() for p in module.parameters())
        print(f"{name:20s} {params:8d} {fwd:9.1f} {batch / fwd * 1e3:8.1f} {both:11.1f} "
              f"{batch / both * 1e3:8.1f} {batch * side * side / fwd * 1e3:13.0f}")


if __name__ == "__main__":
    main()
