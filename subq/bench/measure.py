"""Measuring one configuration (method x pattern x length) in a fresh child process: inputs,
forward and forward+backward median times, their peak memory (each timed call is also a
memory probe) and the error against dense attention."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..registry import Pattern
from .memory import PeakProbe
from .methods import Attend, all_methods

_MIB = 2.0 ** 20
#: Timed runs per measurement: as many as fit ``TIME_TARGET_MS`` after the warm-up, within
#: ``REPEATS`` (a 10 ms call is timed 20 times, a call of 0.5 s or more 3 times), so the long
#: lengths that dominate a run's time cost three calls, not five.
TIME_TARGET_MS = 1500.0
REPEATS = (3, 20)


@dataclass(frozen=True)
class Config:
    """One configuration; ``threads`` is the fixed intra-op thread count."""

    method: str
    pattern: str
    length: int
    batch: int = 1
    heads: int = 8
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(config: Config, requires_grad: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal q, k, v ``(B, H, L, D)``: the same for every method at one (pattern, L)."""
    pattern_index = list(Pattern).index(Pattern(config.pattern))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + config.length * 4
                                              + pattern_index)
    shape = (config.batch, config.heads, config.length, config.dim)
    dtype = getattr(torch, config.dtype)
    return tuple(torch.randn(shape, generator=generator).to(config.device, dtype)
                 .requires_grad_(requires_grad) for _ in range(3))


def build(config: Config, q, k, v) -> Attend:
    method = all_methods()[config.method]
    return method.build(q, k, v, Pattern(config.pattern), config.seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(work: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall times in ms of ``repeats`` synchronised runs of ``work`` (warm it up first)."""
    return [ms for ms, _ in timed_peaks(work, repeats, device, peaks=False)]


def timed_peaks(work: Callable[[], object], repeats: int, device: torch.device,
                peaks: bool = True) -> list[tuple[float, int]]:
    """``(ms, peak bytes above the memory in use before it)`` of ``repeats`` synchronised runs
    of ``work`` (the peak 0 when ``peaks`` is False): each timed call is also a memory probe,
    so a configuration is run once for both."""
    out = []
    for _ in range(repeats):
        probe = PeakProbe(device) if peaks else None
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        elapsed = (time.perf_counter() - start) * 1e3
        out.append((elapsed, probe.peak() if probe else 0))
    return out


def forward_backward(call: Attend, q, k, v, cotangent: torch.Tensor) -> None:
    for x in (q, k, v):
        x.grad = None
    call(q, k, v).backward(cotangent)


def repeats_for(first_ms: float, target_ms: float, minimum: int, maximum: int) -> int:
    """At least ``minimum`` timed runs, more (up to ``maximum``) while they fit ``target_ms``."""
    if first_ms <= 0:
        return maximum
    return int(max(minimum, min(maximum, target_ms // first_ms)))


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300))


def measure_job(config: Config, dense_out: torch.Tensor | None = None,
                target_ms: float = TIME_TARGET_MS, min_repeats: int = REPEATS[0],
                max_repeats: int = REPEATS[1]) -> dict:
    """Time and memory of one configuration, run in a fresh child process
    (:func:`subq.bench.memory.run_in_child`): a warm-up forward (no grad), whose output gives
    the relative RMS error against ``dense_out`` when given, then :func:`repeats_for` timed
    forwards; the same for forward+backward. Every timed call is also a memory probe: the
    ``mem_*_mib`` are the largest peaks (MiB above the memory in use before the call: inputs,
    and nothing that a warmed-up call leaves behind)."""
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    q, k, v = make_inputs(config, requires_grad=True)
    call = build(config, q, k, v)
    cotangent = torch.randn_like(q)
    result: dict = {}

    def forward():
        with torch.no_grad():
            return call(q, k, v)

    def train():
        forward_backward(call, q, k, v, cotangent)

    _sync(device)
    started = time.perf_counter()
    out = forward()  # the warm-up call; its output gives the error
    _sync(device)
    first = (time.perf_counter() - started) * 1e3
    if dense_out is not None:
        result["rel_rms_vs_dense"] = rel_rms(dense_out.to(out.device), out)
    del out
    repeats = repeats_for(first, target_ms, min_repeats, max_repeats)
    fwd = timed_peaks(forward, repeats, device)
    result.update(fwd_ms=statistics.median(ms for ms, _ in fwd), fwd_times_ms=[ms for ms, _ in fwd],
                  repeats=repeats, mem_fwd_mib=max(b for _, b in fwd) / _MIB)
    try:
        fb_first = timed_peaks(train, 1, device, peaks=False)[0][0]
        fb_repeats = repeats_for(fb_first, target_ms, min_repeats, max_repeats)
        fb = timed_peaks(train, fb_repeats, device)
        result.update(fwd_bwd_ms=statistics.median(ms for ms, _ in fb),
                      fwd_bwd_times_ms=[ms for ms, _ in fb], fwd_bwd_repeats=fb_repeats,
                      mem_fwd_bwd_mib=max(b for _, b in fb) / _MIB)
    except Exception as exc:  # recorded: a forward-only method still has forward numbers
        result["fwd_bwd_error"] = f"{type(exc).__name__}: {exc}"
    return result
