"""HAX (subq/ops/hax.py): the fast index sets equal the dense l x l constructions, row budgets,
the sign-bit / prototype-argmax identity, the baselines, decoding for every arch."""

from __future__ import annotations

import itertools

import pytest
import torch

import subq
from subq.ops import hax, hax_sparse

from ..helpers import random_qkv, rel_rms


def _dense(idx: torch.Tensor, ok: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(*idx.shape[:-1], length + 1, dtype=torch.long)
    out.scatter_add_(-1, torch.where(ok, idx, length), torch.ones_like(idx))
    return out[..., :length]


@pytest.mark.parametrize("hash_, num_hash, k_lsh", [("sign", 3, 4), ("sign", 1, 7),
                                                     ("argmax", 4, 5), ("sign", 8, 2)])
@pytest.mark.parametrize("center", ["none", "prefix_mean"])
def test_lsh_indices_equal_dense_mask(hash_, num_hash, k_lsh, center):
    length = 97
    q, k, _ = random_qkv(batch=2, q_heads=6, kv_heads=2, lq=length)
    proj = torch.randn(q.shape[-1], num_hash, dtype=torch.float64)
    q_codes = hax.bucket_codes(hax.center(q, center), proj, hash_)
    k_codes = hax.bucket_codes(hax.center(k, center), proj, hash_)
    idx, ok = hax.lsh_indices(q_codes, k_codes, k_lsh)
    counts = _dense(idx, ok, length)
    assert counts.max() <= 1  # no key twice
    assert torch.equal(counts.bool(), hax.lsh_mask(q_codes, k_codes, k_lsh))
    # The dense construction, spelled out for one row: the k most recent same-bucket keys.
    b, h, i = 1, 5, length - 1
    same = [j for j in range(i + 1) if k_codes[b, h // 3, j] == q_codes[b, h, i]]
    assert torch.nonzero(counts[b, h, i]).flatten().tolist() == same[-k_lsh:]


@pytest.mark.parametrize("k_ks", [1, 3, 16, 40])
def test_key_selection_indices_equal_dense_mask(k_ks):
    length = 90
    scores = torch.randn(2, 3, length, dtype=torch.float64)
    scores[0] = torch.randint(0, 5, (3, length)).double()  # many ties: the earlier key wins
    idx, ok = hax.key_selection_indices(scores, k_ks)
    counts = _dense(idx, ok, length)
    assert counts.max() <= 1
    dense = hax.key_selection_mask(scores, k_ks)
    assert torch.equal(counts.bool(), dense)
    # Spelled out: row i holds the k best of the prefix by (score desc, position asc).
    i = length // 2
    best = sorted(range(i + 1), key=lambda j: (-float(scores[0, 1, j]), j))[:k_ks]
    assert torch.nonzero(dense[0, 1, i]).flatten().tolist() == sorted(best)


@pytest.mark.parametrize("arch", hax.ARCHS[:-1])
def test_union_rows_are_causal_within_budget_and_equal_dense(arch):
    length = 120
    q, k, _ = random_qkv(batch=1, q_heads=4, kv_heads=2, lq=length)
    opts = dict(arch=arch, k_lsh=5, k_ks=6, window=7, sinks=3, dilation=9, num_hash=3,
                projections=torch.randn(q.shape[-1], 3, dtype=torch.float64))
    idx, ok = hax.hax_indices(q, k, **opts)
    counts = _dense(idx, ok, length)
    allowed = hax.hax_mask(q, k, **opts)
    assert counts.max() <= 1
    assert torch.equal(counts.bool(), allowed)
    assert not torch.triu(allowed, diagonal=1).any()  # causal
    budget = {"hax": 11, "lsh": 5, "ks": 6, "window": 7, "sink": 3, "dilated": length // 9,
              "window+dilated": 7 + length // 9}[arch]
    assert allowed.sum(-1).max() <= budget
    if arch in ("ks", "window"):  # a long prefix fills the budget exactly
        assert (allowed.sum(-1)[..., -1] == budget).all()


@pytest.mark.parametrize("h", [1, 3, 5])
def test_sign_bit_bucket_is_argmax_over_signed_prototypes(h):
    """Appendix A: the sign-bit code of x is the argmax of x . sum_b s_b H_b over s in {+-1}^h."""
    x = torch.randn(500, 8, dtype=torch.float64)
    proj = torch.randn(8, h, dtype=torch.float64)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=h)), dtype=torch.float64)
    prototypes = proj @ signs.T                                   # (D, 2^h)
    winner = signs[(x @ prototypes).argmax(-1)]                  # (500, h)
    code_of_winner = ((winner > 0).long() << torch.arange(h)).sum(-1)
    assert torch.equal(hax.bucket_codes(x, proj, "sign"), code_of_winner)


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_path_matches_reference(monkeypatch, grad):
    """The sparse softmax goes in chunks of queries, forward and (with autograd) the recomputing
    backward: force several chunks of one key-selection block (C = 16) each over five blocks,
    then compare values and gradients with the dense reference."""
    monkeypatch.setattr(hax_sparse, "_GATHER_ELEMENTS", 20 * 2 * 4 * (5 + 1) * 16)
    q, k, v = random_qkv(lq=70, requires_grad=grad)
    opts = dict(k_lsh=5, k_ks=3, num_hash=3)
    with torch.set_grad_enabled(grad):
        out = subq.attention(q, k, v, method="hax", causal=True, **opts)
        ref = subq.reference(q, k, v, method="hax", causal=True, **opts)
    assert rel_rms(ref, out) <= 1e-10
    if grad:
        cot = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), cot),
                        torch.autograd.grad(ref, (q, k, v), cot), strict=True):
            assert rel_rms(b, a) <= 1e-10


