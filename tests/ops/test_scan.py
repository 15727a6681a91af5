"""The selective scan: fast form == sequential reference (values, final states, gradients),
step-by-step == scan, state round trips, stability, the chunked scan across several chunks and
blocks (custom backward: gradcheck), ``linear_recurrence``, and bad input."""

from __future__ import annotations

import pytest
import torch

import subq.ops.scan as scan_module
from subq.ops.scan import (
    linear_recurrence,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)

from ..helpers import rel_rms

BC_LAYOUTS = ["time-invariant", "shared", "grouped", "per-channel"]


def _bc(layout, batch, channels, n, length, dtype):
    shape = {"time-invariant": (channels, n), "shared": (batch, n, length),
             "grouped": (batch, 2, n, length), "per-channel": (batch, channels, n, length)}[layout]
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


def _inputs(batch=2, channels=6, n=4, length=37, layout="shared", dtype=torch.float64,
            full=True):
    """u, delta, A, B, C and (with ``full``) every optional argument, freshly drawn."""
    u = torch.randn(batch, channels, length, dtype=dtype)
    delta = torch.randn(batch, channels, length, dtype=dtype)
    A = -torch.exp(torch.randn(channels, n, dtype=dtype))
    B, C = _bc(layout, batch, channels, n, length, dtype)
    kwargs = {}
    if full:
        kwargs = dict(D=torch.randn(channels, dtype=dtype),
                      z=torch.randn(batch, channels, length, dtype=dtype),
                      delta_bias=torch.randn(channels, dtype=dtype), delta_softplus=True,
                      initial_state=torch.randn(batch, channels, n, dtype=dtype))
    return [u, delta, A, B, C], kwargs


@pytest.mark.parametrize("layout", BC_LAYOUTS)
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("length", [1, 63, 333])
def test_fast_equals_reference_float64(layout, n, length):
    args, kwargs = _inputs(n=n, length=length, layout=layout)
    out, last = selective_scan(*args, return_last_state=True, **kwargs)
    ref, ref_last = selective_scan_reference(*args, return_last_state=True, **kwargs)
    assert out.shape == ref.shape == args[0].shape and out.dtype == torch.float64
    assert rel_rms(ref, out) <= 1e-10
    assert rel_rms(ref_last, last) <= 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("layout", ["shared", "grouped", "time-invariant"])
def test_gradients_match_reference(dtype, tol, layout):
    args, kwargs = _inputs(n=16, length=77, layout=layout, dtype=dtype)
    tensors = args + [kwargs["D"], kwargs["z"], kwargs["delta_bias"], kwargs["initial_state"]]
    for x in tensors:
        x.requires_grad_(True)
    cot_out = torch.randn_like(args[0])
    cot_state = torch.randn_like(kwargs["initial_state"])

    def grads(fn):
        out, last = fn(*args, return_last_state=True, **kwargs)
        loss = (out * cot_out).sum() + (last * cot_state).sum()
        return out, torch.autograd.grad(loss, tensors)

    ref, ref_grads = grads(selective_scan_reference)
    out, fast_grads = grads(selective_scan)
    assert rel_rms(ref, out) <= tol
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    for name, g_ref, g in zip(names, ref_grads, fast_grads, strict=True):
        assert rel_rms(g_ref, g) <= tol, f"d{name}: {rel_rms(g_ref, g):.2e}"


@pytest.mark.parametrize("n", [1, 16])
def test_float32_matches_reference_long(n):
    args, kwargs = _inputs(batch=1, channels=8, n=n, length=1000, dtype=torch.float32)
    assert rel_rms(selective_scan_reference(*args, **kwargs),
                   selective_scan(*args, **kwargs)) <= 1e-4


