"""add_ntk_attention: the patched model equals the frozen one at start; only prefixes train."""

from __future__ import annotations

import torch

from subq.nn.dit import DiTBlock
from subq.nn.ntk import add_ntk_attention


def _model():
    blocks = torch.nn.ModuleList([DiTBlock(48, heads=6) for _ in range(2)])
    for block in blocks:  # leave adaLN-Zero's identity start so attention matters
        torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.1)
    return blocks


def _run(blocks, x, c):
    for block in blocks:
        x = block(x, c, 4, 4)
    return x


def test_ntk_patch_starts_as_the_frozen_model_and_trains_only_prefixes():
    blocks = _model()
    x, c = torch.randn(2, 16, 48), torch.randn(2, 48)
    before = _run(blocks, x, c)
    frozen = {n: p.detach().clone() for n, p in blocks.named_parameters()}
    prefixes = add_ntk_attention(blocks)
    assert len(prefixes) == 2
    trainable = [p for p in blocks.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * 6 * (8 * 8 + 8)
    assert torch.allclose(_run(blocks, x, c), before, atol=1e-6)

    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        (_run(blocks, x, c) - x).pow(2).mean().backward()
        optimizer.step()
    assert not torch.allclose(_run(blocks, x, c), before, atol=1e-4)
    for name, param in blocks.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} changed"
        else:
            assert name.endswith(("prefix.z", "prefix.kz")), name


def test_ntk_patch_can_keep_a_task_head_trainable():
    model = torch.nn.ModuleDict({"blocks": _model(), "head": torch.nn.Linear(48, 3)})
    add_ntk_attention(model)
    assert not any(p.requires_grad for p in model["head"].parameters())  # frozen by default
    model = torch.nn.ModuleDict({"blocks": _model(), "head": torch.nn.Linear(48, 3)})
    prefixes = add_ntk_attention(model, keep_trainable=("head.",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        n for n, _ in model.named_parameters() if n.endswith(("prefix.z", "prefix.kz"))}
    assert len(prefixes) == 2
