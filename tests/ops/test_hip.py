"""HiP's faithfulness tests (specs/hip.md): the tree search against its loop reference, the
all-blocks property, the selection counts, planted peaks, recall against random blocks, and
decoding with ``refresh == block_q``."""

from __future__ import annotations

import math

import pytest
import torch

import subq
from subq.ops.hip_mask import best_in_order, search_blocks, search_blocks_loop, search_iterations
from subq.ops.reference import masked_attention

from ..helpers import random_qkv, rel_rms


def _random_search_inputs(rows=12, reps=3, dim=8, length=97, padding=False, generator=None):
    q_rep = torch.randn(rows, reps, dim, dtype=torch.float64, generator=generator)
    q_ok = torch.rand(rows, reps, generator=generator) < 0.7
    q_ok[:, 0] = True
    keys = torch.randn(2 * length, dim, dtype=torch.float64, generator=generator)
    offset = torch.randint(0, 2, (rows,), generator=generator) * length
    range_end = torch.randint(0, length + 1, (rows,), generator=generator)
    key_ok = torch.rand(2 * length, generator=generator) > 0.3 if padding else None
    return q_rep, q_ok, keys, offset, range_end, key_ok


@pytest.mark.parametrize("representative", ["center", "first"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("n_nodes, block_k", [(4, 2), (3, 3), (5, 1)])
def test_vectorised_search_equals_loop_reference(representative, padding, n_nodes, block_k):
    q_rep, q_ok, keys, offset, range_end, key_ok = _random_search_inputs(padding=padding)
    blocks, valid = search_blocks(q_rep, q_ok, keys, offset, range_end, 97, n_nodes=n_nodes,
                                  block_k=block_k, representative=representative,
                                  key_ok=key_ok)
    expected = search_blocks_loop(q_rep, q_ok, keys, offset, range_end, n_nodes=n_nodes,
                                  block_k=block_k, representative=representative,
                                  key_ok=key_ok)
    for row, want in enumerate(expected):
        assert sorted(blocks[row][valid[row]].tolist()) == want, f"row {row}"


@pytest.mark.parametrize("representative", ["center", "first"])
def test_block_aligned_search_equals_loop_reference(representative):
    """The fast form (keys gathered a block at a time, ranges ending on block boundaries, as in
    a prefill) returns the loop reference's indices too."""
    length, block_k, n_nodes = 96, 3, 4
    q_rep, q_ok, keys, _, _, _ = _random_search_inputs(length=length)
    offset = torch.randint(0, 2, (12,)) * length
    range_end = torch.randint(0, length // block_k + 1, (12,)) * block_k
    blocks, valid = search_blocks(q_rep, q_ok, keys, offset, range_end, length,
                                  n_nodes=n_nodes, block_k=block_k,
                                  representative=representative, min_range=int(range_end.min()),
                                  row_length=length, aligned_ranges=True)
    expected = search_blocks_loop(q_rep, q_ok, keys, offset, range_end, n_nodes=n_nodes,
                                  block_k=block_k, representative=representative)
    for row, want in enumerate(expected):
        assert sorted(blocks[row][valid[row]].tolist()) == want, f"row {row}"


@pytest.mark.parametrize("n_best", [1, 5, 16, 31])
def test_best_in_order_is_a_stable_sort_prefix(n_best):
    """Many ties (small integers and -inf): the kept indices are exactly the first n_best of a
    stable descending sort, listed in increasing order."""
    score = torch.randint(-3, 4, (50, 32)).double()
    score[torch.rand(50, 32) < 0.3] = float("-inf")
    expected = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n_best]
    assert torch.equal(best_in_order(score, n_best), expected.sort(dim=1).values)


@pytest.mark.parametrize("representative", ["center", "first"])
def test_each_row_selects_min_m_distinct_causal_blocks(representative):
    q_rep, q_ok, keys, offset, range_end, _ = _random_search_inputs(rows=40)
    n_nodes, block_k = 4, 2
    blocks, valid = search_blocks(q_rep, q_ok, keys, offset, range_end, 97, n_nodes=n_nodes,
                                  block_k=block_k, representative=representative)
    for row in range(40):
        n_blocks = -(-int(range_end[row]) // block_k)
        chosen = blocks[row][valid[row]].tolist()
        assert len(chosen) == len(set(chosen)) == min(n_nodes, n_blocks)
        assert all(b >= 0 and b * block_k < int(range_end[row]) for b in chosen)


@pytest.mark.parametrize("n_blocks, n_nodes", [(1, 4), (4, 4), (5, 4), (8, 4), (9, 4),
                                               (1000, 7), (4096, 256)])
def test_iterations_are_ceil_log2(n_blocks, n_nodes):
    expected = 0 if n_blocks <= n_nodes else math.ceil(math.log2(n_blocks / n_nodes))
    assert search_iterations(n_blocks, n_nodes) == expected


@pytest.mark.parametrize("causal", [True, False])
def test_budget_above_length_is_dense_attention(causal):
    q, k, v = random_qkv(lq=150, dim=16)
    out = subq.attention(q, k, v, method="hip", causal=causal, topk=256, block_q=8, block_k=4,
                         sink=3, window=5)
    dense = subq.attention(q, k, v, method="dense", causal=causal)
    assert rel_rms(dense, out) <= 1e-12


@pytest.mark.parametrize("queries", ["prefix", "block"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [257, 333])
def test_inference_path_equals_reference_and_autograd_path(causal, length, queries):
    """Without autograd the prefill takes the split form (sink + selected keys gathered,
    window as a strided view, merged by log-sum-exp); it must equal the reference and the
    single-softmax form that autograd uses, also with GQA and a partial last block, with
    either query selection."""
    q, k, v = random_qkv(lq=length, dim=16)
    options = dict(topk=16, block_q=8, block_k=4, sink=3, window=12, queries=queries)
    fast = subq.attention(q, k, v, method="hip", causal=causal, **options)
    ref = subq.reference(q, k, v, method="hip", causal=causal, **options)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    differentiable = subq.attention(*leaves, method="hip", causal=causal, **options)
    assert rel_rms(ref, fast) <= 1e-12
    assert rel_rms(differentiable.detach(), fast) <= 1e-12


def test_block_queries_are_the_papers_reading():
    """``queries="block"`` scores a causal block with its own queries over keys
    ``< s + b_q - w``: a later query of the block changes an earlier row's keys (the paper's
    leak), which ``"prefix"`` never does; with padding it still equals its reference."""
    options = dict(topk=4, block_q=8, block_k=2, sink=1, window=4, query_stride=1)
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=1, lq=96, dim=8)
    later = q.clone()
    later[:, :, 47] = 10 * torch.randn_like(later[:, :, 47])  # the last query of block 5
    for queries, leaks in (("block", True), ("prefix", False)):
        a, b = (subq.weights(x, k, method="hip", causal=True, queries=queries, **options)
                for x in (q, later))
        changed = ((a != 0) != (b != 0))[:, :, :47].any()  # rows before the changed query
        assert bool(changed) == leaks, queries
    mask = torch.zeros(1, 96, dtype=torch.bool)
    mask[0, :13] = True
    out = subq.attention(q, k, v, method="hip", causal=True, queries="block",
                         key_padding_mask=mask, **options)
    ref = subq.reference(q, k, v, method="hip", causal=True, queries="block",
                         key_padding_mask=mask, **options)
    assert rel_rms(ref, out) <= 1e-12


@pytest.mark.parametrize("length", [37, 61, 150])
@pytest.mark.parametrize("causal", [True, False])
def test_key_budget_per_row(causal, length):
    """Row ``i = s + r`` of the block starting at ``s`` sees at most ``sink + topk + w + r + 1``
    keys (causal) or ``sink + topk + 2w + b_q`` (non-causal), and the causal bound is reached:
    the budget docs/mechanisms/hip.md states, at lengths no block size divides."""
    options = dict(topk=8, block_q=4, block_k=2, sink=2, window=6, query_stride=2)
    q, k, _ = random_qkv(batch=2, q_heads=2, kv_heads=1, lq=length, dim=8)
    support = (subq.weights(q, k, method="hip", causal=causal, **options) != 0).sum(-1)
    i = torch.arange(length)
    r = i % options["block_q"]
    far = options["sink"] + options["topk"]
    bound = (far + options["window"] + r + 1 if causal
             else torch.full_like(i, far + 2 * options["window"] + options["block_q"]))
    assert (support <= bound).all()
    if causal:
        assert (support == bound)[..., length // 2:].any()


def test_sparse_when_budget_is_small():
    q, k, v = random_qkv(lq=300, dim=16)
    options = dict(topk=16, block_q=8, block_k=4, sink=2, window=8)
    a = subq.weights(q, k, method="hip", causal=True, **options)
    seen = (a[:, :, -1] > 0).sum(-1)
    assert seen.max() <= 2 + 16 + 8 + 8  # sink + selected + window + own block
    assert rel_rms(subq.attention(q, k, v, method="dense", causal=True),
                   subq.attention(q, k, v, method="hip", causal=True, **options)) > 1e-3


def _planted_peak(length, dim, centre, width, generator):
    """Keys with a smooth score profile around ``centre`` for the query ``u`` (locality)."""
    u = torch.randn(dim, dtype=torch.float64, generator=generator)
    u = u / u.norm()
    j = torch.arange(length, dtype=torch.float64)
    profile = 8.0 * torch.exp(-0.5 * ((j - centre) / width) ** 2)
    keys = 0.05 * torch.randn(length, dim, dtype=torch.float64, generator=generator)
    return u, keys + profile[:, None] * u


def test_planted_peak_is_found():
    generator = torch.Generator().manual_seed(7)
    length, dim, block_k, n_nodes = 4096, 16, 2, 8
    for centre in (100, 1777, 3000, 4090):
        u, keys = _planted_peak(length, dim, centre, width=40.0, generator=generator)
        blocks, valid = search_blocks(
            u[None, None], torch.ones(1, 1, dtype=torch.bool), keys,
            torch.zeros(1, dtype=torch.long), torch.tensor([length]), length,
            n_nodes=n_nodes, block_k=block_k, representative="center")
        assert centre // block_k in blocks[0][valid[0]].tolist()


def test_recall_beats_random_blocks():
    """Keys follow a slow random walk (locality); HiP recalls more of each query's true top
    blocks (by max score) than the same number of random blocks (Theorem 1's claim)."""
    generator = torch.Generator().manual_seed(11)
    length, dim, block_k, n_nodes, rows = 2048, 16, 2, 16, 32
    steps = torch.randn(length, dim, dtype=torch.float64, generator=generator)
    keys = torch.cumsum(steps, 0) / 8 + 0.3 * torch.randn(length, dim, dtype=torch.float64,
                                                          generator=generator)
    q_rep = torch.randn(rows, 1, dim, dtype=torch.float64, generator=generator)
    blocks, _ = search_blocks(q_rep, torch.ones(rows, 1, dtype=torch.bool), keys,
                              torch.zeros(rows, dtype=torch.long),
                              torch.full((rows,), length), length, n_nodes=n_nodes,
                              block_k=block_k, representative="center")
    block_scores = (q_rep[:, 0] @ keys.T).view(rows, -1, block_k).amax(-1)
    truth = block_scores.topk(n_nodes, dim=1).indices
    random = torch.randint(0, length // block_k, (rows, n_nodes), generator=generator)

    def recall(chosen):
        return sum(len(set(c.tolist()) & set(t.tolist())) for c, t in zip(chosen, truth,
                                                                          strict=True))

    assert recall(blocks) > 3 * recall(random)


@pytest.mark.parametrize("block_q, refresh", [(1, 1), (8, 8)])
def test_decode_equals_prefill_when_refresh_is_block_q(block_q, refresh):
    length = 90
    q, k, v = random_qkv(lq=length, q_heads=4, kv_heads=2, dim=8)
    options = dict(topk=8, block_q=block_q, block_k=2, sink=3, window=5, refresh=refresh)
    prefill = subq.attention(q, k, v, method="hip", causal=True, **options)
    state = subq.init_state("hip", batch=2, kv_heads=2, head_dim=8, dtype=q.dtype, **options)
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="hip", **options)
        assert rel_rms(prefill[:, :, t:t + 1], out_t) <= 1e-10, f"step {t}"


def test_decode_with_stale_masks_stays_causal():
    """refresh > block_q: masks are reused between refreshes, yet a step depends only on the
    tokens before it: changing later keys and values leaves earlier steps unchanged."""
    length = 80
    q, k, v = random_qkv(lq=length, q_heads=2, kv_heads=2, dim=8)
    options = dict(topk=8, block_q=1, block_k=2, sink=2, window=4, refresh=4)
    state = subq.init_state("hip", batch=2, kv_heads=2, head_dim=8, dtype=q.dtype, **options)
    outs = []
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="hip", **options)
        outs.append(out_t)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 50:], v2[:, :, 50:] = torch.randn_like(k2[:, :, 50:]), torch.randn_like(
        v2[:, :, 50:])
    state = subq.init_state("hip", batch=2, kv_heads=2, head_dim=8, dtype=q.dtype, **options)
    for t in range(50):
        out_t, state = subq.step(q[:, :, t:t + 1], k2[:, :, t:t + 1], v2[:, :, t:t + 1], state,
                                 method="hip", **options)
        assert rel_rms(outs[t], out_t) <= 1e-12


def test_decode_with_stale_masks_equals_masked_softmax():
    """refresh > block_q (masks reused between refreshes), GQA, past the cache's first growth
    (256 tokens): every step equals a dense masked softmax over the sink, the loop reference's
    selection at the last refresh ``s`` (representatives ``q_{s - r b_sq}``, keys
    ``< s - w``) and the window ``[s - w, t]``."""
    length, refresh, stride, window, sink = 270, 5, 2, 6, 3
    options = dict(topk=8, block_q=4, block_k=2, query_stride=stride, sink=sink, window=window,
                   refresh=refresh)
    q, k, v = random_qkv(batch=1, q_heads=4, kv_heads=2, lq=length, dim=8, value_dim=6)
    state = subq.init_state("hip", batch=1, kv_heads=2, head_dim=8, value_dim=6,
                            dtype=q.dtype, **options)
    j = torch.arange(length)
    for t in range(length):
        out_t, state = subq.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                 method="hip", **options)
        s = t - t % refresh
        if t == s:
            reps = s - torch.arange(2) * stride
            end = max(0, s - window)
            chosen = search_blocks_loop(
                q[0, :, reps.clamp(min=0)], (reps >= 0).expand(4, -1), k[0].repeat_interleave(
                    2, dim=0).reshape(-1, 8), torch.arange(4) * length, torch.full((4,), end),
                n_nodes=4, block_k=2, representative="center")
            selected = torch.zeros(4, length, dtype=torch.bool)
            for h, blocks in enumerate(chosen):
                for b in blocks:
                    selected[h, 2 * b:2 * b + 2] = True
            selected &= j < end
        allowed = (selected | (j < sink) | (j >= s - window)) & (j <= t)
        expected = masked_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                    allowed[None, :, None, :t + 1], 8 ** -0.5)
        assert rel_rms(expected, out_t) <= 1e-12, f"step {t}"


def test_prefix_consistent_with_large_query_blocks():
    """block_q > 1 in causal prefill: the mask of a block comes from queries <= its first
    query, so changing later tokens leaves every earlier output bit-identical."""
    q, k, v = random_qkv(lq=256, dim=8)
    options = dict(topk=8, block_q=16, block_k=2, sink=2, window=4)
    out = subq.attention(q, k, v, method="hip", causal=True, **options)
    for cut in (37, 128, 200):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, cut:] = torch.randn_like(x[:, :, cut:])
        again = subq.attention(q2, k2, v2, method="hip", causal=True, **options)
        assert rel_rms(out[:, :, :cut], again[:, :, :cut]) <= 1e-12
        assert rel_rms(out[:, :, cut:], again[:, :, cut:]) > 1e-3