def test_gradcheck_small():
    args, kwargs = _inputs(batch=1, channels=2, n=3, length=6)
    kwargs.pop("delta_softplus")
    tensors = args + [kwargs.pop("D"), kwargs.pop("z"), kwargs.pop("initial_state")]
    for x in tensors:
        x.requires_grad_(True)

    def fast(u, delta, A, B, C, D, z, h0):
        return selective_scan(u, delta, A, B, C, D=D, z=z, initial_state=h0,
                              delta_softplus=True, **kwargs)

    assert torch.autograd.gradcheck(fast, tuple(tensors))


def test_bfloat16_close_to_float32():
    args, kwargs = _inputs(length=200, dtype=torch.float32)
    args = [x.bfloat16().float() for x in args]
    kwargs = {k: (v.bfloat16().float() if isinstance(v, torch.Tensor) else v)
              for k, v in kwargs.items()}
    out32 = selective_scan(*args, **kwargs)
    out16 = selective_scan(*[x.bfloat16() for x in args],
                           **{k: (v.bfloat16() if isinstance(v, torch.Tensor) else v)
                              for k, v in kwargs.items()})
    assert out16.dtype == torch.bfloat16
    assert rel_rms(out32, out16) <= 1e-2


@pytest.mark.parametrize("layout", BC_LAYOUTS)
def test_step_by_step_equals_scan(layout):
    args, kwargs = _inputs(length=29, layout=layout)
    u, delta, A, B, C = args
    out, last = selective_scan(*args, return_last_state=True, **kwargs)
    state = kwargs["initial_state"]
    batch, channels = u.shape[:2]
    for t in range(u.shape[-1]):
        def at(x, t=t):
            return x[..., t] if x.dim() > 2 else x[None].expand(batch, channels, x.shape[1])

        out_t, state = selective_scan_step(state, u[..., t], delta[..., t], A, at(B), at(C),
                                           D=kwargs["D"], z=kwargs["z"][..., t],
                                           delta_bias=kwargs["delta_bias"], delta_softplus=True)
        assert rel_rms(out[..., t], out_t) <= 1e-10, f"token {t}"
    assert rel_rms(last, state) <= 1e-10


@pytest.mark.parametrize("split", [1, 20, 40])
def test_state_round_trip(split):
    """scan([x1; x2]) == scan(x2) started from the final state of scan(x1)."""
    args, kwargs = _inputs(length=41, layout="grouped")
    whole, last = selective_scan(*args, return_last_state=True, **kwargs)

    def part(sl):
        return [x if x.dim() == 2 else x[..., sl] for x in args], dict(kwargs, z=kwargs["z"][
            ..., sl])

    first_args, first_kwargs = part(slice(0, split))
    out1, state1 = selective_scan(*first_args, return_last_state=True, **first_kwargs)
    second_args, second_kwargs = part(slice(split, None))
    second_kwargs["initial_state"] = state1
    out2, state2 = selective_scan(*second_args, return_last_state=True, **second_kwargs)
    assert rel_rms(whole, torch.cat([out1, out2], dim=-1)) <= 1e-10
    assert rel_rms(last, state2) <= 1e-10


def test_initial_state_matters_and_defaults_to_zero():
    args, kwargs = _inputs(length=10)
    h0 = kwargs.pop("initial_state")
    zero = selective_scan(*args, initial_state=torch.zeros_like(h0), **kwargs)
    assert rel_rms(selective_scan(*args, **kwargs), zero) <= 1e-14
    assert rel_rms(zero, selective_scan(*args, initial_state=h0, **kwargs)) > 1e-3


def test_stable_for_strong_decay():
    """Steps that decay by hundreds of nats (where the cumulative-sum trick overflows)."""
    args, _ = _inputs(batch=1, channels=4, n=16, length=300, dtype=torch.float32, full=False)
    u, delta, A, B, C = args
    delta = delta.abs() * 50.0
    out = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(out).all()
    assert rel_rms(selective_scan_reference(u, delta, A, B, C), out) <= 1e-4


def test_length_zero():
    args, kwargs = _inputs(length=0)
    out, last = selective_scan(*args, return_last_state=True, **kwargs)
    assert out.shape == (2, 6, 0)
    assert torch.equal(last, kwargs["initial_state"])


