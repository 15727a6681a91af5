"""SCOUT attention speed and memory against dense causal attention (SDPA).

    python benchmarks/scout_speed.py --length 16384 --segment 16 --plot docs/img/scout_decode.png

Prefill: forward time of ``scout`` and of SDPA causal at one length (B=1, H=8, D=64, float32,
2 threads by default), runs interleaved, after checking ``scout`` against its reference on a
short prefix. Decode: the time of one step with a cache built for each context length (SCOUT
holds floor(t/S) checkpoints, dense holds t keys), the fitted slope of each curve and the cache
sizes. ``--skip-decode`` times the prefill only; ``--cpu-time --threads 1`` counts process CPU
time instead of wall time, which other jobs on a shared machine disturb far less.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import subq
from subq.bench.measure import rel_rms, run_times_ms
from subq.ops.dense import KVCache
from subq.ops.scout import CheckpointCache


def _cache_bytes(cache) -> int:
    return sum(x.numel() * x.element_size() for x in (cache.keys, cache.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--segment", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", default=None, help="write the decode curve to this PNG")
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    parser.add_argument("--skip-decode", action="store_true", help="prefill timing only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the prefill in process CPU seconds (with --threads 1: robust "
                             "on a machine shared with other jobs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, s = torch.device(args.device), args.segment
    gen = torch.Generator().manual_seed(0)

    def qkv(length: int) -> list[torch.Tensor]:
        return [torch.randn(1, 8, length, 64, generator=gen).to(device) for _ in range(3)]

    q, k, v = qkv(512)
    err = rel_rms(subq.reference(q, k, v, method="scout", causal=True, segment=s),
                  subq.attention(q, k, v, method="scout", causal=True, segment=s))
    if err > 1e-4:
        raise SystemExit(f"scout differs from its reference (rel RMS {err:.2e})")

    q, k, v = qkv(args.length)
    runs = {"scout": functools.partial(subq.attention, q, k, v, method="scout", causal=True,
                                       segment=s),
            "dense": functools.partial(subq.attention, q, k, v, method="dense", causal=True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(args.repeats):  # interleaved, so that machine load hits both alike
            for name, run in runs.items():
                if args.cpu_time:
                    start = time.process_time()
                    run()
                    times[name].append((time.process_time() - start) * 1e3)
                else:
                    times[name] += run_times_ms(run, 1, device)
    scout_ms, dense_ms = (statistics.median(times[name]) for name in runs)
    ratio = statistics.median(d / c for c, d in zip(times["scout"], times["dense"], strict=True))
    print(f"device={device} threads={torch.get_num_threads()} L={args.length} S={s} "
          f"B=1 H=8 D=64 float32 (check rel_rms={err:.1e})")
    print(f"prefill  scout {scout_ms:9.1f} ms   dense SDPA causal {dense_ms:9.1f} ms   "
          f"({'CPU' if args.cpu_time else 'wall'}, medians of {args.repeats})   "
          f"speed-up {ratio:.1f}x (median of paired ratios)")
    if args.skip_decode:
        return

    curve = []
    for t in args.contexts:
        _, kc, vc = qkv(t)
        q1, k1, v1 = (x[:, :, :1] for x in qkv(1))
        caches = {"scout": CheckpointCache(kc[:, :, s - 1::s], vc[:, :, s - 1::s], t),
                  "dense": KVCache(kc, vc)}
        opts = {"scout": {"segment": s}, "dense": {}}
        row = [t]
        for method in ("scout", "dense"):
            one = functools.partial(subq.step, q1, k1, v1, caches[method], method=method,
                                    **opts[method])
            one()
            row += [min(run_times_ms(one, args.repeats * 3, device)),
                    _cache_bytes(caches[method])]
        curve.append(row)
        print(f"decode t={t:6d}  scout {row[1]:7.3f} ms ({row[2] / 2**20:7.2f} MiB)   "
              f"dense {row[3]:7.3f} ms ({row[4] / 2**20:7.2f} MiB)   "
              f"cache ratio {row[4] / row[2]:.1f}x")
    ts = torch.tensor([r[0] for r in curve], dtype=torch.float64)
    slopes = {}
    for name, col in (("scout", 1), ("dense", 3)):
        ys = torch.tensor([r[col] for r in curve], dtype=torch.float64)
        slopes[name] = float(((ts - ts.mean()) * (ys - ys.mean())).sum()
                             / (ts - ts.mean()).pow(2).sum())
    print(f"decode slope  scout {slopes['scout'] * 1e3:.4f} ms/1K tokens   "
          f"dense {slopes['dense'] * 1e3:.4f} ms/1K tokens   "
          f"ratio {slopes['scout'] / slopes['dense']:.3f} (1/S = {1 / s:.3f})")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ts, [r[3] for r in curve], "o-", label="dense KV cache (SDPA)")
        ax.plot(ts, [r[1] for r in curve], "s-", label=f"SCOUT checkpoints (S={s})")
        ax.set_xlabel("context length t")
        ax.set_ylabel("decode step (ms)")
        ax.set_title(f"one decode step, B=1 H=8 D=64, {device.type}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
