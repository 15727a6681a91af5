"""Vision backbones (subq/models/vit.py): every ViT attention variant matches GroupMamba's
parameter count within 5 % at each preset, output shapes, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from subq.models.counting import num_parameters
from subq.models.vit import (
    ATTENTIONS,
    BACKBONES,
    PRESETS,
    ViT,
    ViTConfig,
    build_backbone,
    groupmamba_backbone,
    groupmamba_parameters,
    vit_config,
    vit_parameters,
)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_vit_parameters_match_groupmamba_within_5_percent(preset, attention):
    target = groupmamba_parameters(preset)
    cfg = vit_config(preset, attention)
    count = vit_parameters(cfg)
    assert abs(count - target) <= 0.05 * target, (preset, attention, count, target)
    assert cfg.dim % cfg.heads == 0


def test_groupmamba_sizes():
    """``micro`` is a few M-scale CPU model (about 1.2 M), ``tiny`` is far smaller."""
    micro, tiny = groupmamba_parameters("micro"), groupmamba_parameters("tiny")
    assert 1_000_000 < micro < 5_000_000
    assert tiny < micro / 10
    assert num_parameters(groupmamba_backbone("tiny")) == tiny  # meta count == real count


@pytest.mark.parametrize("name", BACKBONES)
def test_tiny_backbones_map_images_to_10_logits_deterministically(name):
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = build_backbone(name, "tiny").eval()
        with torch.no_grad():
            outputs.append(model(x))
    assert outputs[0].shape == (2, 10)
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(8)
    with torch.no_grad():
        other = build_backbone(name, "tiny").eval()(x)
    assert not torch.equal(outputs[0], other)


def test_vit_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ViT(ViTConfig(attention="hierarchical_local", dim=16, depth=1, heads=2, hidden=32))
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vit-nope", "tiny")
    with pytest.raises(ValueError, match="preset must be one of"):
        build_backbone("groupmamba", "huge")
    with pytest.raises(ValueError, match="attention must be one of"):
        ViT(ViTConfig(attention="nope"))


def test_padding_is_background_before_the_patches():
    """``pad`` frames the image in -1 (the normalised black): the same as a ViT of the padded
    side fed the padded image."""
    torch.manual_seed(0)
    padded = ViT(ViTConfig(attention="dense", patch=4, pad=2))
    plain = ViT(ViTConfig(attention="dense", patch=4, image=32))
    plain.load_state_dict(padded.state_dict())
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    framed = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    torch.testing.assert_close(padded(x), plain(framed))
    assert padded.cfg.grid == 8
    assert not torch.allclose(padded(x), plain(torch.nn.functional.pad(x, (2, 2, 2, 2))))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_micro_vits_run_on_an_even_grid(attention):
    cfg = vit_config("micro", attention)
    assert cfg.grid == 8 and cfg.grid % 2 == 0  # hierarchical_local pools 2 x 2
    assert ViT(cfg)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
