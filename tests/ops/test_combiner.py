"""Combiner's faithfulness tests (specs/combiner.md): the fast path against the explicit
implied matrix for every variant, the matrix's defining properties (rows sum to 1, strictly
positive on the whole support, rank-1 over a shared region) and the exact reductions to dense
attention. The registry's contract tests run the ``test_options`` variant; these run all four.
"""

from __future__ import annotations

import pytest
import torch

import subq
from subq.ops.combiner import VARIANTS, combiner_attention, default_span

from ..helpers import random_qkv, rel_rms

CASES = [pytest.param(variant, causal, id=f"{variant}-{'causal' if causal else 'noncausal'}")
         for variant in VARIANTS for causal in (True, False)]


def _support(length: int, causal: bool) -> torch.Tensor:
    full = torch.ones(length, length, dtype=torch.bool)
    return full.tril() if causal else full


@pytest.mark.parametrize("variant, causal", CASES)
@pytest.mark.parametrize("length, span, summary", [(61, 8, "max"), (45, 7, "mean"),
                                                   (50, None, "max")])
def test_fast_matches_reference_values_and_grads(variant, causal, length, span, summary):
    q, k, v = random_qkv(lq=length, value_dim=12, requires_grad=True)
    options = dict(method="combiner", causal=causal, variant=variant, span=span,
                   summary=summary)
    out = subq.attention(q, k, v, **options)
    ref = subq.reference(q, k, v, **options)
    assert rel_rms(ref, out) <= 1e-10
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cotangent)
    for g_ref, g in zip(ref_grads, grads, strict=True):
        assert rel_rms(g_ref, g) <= 1e-10


@pytest.mark.parametrize("variant, causal", CASES)
@pytest.mark.parametrize("length, span", [(61, 8), (64, 8), (50, None)])
def test_fast_without_autograd_matches_reference(variant, causal, length, span):
    """Without autograd (and equal head and value dims) the fast path takes torch's fused
    kernels and merges the partial softmaxes by their log-sum-exps; still the reference."""
    q, k, v = random_qkv(lq=length)
    options = dict(method="combiner", causal=causal, variant=variant, span=span)
    with torch.no_grad():
        out = subq.attention(q, k, v, **options)
    assert rel_rms(subq.reference(q, k, v, **options), out) <= 1e-10


@pytest.mark.parametrize("variant", ["fixed", "axial", "logsparse"])
def test_torch_compile_fullgraph(variant):
    q, k, v = random_qkv(lq=45, dtype=torch.float32)
    kwargs = dict(causal=True, cross=False, scale=0.3, key_padding_mask=None,
                  variant=variant, span=7, summary="max")
    fn = combiner_attention
    eager = fn(q, k, v, **kwargs)
    torch._dynamo.reset()
    assert rel_rms(eager, torch.compile(fn, fullgraph=True, dynamic=False)(q, k, v, **kwargs)) \
        <= 1e-5


@pytest.mark.parametrize("variant, causal", CASES)
def test_gradcheck(variant, causal):
    """Mean summaries: max-pooling is not differentiable where two entries tie, and finite
    differences of step 1e-6 can cross such a tie; the max path's gradients are held to the
    reference above."""
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=11, dim=3, requires_grad=True)

    def fast(q, k, v):
        return subq.attention(q, k, v, method="combiner", causal=causal, variant=variant,
                              span=3, summary="mean")

    assert torch.autograd.gradcheck(fast, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("variant, causal", CASES)
def test_implied_matrix_is_full_attention(variant, causal):
    """Rows sum to 1, A > 0 on the whole support, 0 outside, and A @ V is the fast output."""
    length = 53
    q, k, v = random_qkv(lq=length, dim=8)
    a = subq.weights(q, k, method="combiner", causal=causal, variant=variant, span=6)
    support = _support(length, causal)
    assert torch.allclose(a.sum(-1), torch.ones((), dtype=a.dtype), atol=1e-12, rtol=0)
    assert (a[..., support] > 0).all()
    assert (a[..., ~support] == 0).all()
    out = subq.attention(q, k, v, method="combiner", causal=causal, variant=variant, span=6)
    assert rel_rms(a @ v.repeat_interleave(2, dim=1), out) <= 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant, span", [("fixed", 1), ("fixed", 40), ("fixed", 1000),
                                           ("axial", 1), ("axial", 40)])
