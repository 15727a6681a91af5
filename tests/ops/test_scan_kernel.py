"""The fused CPU kernel of the scan (``subq/ops/csrc/selective_scan.c``), forward and backward:
== the float64 reference loop (values, final states, every gradient) for every layout of
u/delta/z (channel-major, time-major, strided views), of B/C (time-invariant, shared, grouped
with groups inside and across SIMD lanes, per channel), every optional part, partial channel
blocks and token blocks; threads change nothing but rounding of sums; NaN and overflow
propagate as in the loop; the backward saves one state per 64 steps; the dispatch, the
on-disk cache and the fallback when no compiler works."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest
import torch

from subq.ops import scan_kernel
from subq.ops.scan import selective_scan, selective_scan_reference

from ..helpers import rel_rms

if not scan_kernel.available():
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        raise AssertionError(f"a C compiler is present but the scan kernel is unavailable: "
                             f"{scan_kernel.unavailable_reason()}")
    pytest.skip(f"scan kernel unavailable: {scan_kernel.unavailable_reason()}",
                allow_module_level=True)

TOL = 1e-5  # float32 kernel vs float64 loop; the kernel's exp2 and softplus are ~1 ulp


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel should write in full starts as NaN: an element it skipped
    would show up in the comparisons (and the NaN test checks exactly where NaN may be)."""
    unwritten = scan_kernel._unwritten
    monkeypatch.setattr(scan_kernel, "_unwritten",
                        lambda *a, **k: unwritten(*a, **k).fill_(float("nan")))


def _bc(layout: str, batch: int, channels: int, n: int, length: int):
    shape = {"time-invariant": (channels, n), "shared": (batch, n, length),
             "grouped": (batch, 2, n, length), "groups-of-4": (batch, channels // 4, n, length),
             "per-channel": (batch, channels, n, length)}[layout]
    return torch.randn(shape), torch.randn(shape)


def _inputs(batch: int, channels: int, n: int, length: int, layout: str = "shared"):
    u, delta, z = (torch.randn(batch, channels, length) for _ in range(3))
    A = -torch.exp(torch.randn(channels, n))
    B, C = _bc(layout, batch, channels, n, length)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(channels), z=z,
                delta_bias=torch.randn(channels), delta_softplus=True,
                initial_state=torch.randn(batch, channels, n))


