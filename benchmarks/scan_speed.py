"""Selective scan speed: the parallel fast form vs the sequential reference loop.

    python benchmarks/scan_speed.py --length 16384 --channels 256 --state 16

Prints tokens/s of the reference forward, the fast forward and the fast forward+backward,
after checking the fast form against the reference on the same inputs (no speed-up is
reported for a wrong answer).
"""

from __future__ import annotations

import argparse

import torch

from subq.bench.measure import median_ms, rel_rms
from subq.ops.scan import selective_scan, selective_scan_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    b, d, n, length = 1, args.channels, args.state, args.length
    u, delta, z = (torch.randn(b, d, length, generator=gen).to(device) for _ in range(3))
    A = -torch.exp(torch.randn(d, n, generator=gen)).to(device)
    B, C = (torch.randn(b, n, length, generator=gen).to(device) for _ in range(2))
    D, bias = torch.randn(d, generator=gen).to(device), torch.randn(d, generator=gen).to(device)
    kwargs = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)

    with torch.no_grad():
        ref = selective_scan_reference(u, delta, A, B, C, **kwargs)
        err = rel_rms(ref, selective_scan(u, delta, A, B, C, **kwargs))
        if err > 1e-4:
            raise SystemExit(f"fast form differs from the reference (rel RMS {err:.2e})")
        ref_ms = min(median_ms(lambda: selective_scan_reference(u, delta, A, B, C, **kwargs),
                               1, device))
        fast_ms = min(median_ms(lambda: selective_scan(u, delta, A, B, C, **kwargs),
                                args.repeats, device))
    leaves = [x.requires_grad_(True) for x in (u, delta, A, B, C)]
    cot = torch.randn_like(u)

    def fwd_bwd() -> None:
        selective_scan(*leaves, **kwargs).backward(cot)

    fwd_bwd()
    train_ms = min(median_ms(fwd_bwd, args.repeats, device))
    print(f"device={device} L={length} d_inner={d} N={n} float32 threads="
          f"{torch.get_num_threads()} rel_rms={err:.1e}")
    for name, ms in (("reference forward", ref_ms), ("fast forward", fast_ms),
                     ("fast forward+backward", train_ms)):
        print(f"{name:24s} {ms:10.1f} ms {length / ms * 1e3:12.0f} tokens/s")
    print(f"speed-up of the fast forward over the reference: {ref_ms / fast_ms:.1f}x")


if __name__ == "__main__":
    main()