def test_exact_reductions_to_dense(variant, span, causal):
    """Singleton regions (span 1) or a single span/row (span >= L) leave dense attention."""
    q, k, v = random_qkv(lq=40)
    out = subq.attention(q, k, v, method="combiner", causal=causal, variant=variant, span=span)
    dense = subq.reference(q, k, v, method="dense", causal=causal)
    assert rel_rms(dense, out) <= 1e-12


def test_approximation_differs_from_dense():
    """With real regions the output is not dense attention (the test above is not vacuous)."""
    q, k, v = random_qkv(lq=40)
    dense = subq.attention(q, k, v, method="dense", causal=True)
    for variant in VARIANTS:
        out = subq.attention(q, k, v, method="combiner", causal=True, variant=variant, span=5)
        assert rel_rms(dense, out) > 1e-3, variant


@pytest.mark.parametrize("variant, rows, cols", [
    ("fixed", slice(24, 32), slice(0, 8)),      # span 3 sees span 0 as one region
    ("logsparse", slice(8, 16), slice(0, 8)),   # i in [8, 16) sees the block [0, 8)
    ("axial", slice(10, 32, 8), slice(0, 8)),   # column 2 of rows 1.. sees row 0 via (0, 2)
])
def test_shared_region_is_rank_one(variant, rows, cols):
    q, k, _ = random_qkv(lq=32, dim=8)
    a = subq.weights(q, k, method="combiner", causal=True, variant=variant, span=8)
    block = a[..., rows, cols]
    assert block.shape[-2] > 1 and block.shape[-1] > 1
    singular = torch.linalg.svdvals(block)
    assert (singular[..., 1] <= 1e-12 * singular[..., 0]).all()
    assert (singular[..., 0] > 0).all()


def test_direct_block_is_not_rank_one():
    """The direct part keeps full rank (so the rank-1 test above can fail)."""
    q, k, _ = random_qkv(lq=32, dim=8)
    a = subq.weights(q, k, method="combiner", causal=False, variant="fixed", span=8)
    singular = torch.linalg.svdvals(a[..., 8:16, 8:16])
    assert (singular[..., 1] > 1e-3 * singular[..., 0]).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_consistency(variant):
    """Causal: the output at i ignores everything after i (no future query leaks into a pool)."""
    q, k, v = random_qkv(lq=100)
    out = subq.attention(q, k, v, method="combiner", causal=True, variant=variant, span=8)
    for cut in (1, 37, 64):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, cut:] = torch.randn_like(x[:, :, cut:])
        out2 = subq.attention(q2, k2, v2, method="combiner", causal=True, variant=variant,
                              span=8)
        assert rel_rms(out[:, :, :cut], out2[:, :, :cut]) <= 1e-12
        assert rel_rms(out[:, :, cut:], out2[:, :, cut:]) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_close_to_float32(variant):
    q, k, v = (x.bfloat16().float() for x in random_qkv(lq=150, dim=32, dtype=torch.float32))
    options = dict(method="combiner", causal=True, variant=variant)
    out32 = subq.attention(q, k, v, **options)
    out16 = subq.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **options)
    assert out16.dtype == torch.bfloat16
    assert rel_rms(out32, out16) <= 1e-2


def test_default_span_is_ceil_sqrt():
    assert [default_span(n) for n in (0, 1, 2, 4, 5, 16, 17, 4096)] == [1, 1, 2, 2, 3, 4, 5, 64]


def test_cross_attention_is_refused():
    q, k, v = random_qkv(lq=10, lk=12)
    with pytest.raises(NotImplementedError, match="combiner.*cross"):
        subq.attention(q, k, v, method="combiner")
