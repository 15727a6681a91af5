"""Selective scan speed: the fast forms vs the sequential reference loop.

    python benchmarks/scan_speed.py --length 16384 --reference-length 4096 --threads 1

Prints the median time and tokens/s of the fast forward and forward+backward (the fused C
kernel on the CPU where it builds, else the chunked form) at ``--length``, of the chunked
form's with the kernel switched off, and of the reference loop's forward and
forward+backward at ``--reference-length`` (the loop costs the same per token at any length,
so its time at ``--length`` is extrapolated linearly, and the script says so when the two
lengths differ). The forms are timed in ``--rounds``
alternating rounds and each speed-up is the median of the per-round ratios, with their range:
on a shared or virtual machine the speed drifts by tens of percent over minutes. It first
checks the fast forms against the reference on the reference-length inputs, values and
gradients (no speed-up is reported for a wrong answer).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from subq.bench.measure import rel_rms, run_times_ms
from subq.ops import scan_kernel
from subq.ops.scan import selective_scan, selective_scan_reference


def _inputs(length: int, channels: int, state: int, device: torch.device, batch: int = 1,
            time_major: bool = False) -> tuple[list, dict]:
    """Seeded inputs; ``u, delta, z`` are ``(B, D, L)``, stored channel-major (mamba-ssm's
    layout) or, with ``time_major``, as transposed views of ``(B, L, D)`` tensors (what the
    Mamba mixer's projections produce)."""
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, channels, length, generator=gen) for _ in range(3))
    if time_major:
        u, delta, z = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (u, delta, z))
    A = -torch.exp(torch.randn(channels, state, generator=gen))
    B, C = (torch.randn(batch, state, length, generator=gen) for _ in range(2))
    D, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
    args = [x.to(device) for x in (u, delta, A, B, C)]
    return args, dict(D=D.to(device), z=z.to(device), delta_bias=bias.to(device),
                      delta_softplus=True)


def _times(fn, args: list, kwargs: dict, repeats: int, device: torch.device
           ) -> tuple[float, float]:
    """Median ms of the forward (no grad) and of forward+backward of ``fn``."""
    with torch.no_grad():
        fn(*args, **kwargs)
        forward = statistics.median(run_times_ms(lambda: fn(*args, **kwargs), repeats, device))
    leaves = [x.detach().requires_grad_(True) for x in args]
    cot = torch.randn_like(args[0])

    def train() -> None:
        fn(*leaves, **kwargs).backward(cot)

    train()
    return forward, statistics.median(run_times_ms(train, repeats, device))


def _check(args: list, kwargs: dict) -> float:
    """Largest rel. RMS error of the fast form vs the reference: output and input gradients
    (the autograd path), and the inference output (the fused kernel where it is used)."""
    leaves = [x.detach().requires_grad_(True) for x in args]
    cot = torch.randn_like(args[0])
    results = []
    for fn in (selective_scan_reference, selective_scan):
        out = fn(*leaves, **kwargs)
        results.append([out, *torch.autograd.grad((out * cot).sum(), leaves)])
    with torch.no_grad():
        inference = selective_scan(*args, **kwargs)
    errors = [rel_rms(r, f) for r, f in zip(*results, strict=True)]
    return max(*errors, rel_rms(results[0][0], inference))


def _chunked_times(args: list, kwargs: dict, repeats: int, device: torch.device
                   ) -> tuple[float, float]:
    """:func:`_times` of the eager chunked form (the fused kernel switched off)."""
    with scan_kernel.disabled():
        return _times(selective_scan, args, kwargs, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--reference-length", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="fast-form runs per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of loop and fast form (each ratio from one round)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--layout", choices=["channel-major", "time-major"],
                        default="channel-major",
                        help="storage of u, delta, z (B, D, L): contiguous, or transposed views "
                             "of (B, L, D) tensors as the Mamba mixer passes them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ref_inputs = _inputs(args.reference_length, args.channels, args.state, device, args.batch,
                         args.layout == "time-major")
    err = _check(*ref_inputs)
    if err > 1e-4:
        raise SystemExit(f"fast form differs from the reference (rel RMS {err:.2e})")
    fast_inputs = _inputs(args.length, args.channels, args.state, device, args.batch,
                          args.layout == "time-major")
    kernel = device.type == "cpu" and scan_kernel.available()
    rounds = []  # loop and fast forms alternate, so that drifts of the machine hit all of them
    for _ in range(args.rounds):
        rounds.append((*_times(selective_scan_reference, *ref_inputs, 1, device),
                       *_times(selective_scan, *fast_inputs, args.repeats, device),
                       *(_chunked_times(*fast_inputs, args.repeats, device) if kernel
                         else (float("nan"), float("nan")))))
    ref_fwd, ref_train, fast_fwd, fast_train, chunked_fwd, chunked_train = (
        statistics.median(r[i] for r in rounds) for i in range(6))
    scale = args.length / args.reference_length
    fast_form = "fused C kernel" if kernel else "chunked" + (
        f"; no kernel: {scan_kernel.unavailable_reason()}" if device.type == "cpu" else "")
    print(f"device={device} L={args.length} d_inner={args.channels} N={args.state} float32 "
          f"B={args.batch} threads={torch.get_num_threads()} layout={args.layout} "
          f"max rel_rms (values, grads)={err:.1e} rounds={args.rounds} "
          f"fast form: {fast_form}")
    rows = [(f"reference forward (L={args.reference_length})", ref_fwd, args.reference_length),
            (f"reference fwd+bwd (L={args.reference_length})", ref_train, args.reference_length),
            ("fast forward", fast_fwd, args.length),
            ("fast forward+backward", fast_train, args.length)]
    if kernel:
        rows += [("chunked forward (kernel off)", chunked_fwd, args.length),
                 ("chunked fwd+bwd (kernel off)", chunked_train, args.length)]
    for name, ms, length in rows:
        print(f"{name:34s} {ms:10.1f} ms {args.batch * length / ms * 1e3:12.0f} tokens/s "
              "(median of rounds)")
    note = "" if scale == 1 else \
        f" (reference extrapolated linearly from L={args.reference_length})"

    def ratio(label: str, loop: int, fast: int) -> str:
        """Median and range over rounds of loop time / fast time (columns of a round)."""
        values = sorted(r[loop] * scale / r[fast] for r in rounds)
        return (f"{label} {statistics.median(values):.1f}x "
                f"[{values[0]:.1f}-{values[-1]:.1f}]")

    parts = [ratio("forward", 0, 2), ratio("forward+backward", 1, 3)]
    if kernel:
        parts += [ratio("chunked forward", 0, 4), ratio("chunked forward+backward", 1, 5)]
    print(f"speed-up at L={args.length}{note}, median of {args.rounds} rounds [range]: "
          + ", ".join(parts))

if __name__ == "__main__":
    main()
