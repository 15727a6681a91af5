"""Scale-DiT's high-resolution model around a DiT (subq/models/scale_dit.py): without the
guide at the training size it is the base DiT; the hierarchical local mask keeps the
high-resolution path local; the LoRA bridge acts on the guide's tokens only (spec 2.6.6);
the positional anchors of the guide sit on the high-resolution cells they summarise
(spec 2.6.5); bad geometry is named."""

from __future__ import annotations

import pytest
import torch

from subq.models.dit import DiT, dit_config
from subq.models.scale_dit import ScaleDiT, ScaleDiTConfig
from subq.ops.token_order import inverse

F64 = torch.float64


def _base(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(dit_config("tiny")).to(F64).eval()
    for p in dit.parameters():  # adaLN-Zero starts as the identity: draw every weight
        p.data.normal_(0, 0.2)
    return dit


def _inputs(batch: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=g, dtype=F64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y, torch.zeros(batch, dtype=torch.bool)


@pytest.mark.parametrize("attention", ["softmax", "hierarchical_local"])
def test_without_the_guide_at_the_training_size_it_is_the_base_dit(attention):
    dit = _base()
    cfg = ScaleDiTConfig(resolution=28, attention=attention, radius=28)
    model = ScaleDiT.from_dit(dit, cfg).to(F64).eval()
    x, t, y, keep = _inputs(3, 28)
    torch.testing.assert_close(model(x, t, y, force_drop=keep), dit(x, t, y, force_drop=keep),
                               rtol=1e-10, atol=1e-10)


def test_only_the_lora_bridge_trains_and_it_acts_on_the_guide_only():
    dit = _base()
    model = ScaleDiT.from_dit(dit, ScaleDiTConfig(resolution=56)).to(F64).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in model.lora_parameters()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    x, t, y, keep = _inputs(2, 56)
    lo = torch.rand(2, 1, 28, 28, dtype=F64) * 2 - 1
    before_plain = model(x, t, y, force_drop=keep)
    before_guided = model(x, t, y, lo=lo, force_drop=keep)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.normal_(0, 0.3)
    torch.testing.assert_close(model(x, t, y, force_drop=keep), before_plain, rtol=0, atol=0)
    assert (model(x, t, y, lo=lo, force_drop=keep) - before_guided).abs().max() > 1e-3


def test_the_local_mask_keeps_far_pixels_out_of_the_high_res_path():
    dit = _base()  # tiny: depth 2, patch 2; at 56 a 28 x 28 token grid
    x, t, y, keep = _inputs(1, 56)
    far = x.clone()
    far[..., :2, :2] += 1.0  # token (0, 0)
    outs = {}
    for attention in ("hierarchical_local", "softmax"):
        model = ScaleDiT.from_dit(dit, ScaleDiTConfig(resolution=56, attention=attention,
                                                      radius=3)).to(F64).eval()
        outs[attention] = (model(x, t, y, force_drop=keep) - model(far, t, y, force_drop=keep)
                           ).abs()
    # two layers of radius 3 reach 6 tokens (12 pixels): pixels 40.. are out of reach
    assert outs["hierarchical_local"][..., 40:, 40:].max() == 0
    assert outs["hierarchical_local"][..., :4, :4].max() > 0
    assert outs["softmax"][..., 40:, 40:].max() > 0


def test_guide_anchors_sit_on_the_cells_they_summarise():
    model = ScaleDiT(dit_config("tiny"), ScaleDiTConfig(resolution=112, ntk_factor=10.0))
    g, big, s = 14, 56, 4
    hi = model.pos_hi_1[inverse(model.hi_order)]  # raster order
    lo = model.pos_lo_1[inverse(model.lo_order)]
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    anchors = (s * rows * big + s * cols).flatten()
    torch.testing.assert_close(lo, hi[anchors], rtol=0, atol=0)
    # the NTK factor changes the embedding only when the guide is there
    assert not torch.equal(model.pos_hi_1, model.pos_hi_0)
    interpolated = ScaleDiT(dit_config("tiny"), ScaleDiTConfig(
        resolution=112, positions="interpolate", ntk_factor=1.0))
    dit = DiT(dit_config("tiny"))
    lo = interpolated.pos_lo_1[inverse(interpolated.lo_order)]
    torch.testing.assert_close(lo, dit.pos_embed[0], rtol=0, atol=1e-6)


def test_bad_geometry_and_bases_are_named():
    base = dit_config("tiny")
    with pytest.raises(ValueError, match="resolution"):
        ScaleDiT(base, ScaleDiTConfig(resolution=42))
    with pytest.raises(ValueError, match="window"):
        ScaleDiT(base, ScaleDiTConfig(resolution=112, window=6))
    with pytest.raises(ValueError, match="attention"):
        ScaleDiT(base, ScaleDiTConfig(attention="linear"))
    with pytest.raises(ValueError, match="softmax DiT"):
        ScaleDiT(dit_config("tiny", attention="linear"))
    model = ScaleDiT(base)
    with pytest.raises(ValueError, match="lo must be"):
        model(torch.randn(1, 1, 56, 56), torch.tensor([3]), torch.tensor([1]),
              lo=torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="config differs"):
        model.load_dit(DiT(dit_config("tiny", hidden=64)))
