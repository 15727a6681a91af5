"""No silent wrong answers (the contract's second half, DESIGN.md): inputs that are legal but
unusual give the same answer as their plain form, or a clear error, for every registered
mechanism. Parametrised over the registry like ``test_contract.py``, so a mechanism registered
later inherits every check."""

from __future__ import annotations

import pytest
import torch

import subq
from subq.registry import Pattern, mechanisms

from .helpers import call_options, pattern_lengths, random_qkv, rel_rms, run

MECHANISMS = mechanisms()
CASES = [pytest.param(m, p, id=f"{m.name}-{p.short}")
         for m in MECHANISMS for p in Pattern if p in m.patterns]
DECODERS = [pytest.param(m, id=m.name) for m in MECHANISMS if m.decodes]

#: Same numbers, another memory layout: the tolerance covers a changed summation order only.
LAYOUT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Three non-contiguous tensors equal to ``x (B, H, L, D)``: the last dim strided, the
    SDPA layout viewed from a ``(B, L, H, D)`` tensor, and a batch broadcast by ``expand``
    (stride 0; ``x``'s batch entries are made equal for it)."""
    wide = torch.stack((x, torch.randn_like(x)), dim=-1).flatten(-2)
    return {
        "strided": wide[..., ::2],
        "permuted": x.transpose(1, 2).contiguous().transpose(1, 2),
        "expanded": x[:1].expand_as(x),
    }


def _contiguous_inputs(view: str, x: torch.Tensor) -> torch.Tensor:
    return x[:1].expand_as(x).contiguous() if view == "expanded" else x


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("mech, pattern", CASES)
def test_views_equal_their_contiguous_copy(mech, pattern, dtype, grad):
    """Every path (the no-grad inference forms and the differentiable ones, every dtype) reads
    a strided, permuted or expanded view as its contiguous copy."""
    lq, lk = pattern_lengths(pattern, 256)  # a multiple of every block size: no padding copy
    base = random_qkv(lq=lq, lk=lk, dim=16, dtype=dtype)
    options = call_options(mech, *base)
    for view in ("strided", "permuted", "expanded"):
        plain = [_contiguous_inputs(view, x) for x in base]
        viewed = [_views(x)[view] for x in plain]
        assert all(not x.is_contiguous() for x in viewed)
        if grad:
            plain = [x.clone().requires_grad_() for x in plain]
            viewed = [x.requires_grad_() if x.is_leaf else x for x in viewed]
        outs = [subq.attention(*xs, method=mech.name, causal=pattern.causal,
                               cross=pattern.cross, **options) for xs in (plain, viewed)]
        err = rel_rms(*outs)
        assert err <= LAYOUT_TOLERANCE[dtype], f"{view}: rel RMS {err:.2e}"
        if grad:
            cot = torch.randn_like(outs[0])
            g_plain = torch.autograd.grad(outs[0], plain, cot, allow_unused=True)
            g_view = torch.autograd.grad(outs[1], [x for x in viewed if x.requires_grad], cot,
                                         allow_unused=True)
            for name, a, b in zip("qkv", g_plain, g_view, strict=True):
                if a is not None and b is not None:
                    assert rel_rms(a, b) <= LAYOUT_TOLERANCE[dtype], f"{view}: d{name}"


@pytest.mark.parametrize("mech, pattern", CASES)
def test_empty_batch_is_empty(mech, pattern):
    lq, lk = pattern_lengths(pattern, 40)
    q, k, v = random_qkv(batch=0, lq=lq, lk=lk, value_dim=6)
    for fn_name in ("fast", "reference"):
        assert run(fn_name, mech, pattern, q, k, v).shape == (0, 4, lq, 6)
    if mech.weights is not None:
        a = subq.weights(q, k, method=mech.name, causal=pattern.causal, cross=pattern.cross,
                         **call_options(mech, q, k, v))
        assert a.shape == (0, 4, lq, lk)


@pytest.mark.parametrize("mech, pattern", CASES)
def test_garbage_in_padding_never_reaches_an_output(mech, pattern):
    """Padded keys and values holding NaN (and, in self attention, NaN queries at the padded
    positions) leave every real row as it is with finite padding."""
    lq, lk = pattern_lengths(pattern, 150)
    q, k, v = random_qkv(lq=lq, lk=lk)
    mask = torch.zeros(2, lk, dtype=torch.bool)
    mask[0, -37:] = True   # right padding
    mask[1, :29] = True    # left padding, as a tokeniser pads for generation
    try:
        clean = run("fast", mech, pattern, q, k, v, key_padding_mask=mask)
    except NotImplementedError as err:
        assert "key_padding_mask" in str(err)
        return
    dirty = [x.clone() for x in (q, k, v)]
    for x in dirty[1:] if pattern.cross else dirty:
        x.transpose(1, 2)[mask] = float("nan")
    out = run("fast", mech, pattern, *dirty, key_padding_mask=mask)
    real = torch.ones(2, lq, dtype=torch.bool) if pattern.cross else ~mask
    rows = out.transpose(1, 2)[real]
    assert torch.isfinite(rows).all(), f"{int((~torch.isfinite(rows)).sum())} NaN entries"
    assert rel_rms(clean.transpose(1, 2)[real], rows) <= 1e-10


def _low_precision_error(mech, pattern, q, k, v, options, dtype, cot
                         ) -> tuple[float, list[float]]:
    """rel RMS of the mechanism's output and gradients in ``dtype`` against float64 on the same
    numbers (``cot``: the output's cotangent); asserts that all of them are finite."""
    results = []
    for precision in (torch.float64, dtype):
        xs = [x.to(precision).requires_grad_() for x in (q, k, v)]
        out = subq.attention(*xs, method=mech.name, causal=pattern.causal,
                             cross=pattern.cross, **options)
        grads = torch.autograd.grad(out, xs, cot.to(precision), allow_unused=True)
        results.append((out, [torch.zeros_like(x) if g is None else g
                              for x, g in zip(xs, grads, strict=True)]))
    (out64, g64), (low, g_low) = results
    assert torch.isfinite(low).all(), f"{int((~torch.isfinite(low)).sum())} non-finite"
    for name, g in zip("qkv", g_low, strict=True):
        assert torch.isfinite(g).all(), f"d{name}: {int((~torch.isfinite(g)).sum())} non-finite"
    largest = max(float(g.double().pow(2).mean().sqrt()) for g in g64)
    grad_errors = [float((a.double() - b.double()).pow(2).mean().sqrt()) / largest
                   for a, b in zip(g64, g_low, strict=True)]
    return rel_rms(out64, low), grad_errors


#: How much larger than its yardstick a mechanism's float16 error may be at large logits.
FP16_ERROR_FACTOR = 4.0


@pytest.mark.parametrize("mech, pattern", CASES)
def test_half_precision_with_large_logits(mech, pattern):
    """float16 inputs whose logits exceed float16's range (|q·k| up to ~1e5 with q and k scaled
    by 64): forward and gradients finite, errors within a small factor of the larger of two
    yardsticks on the same numbers: dense attention's float16 error, and the mechanism's own
    error on float32 inputs. The contract is that half inputs accumulate in float32, so a
    mechanism whose function is less well conditioned than dense's at such logits may lose
    what float32 loses on it, but no more: Combiner's softmax within a region, chained to the
    softmax over regions, loses up to ~10x what dense loses in float32, and its O(L^2)
    reference in float32 loses the same to six digits."""
    lq, lk = pattern_lengths(pattern, 384)
    generator = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=lq, lk=lk, dim=64,
                         generator=generator)
    q, k, v = (x.half().double() for x in (q * 64, k * 64, v))  # representable in float16
    cot = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    options = call_options(mech, q, k, v)
    dense = subq.registry.get("dense")
    out_err, grad_err = _low_precision_error(mech, pattern, q, k, v, options,
                                             torch.float16, cot)
    dense_out, dense_grad = _low_precision_error(dense, pattern, q, k, v, {},
                                                 torch.float16, cot)
    own_out, own_grad = _low_precision_error(mech, pattern, q, k, v, options,
                                             torch.float32, cot)
    floor = 2 ** -11 / 3 ** 0.5  # the RMS of rounding a result to float16 (unit roundoff 2^-11)
    assert out_err <= FP16_ERROR_FACTOR * max(dense_out, own_out, floor), (out_err, dense_out,
                                                                           own_out)
    for name, err, ref, own in zip("qkv", grad_err, dense_grad, own_grad, strict=True):
        assert err <= FP16_ERROR_FACTOR * max(ref, own, floor), (name, err, ref, own)


@pytest.mark.parametrize("mech", DECODERS)
def test_decode_equals_prefill_at_default_options(mech):
    """At the defaults a user gets (no test options), 1100 decoding steps equal the causal
    prefill: approximations of the decode schedule are opt-in."""
    length = 1100
    generator = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=length, dim=8, generator=generator)
    options = mech.sample_options(q, k, v, generator=generator)
    prefill = subq.attention(q, k, v, method=mech.name, causal=True, **options)
    state = subq.init_state(mech.name, batch=1, kv_heads=1, head_dim=8, dtype=q.dtype,
                            **options)
    steps = []
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method=mech.name, **options)
        steps.append(out_t)
    decoded = torch.cat(steps, dim=2)
    off = (decoded - prefill).abs().amax(dim=(0, 1, 3)) > 1e-8
    first = int(off.nonzero()[0]) if off.any() else None
    assert first is None, f"decode differs from prefill from t = {first} ({int(off.sum())} steps)"
