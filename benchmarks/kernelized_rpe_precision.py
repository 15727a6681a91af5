"""Float32 precision of ``kernelized_rpe`` at length (issue #27, item 6), and the speed cost of
its fix.

Error: the relative RMS error of the float32 output against the float64 output for the same
inputs (``q, k, v ~ N(0, 1)``, B=1, D=64, a fixed projection, m = 32), with a random per-head
RPE bias ``b ~ N(0, 1)`` (what ``sample_options`` draws) and without a bias (the O(L) linear
path), causal and non-causal, on the 2-D grid path (non-causal), and for other bias families
at one length; "old" is the FFT path alone (``EXACT_ROW_RATIO = 0``), "new" the default (edge
rows with small Toeplitz row sums summed directly). Speed: forward time of old and new,
float32, B=1, H=8, D=64, timed interleaved (old, new, old, new, ...) after a warm-up, medians.

    python benchmarks/kernelized_rpe_precision.py                     # ~8 min, 1 thread
    python benchmarks/kernelized_rpe_precision.py --lengths 1024 4096 --speed-lengths 4096
    python benchmarks/kernelized_rpe_precision.py --out table.md      # also write markdown
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

import subq
from subq.ops import kernelized_rpe as krpe

DIM, FEATURES = 64, 32


def qkv(heads: int, length: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, length, DIM, generator=generator, dtype=torch.float64)
                 .to(dtype) for _ in range(3))


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def attend(q, k, v, *, exact_rows: bool, **options) -> torch.Tensor:
    saved = krpe.EXACT_ROW_RATIO
    krpe.EXACT_ROW_RATIO = saved if exact_rows else 0
    try:
        with torch.no_grad():
            return subq.attention(q, k, v, method="kernelized_rpe", **options)
    finally:
        krpe.EXACT_ROW_RATIO = saved


def family(name: str, heads: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A 1-D bias ``(heads, 2 L - 1)`` over offsets ``t = -(L - 1) .. L - 1``."""
    t = torch.arange(-(length - 1), length, dtype=torch.float64).expand(heads, -1)
    if name == "N(0, 1)":
        return torch.randn(heads, 2 * length - 1, generator=generator, dtype=torch.float64)
    if name == "N(0, 9)":
        return 3 * torch.randn(heads, 2 * length - 1, generator=generator, dtype=torch.float64)
    if name == "-8 abs(t) / L":
        return -8 * t.abs() / length
    if name == "-0.05 abs(t)":
        return -0.05 * t.abs()
    if name == "2 sin(t / 200)":
        return 2 * torch.sin(t / 200)
    if name == "10 t / L":
        return 10 * t / length
    raise ValueError(name)


FAMILIES = ("N(0, 1)", "N(0, 9)", "-8 abs(t) / L", "-0.05 abs(t)", "2 sin(t / 200)", "10 t / L")


def errors(length: int, heads: int, causal: bool, grid: bool,
           bias_family: str = "N(0, 1)") -> dict[str, float]:
    """Relative RMS error, float32 vs float64: with the bias (old, new) and without."""
    q, k, v = qkv(heads, length, torch.float64)
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(FEATURES, DIM, generator=generator, dtype=torch.float64)
    if bias_family != "N(0, 1)":
        bias = family(bias_family, heads, length, generator)
    elif grid:
        side = math.isqrt(length)
        bias = torch.randn(heads, 2 * side - 1, 2 * side - 1, generator=generator,
                           dtype=torch.float64)
    else:
        bias = torch.randn(heads, 2 * length - 1, generator=generator, dtype=torch.float64)
    f32 = [t.float() for t in (q, k, v)]
    row = {}
    ref = attend(q, k, v, exact_rows=True, causal=causal, projection=w, bias=bias)
    for name, exact in (("old", False), ("new", True)):
        out = attend(*f32, exact_rows=exact, causal=causal, projection=w.float(),
                     bias=bias.float())
        row[name] = rel_rms(ref, out)
    if not grid and bias_family == "N(0, 1)":
        ref = attend(q, k, v, exact_rows=True, causal=causal, projection=w)
        row["no bias"] = rel_rms(ref, attend(*f32, exact_rows=True, causal=causal,
                                             projection=w.float()))
    return row