def test_full_equals_dense_causal():
    q, k, v = random_qkv(lq=150)
    out = subq.attention(q, k, v, method="hax", causal=True, arch="full")
    assert rel_rms(subq.attention(q, k, v, method="dense", causal=True), out) <= 1e-12


@pytest.mark.parametrize("arch", hax.ARCHS)
def test_every_arch_matches_reference(arch):
    q, k, v = random_qkv(lq=200, requires_grad=True)
    opts = dict(arch=arch, k_lsh=6, k_ks=5, window=9, sinks=4, dilation=11, num_hash=4)
    out = subq.attention(q, k, v, method="hax", causal=True, **opts)
    ref = subq.reference(q, k, v, method="hax", causal=True, **opts)
    assert rel_rms(ref, out) <= 1e-10
    cot = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), cot)
    g_ref = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g, g_ref, strict=True):
        assert rel_rms(b, a) <= 1e-10


def _decode(q, k, v, scores=None, **opts):
    state = subq.init_state("hax", batch=q.shape[0], kv_heads=k.shape[1], head_dim=q.shape[-1],
                            value_dim=v.shape[-1], dtype=q.dtype, **opts)
    outs = []
    for t in range(q.shape[2]):
        step_opts = dict(opts)
        if scores is not None:
            step_opts["key_scores"] = scores[..., t:t + 1]
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="hax", **step_opts)
        outs.append(out_t)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("arch, extra", [("hax", {"hash": "argmax", "center": "none"}),
                                         ("lsh", {}), ("ks", {}), ("window+dilated", {}),
                                         ("sink", {}), ("full", {})])
def test_decode_equals_prefill_every_arch(arch, extra):
    q, k, v = random_qkv(lq=60, value_dim=5)
    opts = dict(arch=arch, k_lsh=3, k_ks=4, window=5, sinks=3, dilation=7, num_hash=2,
                seed=11, **extra)
    prefill = subq.attention(q, k, v, method="hax", causal=True, **opts)
    decoded, state = _decode(q, k, v, **opts)
    assert rel_rms(prefill, decoded) <= 1e-10
    if arch != "full":  # the cache stays bounded: only selectable keys survive
        assert state.keys.shape[2] < 60


def test_decode_with_given_key_scores():
    q, k, v = random_qkv(lq=50)
    scores = torch.randn(2, 2, 50, dtype=torch.float64)
    opts = dict(k_lsh=3, k_ks=4, num_hash=2)
    prefill = subq.attention(q, k, v, method="hax", causal=True, key_scores=scores, **opts)
    decoded, _ = _decode(q, k, v, scores=scores, **opts)
    assert rel_rms(prefill, decoded) <= 1e-10
    # The scores matter: other scores select other keys.
    other = subq.attention(q, k, v, method="hax", causal=True, key_scores=-scores, **opts)
    assert rel_rms(prefill, other) > 1e-3


def test_projections_from_seed_or_generator():
    q, k, v = random_qkv(lq=80)
    opts = dict(arch="lsh", k_lsh=3, num_hash=3)
    a = subq.attention(q, k, v, method="hax", causal=True, seed=5, **opts)
    assert torch.equal(a, subq.attention(q, k, v, method="hax", causal=True, seed=5, **opts))
    assert rel_rms(a, subq.attention(q, k, v, method="hax", causal=True, seed=6, **opts)) > 1e-3
    gen = torch.Generator().manual_seed(5)
    first = subq.attention(q, k, v, method="hax", causal=True, generator=gen, **opts)
    second = subq.attention(q, k, v, method="hax", causal=True, generator=gen, **opts)
    assert rel_rms(first, second) > 1e-3  # a fresh draw per call (training regime)
    ref = subq.reference(q, k, v, method="hax", causal=True,
                         generator=torch.Generator().manual_seed(5), **opts)
    assert rel_rms(ref, first) <= 1e-10  # same generator state, same draw


def test_sequence_mean_centre_is_not_causal():
    """The released code's whole-sequence centring: later tokens move earlier buckets."""
    q, k, v = random_qkv(batch=1, lq=120)
    opts = dict(arch="lsh", k_lsh=4, num_hash=4, center="sequence_mean")
    out = subq.attention(q, k, v, method="hax", causal=True, **opts)
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 60:] += 3.0
    k2[:, :, 60:] += 3.0
    out2 = subq.attention(q2, k2, v, method="hax", causal=True, **opts)
    assert rel_rms(out[:, :, :60], out2[:, :, :60]) > 1e-3
    causal = dict(opts, center="prefix_mean")
    before = subq.attention(q, k, v, method="hax", causal=True, **causal)
    after = subq.attention(q2, k2, v, method="hax", causal=True, **causal)
    assert rel_rms(before[:, :, :60], after[:, :, :60]) <= 1e-12
    with pytest.raises(NotImplementedError, match="sequence_mean"):
        subq.init_state("hax", batch=1, kv_heads=2, head_dim=16, **opts)


def test_bad_option_shapes_raise():
    q, k, v = random_qkv(lq=20)
    with pytest.raises(ValueError, match="projections"):
        subq.attention(q, k, v, method="hax", causal=True, projections=torch.randn(3, 4))
    with pytest.raises(ValueError, match="key_scores"):
        subq.attention(q, k, v, method="hax", causal=True, key_scores=torch.randn(2, 2, 19))
    with pytest.raises(ValueError, match="num_hash"):
        subq.attention(q, k, v, method="hax", causal=True, num_hash=63)
