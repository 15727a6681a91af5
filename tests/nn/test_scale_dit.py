"""Scale-DiT block: the LoRA bridge acts on low-res tokens only (modulation included); RoPE over
the text / high-res / low-res ids with the NTK factor under low-res guidance; dense reference."""

from __future__ import annotations

import pytest
import torch

import subq.nn.scale_dit as scale_dit
from subq.nn.scale_dit import ScaleDiTBlock, scale_dit_positions
from subq.ops.hierarchical_local import Layout

from .test_rope import hand_rope

GUIDED = dict(text=5, hi_count=64, hi_width=8, lo_count=16, lo_width=4, window=4, radius=2,
              lo_window=2)


def _block(**kwargs):
    block = ScaleDiTBlock(48, heads=4, rank=4, **kwargs)  # head dim 12: RoPE split 4 / 4 / 4
    with torch.no_grad():
        block.adaLN_modulation[1].weight.normal_(std=0.1)  # leave the identity start
        for p in block.lora_parameters():
            p.normal_(std=0.2)  # a trained-looking, non-zero bridge
    return block


def _without_lora(block):
    with torch.no_grad():
        for p in block.lora_parameters():
            p.zero_()
    return block


def test_lora_changes_nothing_without_low_res_tokens():
    block = _block()
    layout = Layout(text=5, hi_count=64, hi_width=8, lo_count=0, lo_width=2, window=4,
                    radius=2, lo_window=1)
    text, hi, lo = torch.randn(2, 5, 48), torch.randn(2, 64, 48), torch.randn(2, 0, 48)
    c, c_lo = torch.randn(2, 48), torch.randn(2, 48)
    with_lora = block(text, hi, lo, c, c_lo, layout)
    base = _without_lora(block)(text, hi, lo, c, c_lo, layout)
    assert torch.equal(with_lora[0], base[0]) and torch.equal(with_lora[1], base[1])


def test_lora_changes_low_res_outputs():
    block = _block()
    layout = Layout(text=5, hi_count=64, hi_width=8, lo_count=16, lo_width=4, window=4,
                    radius=2, lo_window=2)
    text, hi, lo = torch.randn(2, 5, 48), torch.randn(2, 64, 48), torch.randn(2, 16, 48)
    c, c_lo = torch.randn(2, 48), torch.randn(2, 48)
    with_lora = block(text, hi, lo, c, c_lo, layout)
    base = _without_lora(block)(text, hi, lo, c, c_lo, layout)
    assert (with_lora[2] - base[2]).abs().max() > 1e-3
    assert torch.equal(with_lora[0], base[0])  # text does not see low-res tokens
    # Separate modulation: the same low-res tokens under another c_lo give other outputs.
    other = block(text, hi, lo, c, torch.randn(2, 48), layout)
    assert (other[2] - base[2]).abs().max() > 1e-3


def _inputs(layout, dtype=torch.float32):
    return (torch.randn(2, layout.text, 48, dtype=dtype), torch.randn(2, layout.hi_count, 48,
            dtype=dtype), torch.randn(2, layout.lo_count, 48, dtype=dtype),
            torch.randn(2, 48, dtype=dtype), torch.randn(2, 48, dtype=dtype))


def _capture(monkeypatch):
    """Record the (q, k, v) the block hands to the attention kernel."""
    seen = []
    real = scale_dit.hierarchical_local_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(scale_dit, "hierarchical_local_attention", spy)
    return seen