def test_layouts_agree():
    """Shared B equals the grouped layout with one group and the per-channel layout with the
    same vector repeated; a time-invariant B equals a shared one constant over time."""
    args, kwargs = _inputs(layout="shared", length=20)
    u, delta, A, B, C = args
    shared = selective_scan(u, delta, A, B, C, **kwargs)
    grouped = selective_scan(u, delta, A, B[:, None], C[:, None], **kwargs)
    per_channel = selective_scan(u, delta, A, B[:, None].expand(-1, 6, -1, -1),
                                 C[:, None].expand(-1, 6, -1, -1), **kwargs)
    assert rel_rms(shared, grouped) <= 1e-14
    assert rel_rms(shared, per_channel) <= 1e-14
    b_const, c_const = torch.randn(6, 4, dtype=u.dtype), torch.randn(6, 4, dtype=u.dtype)
    invariant = selective_scan(u, delta, A, b_const, c_const, **kwargs)
    expanded = selective_scan(u, delta, A, b_const[None, :, :, None].expand(2, 6, 4, 20),
                              c_const[None, :, :, None].expand(2, 6, 4, 20), **kwargs)
    assert rel_rms(invariant, expanded) <= 1e-14


@pytest.mark.parametrize("bad, name", [
    (lambda a, k: ([a[0][0]] + a[1:], k), "u"),
    (lambda a, k: ([a[0], a[1][..., :-1]] + a[2:], k), "delta"),
    (lambda a, k: (a[:2] + [a[2][:, :1].expand(6, 4).T] + a[3:], k), "A"),
    (lambda a, k: (a[:3] + [a[3][:, :3]] + a[4:], k), "B"),
    (lambda a, k: (a[:4] + [a[4][..., :-1]], k), "C"),
    (lambda a, k: (a, dict(k, D=k["D"][:-1])), "D"),
    (lambda a, k: (a, dict(k, z=k["z"][:1])), "z"),
    (lambda a, k: (a, dict(k, initial_state=k["initial_state"][..., :-1])), "initial_state"),
])
def test_bad_input_raises(bad, name):
    args, kwargs = _inputs()
    args, kwargs = bad(args, kwargs)
    with pytest.raises(ValueError, match=name):
        selective_scan(*args, **kwargs)


@pytest.fixture(params=[1, 288, 1 << 20], ids=["rows1", "rows2", "all-rows"])
def small_chunks(monkeypatch, request):
    """Chunks of 4 and blocks of 8 tokens, so that short inputs cross many of both; tiles of
    1, 2 (for 3 channels x 6 states x 8 tokens) or all batch rows."""
    monkeypatch.setattr(scan_module, "_CHUNK", 4)
    monkeypatch.setattr(scan_module, "_BLOCK", 8)
    monkeypatch.setattr(scan_module, "_TILE", request.param)


@pytest.mark.parametrize("layout", BC_LAYOUTS)
@pytest.mark.parametrize("length", [3, 8, 37])
def test_many_chunks_and_blocks_values_and_gradients(small_chunks, layout, length):
    """Carries across chunks and blocks, padding of a partial chunk, and the custom backward
    (which recomputes states per block and runs the adjoint scan) == the reference loop."""
    args, kwargs = _inputs(batch=3, n=3, length=length, layout=layout)
    tensors = args + [kwargs["D"], kwargs["z"], kwargs["delta_bias"], kwargs["initial_state"]]
    for x in tensors:
        x.requires_grad_(True)
    cot_out, cot_state = torch.randn_like(args[0]), torch.randn_like(kwargs["initial_state"])

    def run(fn):
        out, last = fn(*args, return_last_state=True, **kwargs)
        loss = (out * cot_out).sum() + (last * cot_state).sum()
        return [out, last, *torch.autograd.grad(loss, tensors)]

    for ref, fast in zip(run(selective_scan_reference), run(selective_scan), strict=True):
        assert rel_rms(ref, fast) <= 1e-10


