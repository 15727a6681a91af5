"""Scale-DiT block: the LoRA bridge acts on low-res tokens only."""

from __future__ import annotations

import torch

from subq.nn.scale_dit import ScaleDiTBlock
from subq.ops.hierarchical_local import Layout


def _block():
    block = ScaleDiTBlock(48, heads=6, rank=4)
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
