"""HAX sparse attention prefill speed against dense causal attention (SDPA).

    python benchmarks/hax_speed.py --lengths 2048 4096 8192 16384 --repeats 3

Forward time (median of ``--repeats``, no autograd) of ``hax`` with its defaults (k_lsh = k_ks
= 32, sign-bit LSH with 8 projections, key scores = key norms) and of SDPA causal, B=1, H=8,
D=64, float32, after checking ``hax`` against its dense reference on a short prefix. Prints
the time per 1K tokens (flat for linear growth) and the ratio to SDPA per length.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

import subq
from subq.bench.measure import rel_rms, run_times_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    def qkv(length: int) -> list[torch.Tensor]:
        return [torch.randn(1, args.heads, length, args.dim, generator=gen).to(device)
                for _ in range(3)]

    q, k, v = qkv(512)
    err = rel_rms(subq.reference(q, k, v, method="hax", causal=True),
                  subq.attention(q, k, v, method="hax", causal=True))
    if err > 1e-4:
        raise SystemExit(f"hax differs from its reference (rel RMS {err:.2e})")
    print(f"device={device} threads={torch.get_num_threads()} B=1 H={args.heads} "
          f"D={args.dim} float32, hax defaults (check rel_rms={err:.1e})")
    with torch.no_grad():
        for length in args.lengths:
            q, k, v = qkv(length)
            times = {}
            for method in ("hax", "dense"):
                run = functools.partial(subq.attention, q, k, v, method=method, causal=True)
                run()
                times[method] = statistics.median(run_times_ms(run, args.repeats, device))
            print(f"L={length:6d}  hax {times['hax']:9.1f} ms "
                  f"({times['hax'] / length * 1024:6.1f} ms/1K tokens)   "
                  f"dense SDPA {times['dense']:9.1f} ms   "
                  f"speed-up {times['dense'] / times['hax']:5.2f}x")


if __name__ == "__main__":
    main()