@pytest.mark.parametrize("time_major", [False, True], ids=["channel-major", "time-major"])
@pytest.mark.parametrize("options", ["none", "all", "softplus-only", "bias-only"])
@pytest.mark.parametrize("length", [5, 37])
def test_inference_path_equals_reference(small_chunks, time_major, options, length):
    """Without autograd the scan runs its fused tile-by-tile path (discretisation, skip and gate
    per tile, in the caller's layout): == the reference loop, for inputs stored channel-major
    ``(B, D, L)`` or as time-major views, every optional part on or off."""
    args, kwargs = _inputs(batch=3, n=3, length=length, layout="grouped")
    kwargs = {"none": {}, "all": kwargs,
              "softplus-only": dict(delta_softplus=True),
              "bias-only": dict(delta_bias=kwargs["delta_bias"].abs())}[options]
    if not kwargs.get("delta_softplus"):  # positive steps, so that the states stay finite
        args[1] = args[1].abs()
    if time_major:
        args = [x.transpose(1, 2).contiguous().transpose(1, 2) if i < 2 else x
                for i, x in enumerate(args)]
        if "z" in kwargs:
            kwargs["z"] = kwargs["z"].transpose(1, 2).contiguous().transpose(1, 2)
    ref, ref_last = selective_scan_reference(*args, return_last_state=True, **kwargs)
    with torch.no_grad():
        out, last = selective_scan(*args, return_last_state=True, **kwargs)
    assert out.shape == ref.shape and out.stride() == args[0].stride()
    assert rel_rms(ref, out) <= 1e-10 and rel_rms(ref_last, last) <= 1e-10


def test_gradcheck_many_blocks(small_chunks):
    """gradcheck of the custom backward over 3 blocks (one partial chunk), final state too."""
    args, kwargs = _inputs(batch=2, channels=4, n=2, length=19, layout="grouped")
    tensors = args + [kwargs["D"], kwargs["z"], kwargs["delta_bias"], kwargs["initial_state"]]
    for x in tensors:
        x.requires_grad_(True)

    def fast(u, delta, A, B, C, D, z, bias, h0):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, initial_state=h0,
                              delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fast, tuple(tensors))


def test_strong_decay_gradients_finite_and_exact(small_chunks):
    """Decays of hundreds of nats per step: forward and backward stay finite and exact."""
    args, _ = _inputs(batch=1, channels=4, n=16, length=45, dtype=torch.float32, full=False)
    u, delta, A, B, C = args
    delta = (delta.abs() * 50.0).requires_grad_(True)
    grads = []
    for fn in (selective_scan_reference, selective_scan):
        out = fn(u, delta, A, B, C)
        grads.append((out, torch.autograd.grad(out.square().sum(), delta)[0]))
    (ref, g_ref), (out, g) = grads
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert rel_rms(ref, out) <= 1e-4 and rel_rms(g_ref, g) <= 1e-4


def _loop_recurrence(a, x):
    h, states = torch.zeros_like(x[:, :, 0]), []
    for t in range(x.shape[2]):
        h = a[:, :, t] * h + x[:, :, t]
        states.append(h)
    return torch.stack(states, dim=2)


@pytest.mark.parametrize("length", [1, 5, 37])
def test_linear_recurrence_matches_loop(small_chunks, length):
    a = torch.rand(2, 3, length, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, length, 4, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, 3, length, 4, dtype=torch.float64)
    ref, fast = _loop_recurrence(a, x), linear_recurrence(a, x)
    assert rel_rms(ref, fast) <= 1e-12
    for g_ref, g in zip(torch.autograd.grad(ref, (a, x), cot),
                        torch.autograd.grad(fast, (a, x), cot), strict=True):
        assert rel_rms(g_ref, g) <= 1e-12
    assert torch.autograd.gradcheck(linear_recurrence, (a, x))
