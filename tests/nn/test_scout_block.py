"""The SCOUT block (specs/scout.md): prefill == step-by-step decode with checkpoint-only
caches, prefix consistency through the mixers, the causal window, and RMSNorm."""

from __future__ import annotations

import pytest
import torch

from subq.nn.norm import RMSNorm
from subq.nn.scout import ScoutBlock

from ..helpers import rel_rms


def _block(mixer, **kwargs):
    return ScoutBlock(32, heads=4, kv_heads=2, mixer=mixer, window=6, segment=4,
                      mamba=dict(d_state=8), **kwargs).double()


@pytest.mark.parametrize("mixer", ["swa", "mamba"])
def test_prefill_equals_decode(mixer):
    block = _block(mixer)
    x = torch.randn(2, 31, 32, dtype=torch.float64)
    prefill = block(x)
    state = block.init_state(2, torch.float64)
    for t in range(x.shape[1]):
        out_t, state = block.step(x[:, t], state)
        assert rel_rms(prefill[:, t], out_t) <= 1e-10, f"token {t}"
        assert state.attention.cache.keys.shape[2] == (t + 1) // 4  # checkpoints only
    if mixer == "swa":
        assert state.mixer.cache.keys.shape[2] == 5  # window - 1 earlier tokens


@pytest.mark.parametrize("mixer", ["swa", "mamba"])
def test_prefix_consistency(mixer):
    block = _block(mixer)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    out = block(x)
    for cut in (1, 13, 27):
        y = x.clone()
        y[:, cut:] = torch.randn(1, 40 - cut, 32, dtype=torch.float64)
        again = block(y)
        assert rel_rms(out[:, :cut], again[:, :cut]) <= 1e-12, f"leak into prefix < {cut}"
        assert rel_rms(out[:, cut:], again[:, cut:]) > 1e-3


def test_window_mixer_sees_exactly_window_tokens():
    """Through the mixer alone, token i depends on tokens i-5..i (window 6), not on i-6."""
    block = _block("swa")
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    base = block.mixer(x)
    for j, changes in ((8, True), (7, False)):
        y = x.clone()
        y[:, j] += 1.0
        moved = (block.mixer(y)[:, 13] - base[:, 13]).abs().max()
        assert (moved > 1e-8) == changes


def test_gradients_flow_and_bad_mixer():
    block = ScoutBlock(16, heads=2, mixer="mamba", segment=3)
    block(torch.randn(2, 10, 16)).square().mean().backward()
    assert all(p.grad is not None for p in block.parameters())
    with pytest.raises(ValueError, match="mixer"):
        ScoutBlock(16, heads=2, mixer="rnn")


def test_rmsnorm():
    norm = RMSNorm(8, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = x / x.pow(2).mean(-1, keepdim=True).sqrt() * norm.weight.double()
    assert rel_rms(expected, norm(x)) <= 1e-6
    assert norm(x.bfloat16()).dtype == torch.bfloat16
