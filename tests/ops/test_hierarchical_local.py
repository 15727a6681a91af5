"""Scale-DiT hierarchical local attention (spec scale_dit.md, section 2.6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subq
from subq.ops import masks
from subq.ops.hierarchical_local import Layout, hierarchical_local_attention
from subq.ops.reference import masked_attention

from ..helpers import random_qkv, rel_rms


def _pooled(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    padded = F.pad(mask.float(), (0, (-mask.shape[1]) % bk, 0, (-mask.shape[0]) % bq))
    return F.max_pool2d(padded[None], (bq, bk))[0] > 0


def test_golden_mask_1k():
    layout = Layout.from_image(1024)
    assert layout.length == 4864
    mask = layout.token_mask()
    assert round(100 * mask.float().mean().item(), 2) == 24.02
    assert abs(layout.density() - mask.sum().item() / mask.numel()) < 1e-12
    blocks = layout.block_map()
    assert blocks.shape == (38, 76) and int(blocks.sum()) == 1034  # 35.80 % of 2888
    assert torch.equal(blocks, _pooled(mask, 128, 64))
    raster = Layout.from_image(1024, order="raster").block_map()
    assert round(100 * raster.float().mean().item(), 2) == 40.37


def test_golden_mask_2k_and_linear_growth():
    n, active = [], []
    for image in (1024, 2048, 4096):
        layout = Layout.from_image(image)
        blocks = layout.block_map()
        n.append(layout.length)
        active.append(int(blocks.sum()))
        if image == 2048:
            assert layout.length == 17920
            assert round(100 * layout.density(), 2) == 6.93
            assert round(100 * blocks.float().mean().item(), 2) == 11.06
    for a in range(2):  # dense would grow as N^2 (x 13.6, x 15.3); active blocks grow as N
        assert active[a + 1] / active[a] <= 1.25 * n[a + 1] / n[a]


def _small_layout(order):
    return Layout.from_image(512, text=20, window=8, radius=3, lo_radius=1, order=order)


@pytest.mark.parametrize("order", ["window_first", "hilbert", "raster"])
@pytest.mark.parametrize("blocks", [(128, 64), (16, 8)])
def test_fast_equals_dense_masked_float32(order, blocks):
    layout = _small_layout(order)
    assert layout.length == 20 + 1024 + 64
    q, k, v = random_qkv(batch=1, q_heads=4, kv_heads=2, lq=layout.length, dim=32,
                         dtype=torch.float32)
    out = hierarchical_local_attention(q, k, v, layout=layout, block_q=blocks[0],
                                       block_k=blocks[1])
    ref = masked_attention(q, k, v, layout.token_mask(), q.shape[-1] ** -0.5)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # The block map really skips work: some blocks are empty, and those are left out.
    assert not layout.block_map(*blocks).all()


def test_fast_path_batches_padding_and_gqa_like_the_reference():
    """Batch > 1, grouped heads, a value width != head width, key padding (one query's whole
    neighbourhood padded: its output is 0) through both the sliced and the gathered calls."""
    layout = _small_layout("window_first")
    n = layout.length
    q, k, v = random_qkv(batch=2, q_heads=6, kv_heads=2, lq=n, dim=16, value_dim=8)
    padding = torch.rand(2, n) < 0.3
    padding[1] = layout.token_mask()[n - 1]  # everything the last low-res token sees
    out = hierarchical_local_attention(q, k, v, layout=layout, scale=0.3,
                                       key_padding_mask=padding, block_q=32, block_k=16)
    ref = masked_attention(q, k, v, masks.with_key_padding(layout.token_mask(), padding), 0.3)
    assert rel_rms(ref, out) <= 1e-12
    assert torch.equal(out[1, :, n - 1], torch.zeros_like(out[1, :, n - 1]))


def test_block_map_matches_the_dense_mask_on_generic_layouts():
    for _ in range(4):
        width, down = int(torch.randint(3, 14, ())), int(torch.randint(1, 4, ()))
        length, text = int(torch.randint(20, 400, ())), int(torch.randint(0, 9, ()))
        layout = Layout.for_length(length, text=text, width=width, downsample=down,
                                   window=int(torch.randint(1, 6, ())),
                                   radius=int(torch.randint(0, 4, ())), lo_radius=1,
                                   order=["window_first", "hilbert", "raster"][_ % 3])
        mask = layout.token_mask()
        assert torch.equal(layout.block_map(16, 8), _pooled(mask, 16, 8))
        assert abs(layout.density() - mask.sum().item() / mask.numel()) < 1e-12


def test_permutation_equivariance():
    """Attn(PX; P M P^T) = P Attn(X; M): the window-first (or Hilbert) layout on permuted tokens
    gives the permuted output of the raster layout."""
    raster = _small_layout("raster")
    q, k, v = random_qkv(batch=1, q_heads=2, kv_heads=2, lq=raster.length, dim=16)
    expected = hierarchical_local_attention(q, k, v, layout=raster)
    for order in ("window_first", "hilbert"):
        layout = _small_layout(order)
        tokens, base = layout.tokens(), raster.tokens()
        # Position p of `layout` holds the raster token with the same kind, row and col.
        text = torch.arange(layout.length) * (tokens["kind"] == 0)
        key = tokens["kind"] * 10**6 + tokens["row"] * 1000 + tokens["col"] + text
        base_key = base["kind"] * 10**6 + base["row"] * 1000 + base["col"] + text
        perm = torch.argsort(base_key)[torch.searchsorted(base_key.sort().values, key)]
        assert sorted(perm.tolist()) == list(range(layout.length))
        assert not torch.equal(perm, torch.arange(layout.length))
        out = hierarchical_local_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm],
                                           layout=layout)
        assert rel_rms(expected[:, :, perm], out) <= 1e-12


def test_registry_layout_for_the_1k_length_is_the_1k_geometry():
    assert Layout.for_length(4864) == Layout.from_image(1024)


def test_wrong_length_raises():
    q, k, v = random_qkv(lq=30, dim=8)
    with pytest.raises(ValueError, match="layout"):
        hierarchical_local_attention(q, k, v, layout=_small_layout("raster"))


def test_causal_is_not_supported():
    q, k, v = random_qkv(lq=30, dim=8)
    with pytest.raises(NotImplementedError, match="hierarchical_local"):
        subq.attention(q, k, v, method="hierarchical_local", causal=True)
