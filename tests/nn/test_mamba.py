"""The Mamba-1 mixer: step == forward, state continuation, causality, initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subq.nn.mamba import Mamba

from ..helpers import rel_rms


def _mixer(**kwargs):
    return Mamba(16, d_state=8, **kwargs).double()


@pytest.mark.parametrize("d_conv", [1, 4])
def test_step_equals_forward(d_conv):
    mixer = _mixer(d_conv=d_conv)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    out, final = mixer(x, return_state=True)
    state = mixer.init_state(2, torch.float64)
    for t in range(x.shape[1]):
        out_t, state = mixer.step(x[:, t], state)
        assert rel_rms(out[:, t], out_t) <= 1e-10, f"token {t}"
    assert rel_rms(final.ssm, state.ssm) <= 1e-10
    assert final.conv.shape == state.conv.shape == (2, 32, d_conv - 1)
    assert torch.allclose(final.conv, state.conv, rtol=0, atol=1e-12)


def test_forward_continues_from_state():
    mixer = _mixer()
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    whole = mixer(x)
    first, state = mixer(x[:, :11], return_state=True)
    second = mixer(x[:, 11:], state=state)
    assert rel_rms(whole, torch.cat([first, second], dim=1)) <= 1e-10


def test_causal():
    mixer = _mixer()
    x = torch.randn(1, 25, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 12:] = torch.randn(1, 13, 16, dtype=torch.float64)
    a, b = mixer(x), mixer(y)
    assert rel_rms(a[:, :12], b[:, :12]) <= 1e-14
    assert rel_rms(a[:, 12:], b[:, 12:]) > 1e-3


def test_initialisation_and_shapes():
    mixer = Mamba(64, d_state=16, expand=2, dt_min=1e-3, dt_max=0.1)
    assert mixer.d_inner == 128 and mixer.dt_rank == 4
    assert torch.allclose(torch.exp(mixer.A_log.detach()), torch.arange(1.0, 17.0).expand(128, 16))
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert torch.equal(mixer.D, torch.ones(128))
    x = torch.randn(3, 17, 64)
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert mixer.A_log.grad is not None and mixer.dt_proj.bias.grad.abs().sum() > 0