def _reference(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop in float64 on the same (float32) values."""
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return selective_scan_reference(**wide, return_last_state=True)


def _kernel(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return selective_scan(**args, return_last_state=True)


def _with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values stored channel-major, as a time-major view, or as a strided view."""
    if layout == "time-major":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other step of a wider buffer
        wide = torch.empty(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("layout", ["time-invariant", "shared", "grouped", "groups-of-4",
                                    "per-channel"])
@pytest.mark.parametrize("channels", [8, 20])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
def test_kernel_equals_reference(layout, channels, length):
    """Channel counts that fill whole SIMD blocks and leave a partial one (20 = 8 + 8 + 4);
    groups of 4 channels split each block of 8 lanes; token counts around the 64-step block."""
    args = _inputs(batch=3, channels=channels, n=16, length=length, layout=layout)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


@pytest.mark.parametrize("storage", ["channel-major", "time-major", "strided"])
@pytest.mark.parametrize("options", ["none", "all", "softplus-only", "bias-only", "gate-only"])
def test_kernel_layouts_and_options(storage, options):
    """u, delta and z stored any way (the output is stored like u); each optional part alone."""
    full = _inputs(batch=2, channels=12, n=5, length=150, layout="grouped")
    args = {k: full[k] for k in ("u", "delta", "A", "B", "C")}
    args["delta"] = args["delta"].abs()  # positive steps without softplus: finite states
    args |= {"none": {}, "all": {k: full[k] for k in ("D", "z", "delta_bias", "delta_softplus",
                                                       "initial_state")},
             "softplus-only": dict(delta_softplus=True),
             "bias-only": dict(delta_bias=full["delta_bias"].abs()),
             "gate-only": dict(z=full["z"])}[options]
    for name in ("u", "delta", "z"):
        if name in args:
            args[name] = _with_layout(args[name], storage)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    if storage != "strided":
        assert out.stride() == args["u"].stride()
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_softplus_and_gate_over_their_range():
    """delta and z from -40 to 40 (softplus's linear and exponential tails, silu's limits)."""
    args = _inputs(batch=1, channels=16, n=4, length=400)
    span = torch.linspace(-40.0, 40.0, 400)
    args["delta"] = span.roll(7).expand(1, 16, -1).contiguous()
    args["z"] = span.expand(1, 16, -1).contiguous()
    args["delta_bias"] = torch.zeros(16)
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_decays_accurate_to_a_few_ulp():
    """One step from a state of 1 with no drive and C = 1: y = exp(delta A) per channel, over
    exponents that cover every fraction the kernel's exp2 polynomial sees; within 3 ulp of the
    exact value (the float32 product delta A is itself rounded), which an error of 1e-5 in one
    polynomial coefficient already exceeds."""
    channels = 4096
    args = dict(u=torch.zeros(1, channels, 1), delta=torch.rand(1, channels, 1),
                A=-torch.rand(channels, 1), B=torch.ones(1, 1, 1), C=torch.ones(1, 1, 1),
                initial_state=torch.ones(1, channels, 1))
    ref, _ = _reference(args)
    out, _ = _kernel(args)
    assert ((out - ref) / ref).abs().max() <= 3 * 2.0 ** -23


def test_strong_decay_underflows_to_zero_like_the_loop():
    """Decays of hundreds of nats per step: exp underflows to 0, the state is just the drive."""
    args = _inputs(batch=2, channels=8, n=16, length=100)
    args["delta"] = args["delta"].abs() * 100.0
    args["delta_softplus"] = False
    ref, ref_last = _reference(args)
    out, last = _kernel(args)
    assert torch.isfinite(out).all()
    assert rel_rms(ref, out) <= TOL and rel_rms(ref_last, last) <= TOL


def test_nan_and_overflow_propagate_like_the_loop():
    """A NaN in delta poisons its channel from that step on, and only that channel; a growing
    state (positive A) overflows to inf in the same places as the float32 loop."""
    args = _inputs(batch=1, channels=16, n=4, length=50)
    args["delta"][0, 3, 20] = float("nan")
    out, _ = _kernel(args)
    ref, _ = selective_scan_reference(**args, return_last_state=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 3, 20:].isnan().all() and not out[0, 3, :20].isnan().any()
    grow = _inputs(batch=1, channels=8, n=4, length=60)
    grow |= dict(A=torch.full((8, 4), 3.0), delta=torch.full((1, 8, 60), 2.0),
                 delta_softplus=False, delta_bias=None, z=None, D=None)
    out, _ = _kernel(grow)
    ref, _ = selective_scan_reference(**grow, return_last_state=True)
    assert out.isinf().any() and torch.equal(out.isfinite(), ref.isfinite())


def test_threads_split_the_channel_blocks_without_changing_a_bit():
    args = _inputs(batch=3, channels=64, n=16, length=300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(args)
        torch.set_num_threads(2)
        two = _kernel(args)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


_UNWRITTEN = scan_kernel._unwritten  # before the poisoning fixture replaces it


def _scan_in_forked_child(args: dict, expected: torch.Tensor, results) -> None:
    # Only small torch ops here (no NaN fill, the comparison in numpy): GNU OpenMP cannot run
    # a parallel region in a child forked from a process that used one, whatever subq does.
    scan_kernel._unwritten = _UNWRITTEN
    torch.set_num_threads(2)
    results.put(bool((_kernel(args)[0].numpy() == expected.numpy()).all()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_pool_works_in_a_forked_child():
    """A child forked after the parent used the thread pool (a DataLoader worker, say) gets a
    fresh pool; a copied one would take the work and never run it."""
    args = _inputs(batch=2, channels=64, n=16, length=300)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = _kernel(args)[0]  # the parent's pool now exists
    finally:
        torch.set_num_threads(previous)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_scan_in_forked_child, args=(args, expected, results))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        raise AssertionError("the scan hung in a forked child")
    assert child.exitcode == 0 and results.get(timeout=5)


def test_dispatch_only_for_float32_cpu(monkeypatch):
    calls = []
    forward, fused = scan_kernel.selective_scan_forward, scan_kernel.FusedSelectiveScan.apply
    monkeypatch.setattr(scan_kernel, "selective_scan_forward",  # + checkpoints: for autograd
                        lambda *a: calls.append("kernel" + "+saves" * (len(a) > 10))
                        or forward(*a))
    monkeypatch.setattr(scan_kernel.FusedSelectiveScan, "apply",
                        lambda *a: calls.append("autograd") or fused(*a))
    args = _inputs(batch=1, channels=8, n=4, length=10)
    _kernel(args)
    selective_scan(**(args | dict(u=args["u"].clone().requires_grad_(True))))
    expected = ["kernel", "autograd", "kernel+saves"]
    assert calls == expected
    _kernel({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    with scan_kernel.disabled():
        assert not scan_kernel.available()
        fallback = _kernel(args)
        selective_scan(**(args | dict(u=args["u"].clone().requires_grad_(True))))
    assert calls == expected  # float64 and disabled() take the chunked form
    assert rel_rms(_reference(args)[0], fallback[0]) <= 1e-4


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _gradients(args: dict, cot_out: torch.Tensor, cot_last: torch.Tensor, fn, dtype):
    """Outputs and the gradients of every tensor argument, computed in ``dtype``."""
    leaves = {k: v.to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor) else v
              for k, v in args.items()}
    out, last = fn(**leaves, return_last_state=True)
    loss = (out * cot_out.to(dtype)).sum() + (last * cot_last.to(dtype)).sum()
    names = [k for k in GRAD_NAMES if isinstance(leaves.get(k), torch.Tensor)]
    return [out, last, *torch.autograd.grad(loss, [leaves[k] for k in names])], names


def _assert_matches_loop(args: dict) -> None:
    """Output, last state and every input's gradient (random cotangents for both outputs) ==
    autograd through the float64 loop; and the inference output likewise."""
    batch, channels, _ = args["u"].shape
    cot_out = torch.randn(args["u"].shape)
    cot_last = torch.randn(batch, channels, args["A"].shape[1])
    ref, names = _gradients(args, cot_out, cot_last, selective_scan_reference, torch.float64)
    fast, _ = _gradients(args, cot_out, cot_last, selective_scan, torch.float32)
    for name, r, f in zip(["out", "last", *names], ref, fast, strict=True):
        assert f.dtype == torch.float32 and f.shape == r.shape, name
        assert rel_rms(r, f) <= TOL, name
    assert rel_rms(ref[0], _kernel(args)[0]) <= TOL


@pytest.mark.parametrize("layout", ["time-invariant", "shared", "grouped", "groups-of-4",
                                    "per-channel"])
@pytest.mark.parametrize("channels, length", [(8, 1), (20, 64), (20, 65), (8, 200)])
@pytest.mark.parametrize("options", ["all", "none"])
def test_fused_backward_equals_reference(layout, channels, length, options):
    """The fused backward (checkpoint per 64 steps, adjoint recurrence in C) == autograd
    through the float64 loop: every input's gradient, with the last state as an output too."""
    args = _inputs(batch=2, channels=channels, n=16, length=length, layout=layout)
    if options == "none":
        args = {k: args[k] for k in ("u", "delta", "A", "B", "C")}
        args["delta"] = args["delta"].abs()
    _assert_matches_loop(args)


@pytest.mark.parametrize("storage", ["channel-major", "time-major", "strided"])
def test_fused_backward_any_storage_and_partial_gradients(storage):
    """u, delta, z stored any way; only some inputs require a gradient; out alone or the last
    state alone in the loss."""
    args = _inputs(batch=2, channels=12, n=5, length=150, layout="grouped")
    for name in ("u", "delta", "z"):
        args[name] = _with_layout(args[name], storage)
    delta = args["delta"].clone().requires_grad_(True)
    A = args["A"].clone().requires_grad_(True)
    out, last = selective_scan(**(args | dict(delta=delta, A=A)), return_last_state=True)
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    d64, a64 = wide["delta"].requires_grad_(True), wide["A"].requires_grad_(True)
    ref, ref_last = selective_scan_reference(**(wide | dict(delta=d64, A=a64)),
                                             return_last_state=True)
    for loss, ref_loss in ((out.sum(), ref.sum()), (last.square().sum(),
                                                   ref_last.square().sum())):
        grads = torch.autograd.grad(loss, [delta, A], retain_graph=True)
        ref_grads = torch.autograd.grad(ref_loss, [d64, a64], retain_graph=True)
        for g, r in zip(grads, ref_grads, strict=True):
            assert rel_rms(r, g) <= TOL


@pytest.mark.parametrize("b_layout, c_layout", [("shared", "groups-of-4"),
                                                ("groups-of-4", "shared"),
                                                ("per-channel", "time-invariant"),
                                                ("time-invariant", "grouped")])
def test_b_and_c_in_different_layouts(b_layout, c_layout):
    """B read as one value for all lanes and C per lane, and the other way round (the kernel
    specialises its loop on each): values and every gradient == the float64 loop."""
    args = _inputs(batch=2, channels=16, n=6, length=90, layout=b_layout)
    args["C"] = _bc(c_layout, 2, 16, 6, 90)[1]
    _assert_matches_loop(args)


@pytest.mark.parametrize("groups", [1, 3])
def test_groups_of_whole_lane_blocks(groups):
    """Groups of 24 or 8 channels (every block of 8 lanes reads one group): B and C go to the
    kernel time-major and are read in place, and their gradients are accumulated time-major;
    values and every gradient == the float64 loop."""
    args = _inputs(batch=2, channels=24, n=16, length=130)
    args["B"], args["C"] = (torch.randn(2, groups, 16, 130) for _ in range(2))
    _assert_matches_loop(args)


def test_fused_backward_threads_agree():
    """Per-element gradients are bit-identical for 1 and 2 threads; the sums over channels or
    batch rows (A, B, C, D, delta_bias) are added per thread, so only rounding differs."""
    args = _inputs(batch=3, channels=64, n=16, length=300)
    cot_out, cot_last = torch.randn(3, 64, 300), torch.randn(3, 64, 16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, names = _gradients(args, cot_out, cot_last, selective_scan, torch.float32)
        torch.set_num_threads(2)
        two, _ = _gradients(args, cot_out, cot_last, selective_scan, torch.float32)
    finally:
        torch.set_num_threads(previous)
    for name, a, b in zip(["out", "last", *names], one, two, strict=True):
        if name in ("out", "last", "u", "delta", "z", "initial_state"):
            assert torch.equal(a, b), name
        else:
            assert rel_rms(a, b) <= 1e-6, name


def test_fused_backward_memory_is_a_checkpoint_per_block():
    """What the forward saves besides its inputs: one (N, 8-lane) state per 64 steps per job,
    B D N L / 64 floats, not the (B, D, N, L) states."""
    args = _inputs(batch=1, channels=16, n=16, length=4096)
    leaves = {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v
              for k, v in args.items()}
    out = selective_scan(**leaves)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    checkpoints = [t for t in saved if not any(t is v for v in leaves.values())]
    assert len(checkpoints) == 1
    assert checkpoints[0].numel() == 1 * 16 * 16 * 4096 // 64


def test_builds_into_the_cache_once_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(scan_kernel, "_state", {})
    assert scan_kernel.available()
    built = list(tmp_path.glob("selective_scan_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(scan_kernel, "_state", {})
    assert scan_kernel.available() and list(tmp_path.glob("*")) == built  # reused, not rebuilt
    monkeypatch.setattr(scan_kernel, "_state", {})
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SUBQ_CACHE_DIR", str(tmp_path / "other"))
    assert not scan_kernel.available()
    assert "building selective_scan.c failed" in scan_kernel.unavailable_reason()
    args = _inputs(batch=1, channels=8, n=4, length=10)
    assert rel_rms(_reference(args)[0], _kernel(args)[0]) <= 1e-4