def _raster_ids(layout, factor):
    """The ids written out for a raster layout: text (0,0,0), high-res (0,i,j), low-res
    (0, factor i, factor j)."""
    return ([(0, 0, 0)] * layout.text
            + [(0, p // layout.hi_width, p % layout.hi_width) for p in range(layout.hi_count)]
            + [(0, factor * (p // layout.lo_width), factor * (p % layout.lo_width))
               for p in range(layout.lo_count)])


def test_positions_are_grid_ids_with_low_res_anchors():
    layout = Layout(**GUIDED)  # window-first order
    ids = scale_dit_positions(layout, factor=2)
    tokens = layout.tokens()
    assert ids.shape == (layout.length, 3) and torch.equal(ids[:, 0], torch.zeros_like(ids[:, 0]))
    assert torch.equal(ids[:5], torch.zeros(5, 3, dtype=torch.long))
    hi = slice(5, 69)
    assert torch.equal(ids[hi, 1], tokens["row"][hi]) and torch.equal(ids[hi, 2], tokens["col"][hi])
    lo = slice(69, None)
    assert torch.equal(ids[lo, 1], 2 * tokens["row"][lo])
    assert torch.equal(ids[lo, 2], 2 * tokens["col"][lo])
    raster = Layout(**{**GUIDED, "order": "raster"})
    assert scale_dit_positions(raster, factor=4).tolist() == [list(p) for p in _raster_ids(
        raster, 4)]


@pytest.mark.parametrize("guided", [False, True])
def test_block_rotates_q_and_k_with_ntk_base_only_under_guidance(monkeypatch, guided):
    layout = Layout(**{**GUIDED, "order": "raster", "lo_count": 16 if guided else 0})
    block = _block(anchor_factor=2).double()
    base = 10000.0 * 10.0 if guided else 10000.0
    assert block.rope_base(layout) == base
    text, hi, lo, c, c_lo = _inputs(layout, torch.float64)
    seen = _capture(monkeypatch)
    rotated = block(text, hi, lo, c, c_lo, layout)
    rope, block.rope = block.rope, None
    plain = block(text, hi, lo, c, c_lo, layout)
    block.rope = rope
    (q, k, v), (q0, k0, v0) = seen
    ids = _raster_ids(layout, 2)
    assert torch.allclose(q, hand_rope(q0, ids, (4, 4, 4), base), atol=1e-12)
    assert torch.allclose(k, hand_rope(k0, ids, (4, 4, 4), base), atol=1e-12)
    assert torch.equal(v, v0)
    assert torch.equal(q[:, :, :5], q0[:, :, :5])  # text ids (0, 0, 0): not rotated
    assert (rotated[1] - plain[1]).abs().max() > 1e-3  # the rotation matters
    if guided:  # the other base gives another rotation
        assert not torch.allclose(q, hand_rope(q0, ids, (4, 4, 4), 10000.0), atol=1e-6)


def _dense_reference(block, text, hi, lo, c, c_lo, layout):
    """The block written out with dense masked softmax attention and hand-written RoPE."""
    def linear(m, x, lora):
        out = x @ m.base.weight.t() + m.base.bias
        return out + m.scaling * x @ m.lora_a.t() @ m.lora_b.t() if lora else out

    def ln(x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)

    t = text.shape[1]
    groups = [(torch.cat([text, hi], 1), c, False), (lo, c_lo, True)]
    mods = [linear(block.modulation, torch.nn.functional.silu(e), on).chunk(6, -1)
            for _, e, on in groups]
    qkv = torch.cat([linear(block.qkv, ln(x) * (1 + m[1][:, None]) + m[0][:, None], on)
                     for (x, _, on), m in zip(groups, mods, strict=True)], 1)
    q, k, v = (z.unflatten(-1, (4, 12)).transpose(1, 2) for z in qkv.chunk(3, -1))
    ids = scale_dit_positions(layout, block.anchor_factor).tolist()
    q, k = (hand_rope(z, ids, (4, 4, 4), block.rope_base(layout)) for z in (q, k))
    scores = (q @ k.transpose(-1, -2)) / 12 ** 0.5
    scores = scores.masked_fill(~layout.token_mask(), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    n, outs = t + hi.shape[1], []
    for (x, _, on), m, a in zip(groups, mods, (att[:, :n], att[:, n:]), strict=True):
        x = x + m[2][:, None] * linear(block.proj, a, on)
        h = ln(x) * (1 + m[4][:, None]) + m[3][:, None]
        h = torch.nn.functional.gelu(h @ block.mlp.fc1.weight.t() + block.mlp.fc1.bias,
                                     approximate="tanh")
        outs.append(x + m[5][:, None] * linear(block.mlp_out, h, on))
    return outs[0][:, :t], outs[0][:, t:], outs[1]


@pytest.mark.parametrize("lo_count", [0, 16])
def test_block_with_rope_equals_dense_reference(lo_count):
    layout = Layout(**{**GUIDED, "lo_count": lo_count})  # window-first order
    block = _block(anchor_factor=2).double()
    inputs = _inputs(layout, torch.float64)
    got = block(*inputs, layout)
    want = _dense_reference(block, *inputs, layout)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-11, rtol=1e-11)


def _modulation_lora_only(block, zero=False):
    with torch.no_grad():
        for p in block.lora_parameters():
            p.zero_()
        if not zero:
            block.modulation.lora_a.normal_(std=0.5)
            block.modulation.lora_b.normal_(std=0.5)
    return block


def test_modulation_lora_is_gated_to_low_res_tokens(monkeypatch):
    block = _block()
    assert block.modulation.base is block.adaLN_modulation[1]  # the base weights are shared
    assert {id(block.modulation.lora_a), id(block.modulation.lora_b)} <= set(
        map(id, block.lora_parameters()))
    seen = _capture(monkeypatch)
    for lo_count in (0, 16):
        layout = Layout(**{**GUIDED, "lo_count": lo_count})
        inputs = _inputs(layout)
        seen.clear()
        with_lora = _modulation_lora_only(block)(*inputs, layout)
        base = _modulation_lora_only(block, zero=True)(*inputs, layout)
        assert torch.equal(with_lora[0], base[0])  # text never sees low-res tokens
        n = layout.text + layout.hi_count
        for a, b in zip(*seen, strict=True):  # text and high-res q, k, v: untouched
            assert torch.equal(a[:, :, :n], b[:, :, :n])
        if lo_count == 0:  # without guidance high-res outputs are bit-identical too
            assert torch.equal(with_lora[1], base[1])
        else:
            assert (with_lora[2] - base[2]).abs().max() > 1e-3
            assert (seen[0][1][:, :, n:] - seen[1][1][:, :, n:]).abs().max() > 1e-3