def speed(length: int, causal: bool, repeats: int) -> tuple[float, float]:
    """Median forward seconds (old, new), float32, B=1, H=8, D=64, interleaved."""
    q, k, v = qkv(8, length)
    generator = torch.Generator().manual_seed(1)
    options = dict(causal=causal, bias=torch.randn(8, 2 * length - 1, generator=generator),
                   projection=torch.randn(FEATURES, DIM, generator=generator))
    times = {False: [], True: []}
    for exact in (False, True):  # warm-up
        attend(q, k, v, exact_rows=exact, **options)
    for _ in range(repeats):
        for exact in (False, True):
            start = time.perf_counter()
            attend(q, k, v, exact_rows=exact, **options)
            times[exact].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--grid-lengths", type=int, nargs="*", default=[4096, 16384],
                        help="square grids (perfect squares)")
    parser.add_argument("--heads", type=int, default=2, help="heads of the error runs")
    parser.add_argument("--family-length", type=int, default=4096,
                        help="length of the bias-family table (0: skip)")
    parser.add_argument("--speed-lengths", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the markdown tables here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} CPUs, "
             f"{platform.system()} {platform.machine()}, load average "
             f"{os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads, "
             f"EXACT_ROW_RATIO={krpe.EXACT_ROW_RATIO}, EXACT_PAIR_SHARE={krpe.EXACT_PAIR_SHARE}"]
    if args.lengths or args.grid_lengths:
        lines += ["", f"Relative RMS error, float32 vs float64 (B=1, H={args.heads}, D=64, m=32, "
                  "bias b ~ N(0, 1) per head):", "",
                  "| L | pattern | bias, old (FFT only) | bias, new | no bias |",
                  "|---:|---|---:|---:|---:|"]
    print(lines[0], flush=True)
    for length in args.lengths:
        for causal in (False, True):
            row = errors(length, args.heads, causal, grid=False)
            lines.append(f"| {length} | {'causal' if causal else 'non-causal'} | "
                         f"{row['old']:.1e} | {row['new']:.1e} | {row['no bias']:.1e} |")
            print(lines[-1], flush=True)
    for length in args.grid_lengths:
        side = math.isqrt(length)
        row = errors(side * side, args.heads, False, grid=True)
        lines.append(f"| {side}x{side} | 2-D grid | {row['old']:.1e} | {row['new']:.1e} | |")
        print(lines[-1], flush=True)
    if args.family_length:
        lines += ["", f"Other bias families at L={args.family_length} (H={args.heads}), offset "
                  "t = j - i, relative RMS error float32 vs float64:", "",
                  "| bias b_t | pattern | old (FFT only) | new |", "|---|---|---:|---:|"]
        for name in FAMILIES:
            for causal in (False, True):
                row = errors(args.family_length, args.heads, causal, False, name)
                lines.append(f"| `{name}` | {'causal' if causal else 'non-causal'} | "
                             f"{row['old']:.1e} | {row['new']:.1e} |")
                print(lines[-1], flush=True)
    if args.speed_lengths:
        lines += ["", f"Forward time, float32, B=1, H=8, D=64, bias, median of {args.repeats} "
                  "interleaved runs after a warm-up:", "",
                  "| L | pattern | old (s) | new (s) | new / old |", "|---:|---|---:|---:|---:|"]
        for length in args.speed_lengths:
            for causal in (False, True):
                old, new = speed(length, causal, args.repeats)
                lines.append(f"| {length} | {'causal' if causal else 'non-causal'} | "
                             f"{old:.3f} | {new:.3f} | {new / old:.3f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
