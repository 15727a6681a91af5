"""GroupMamba classifier: parameter counts of the released variants (spec 3.6.4), the micro
configuration end to end, distillation heads, stochastic depth and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from subq.models.groupmamba import VARIANTS, DropPath, GroupMamba, groupmamba_micro


def _ss2d(dm: int) -> int:
    """One-direction SS2D, d_state 1, ssm_ratio 1, 3x3 depthwise conv."""
    rank = math.ceil(dm / 16)
    return (dm * 2 * dm + 10 * dm + (rank + 2) * dm + dm * rank + dm + dm + dm
            + 2 * dm + dm * dm)


def _layer(c: int) -> int:
    r = c // 16
    return 2 * c + (c * r + r) + (r * c + c) + 4 * _ss2d(c // 4) + (c * c + c) + 1


def _count(stem_hidden_dim, embed_dims, mlp_ratios, depths, num_classes=1000) -> int:
    """The spec's analytic parameter count, written out component by component."""
    s = stem_hidden_dim
    total = 3 * s * 49 + 2 * s + 2 * (9 * s * s + 2 * s) + 9 * s * embed_dims[0] \
        + embed_dims[0] + 2 * embed_dims[0]
    for i, (c, ratio, depth) in enumerate(zip(embed_dims, mlp_ratios, depths, strict=True)):
        if i:
            total += 9 * embed_dims[i - 1] * c + c + 2 * c
        h = int(c * ratio)
        block = _layer(c) + 2 * c + (c * h + h) + 10 * h + (h * c + c)
        total += depth * block + 2 * c
    c = embed_dims[-1]
    h = int(c * mlp_ratios[-1])
    total += 4 * c + _layer(c) + (c * h + h) + (h * c + c)
    return total + 2 * (c * num_classes + num_classes)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    VARIANTS["micro"],
    dict(stem_hidden_dim=32, embed_dims=(64, 128, 348, 448), mlp_ratios=(8, 8, 4, 4),
         depths=(1, 1, 1, 1), num_classes=7)])
def test_analytic_count_matches_the_modules(config):
    assert _parameters(GroupMamba(**config)) == _count(**config)


@pytest.mark.parametrize("name,millions,without_dist", [
    ("tiny", 23.36, 22.91), ("small", 34.78, None), ("base", 57.15, None)])
def test_parameter_counts(name, millions, without_dist):
    count = _count(**VARIANTS[name])
    assert round(count / 1e6, 2) == millions
    if without_dist:
        c = VARIANTS[name]["embed_dims"][-1]
        assert round((count - c * 1000 - 1000) / 1e6, 2) == without_dist


def test_micro_forward_backward_and_heads():
    model = groupmamba_micro()
    x = torch.randn(2, 3, 16, 16)
    logits, dist = model(x)
    assert logits.shape == dist.shape == (2, 10)
    (logits.logsumexp(-1).sum() + dist.logsumexp(-1).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 160)
        expected = (model.head(features) + model.dist_head(features)) / 2
        assert torch.allclose(model(x), expected, rtol=0, atol=1e-6)
    plain = groupmamba_micro(distillation=False).eval()
    assert plain.dist_head is None and plain(x).shape == (2, 10)
    with pytest.raises(ValueError, match="image batch"):
        model(torch.randn(3, 16, 16))


def test_class_token_is_refined_alone():
    """The class block changes only the prepended token; the features are the class token's."""
    model = groupmamba_micro().eval()
    block = model.post_network[0]
    x = torch.randn(2, 5, 160)
    out = block(x)
    assert torch.equal(out[:, 1:], x[:, 1:])
    assert not torch.allclose(out[:, :1], x[:, :1])


def test_drop_path():
    drop = DropPath(0.25)
    x = torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert (y[~kept] == 0).all() and abs(kept.double().mean().item() - 0.75) < 0.05
    assert torch.equal(drop.eval()(x), x)


def test_initialisation():
    model = groupmamba_micro()
    layer = model.block3[1].attn
    assert torch.equal(layer.proj.bias, torch.zeros(128))
    assert 0.015 < layer.proj.weight.std().item() < 0.025
    assert layer.proj.weight.abs().max() <= 2.0
    conv = layer.mamba_g2.conv2d
    assert torch.equal(conv.bias, torch.zeros(32))
    assert 0.25 < conv.weight.std().item() < 0.7  # N(0, 2/9) for a 3x3 depthwise kernel
    dt = torch.nn.functional.softplus(layer.mamba_g2.dt_projs_bias)
    assert (dt > 0.99e-3).all() and (dt < 0.101).all()
    assert torch.equal(layer.skip_scale, torch.ones(1))
