"""The Mamba-1 mixer (``[mamba]``, Gu & Dao 2023), in pure PyTorch on :mod:`subq.ops.scan`.

For ``x (B, L, d_model)``, with ``d_inner = expand * d_model``:

    x, z   = in_proj(x)                                 (two (B, L, d_inner) halves)
    x      = silu(causal depthwise conv1d(x))            (kernel d_conv, left padding)
    dt, B, C = x_proj(x)                                 (dt_rank, d_state, d_state)
    delta  = softplus(dt_proj(dt))                       (bias = inverse softplus of dt_0)
    y      = selective_scan(x, delta, A = -exp(A_log), B, C, D, gate z)
    out    = out_proj(y)

Initialisation as mamba-ssm: ``A_log[d, n] = log(n + 1)``, ``D = 1``, ``dt_proj.weight ~
U(+-dt_rank^-1/2)``, ``dt_0 ~ logUniform[dt_min, dt_max]`` floored at ``dt_init_floor``.
Decoding carries ``(conv state (B, d_inner, d_conv - 1), ssm state (B, d_inner, d_state))``;
``step`` over a sequence equals ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.scan import selective_scan, selective_scan_step


@dataclass
class MambaState:
    """The last ``d_conv - 1`` conv inputs ``(B, d_inner, d_conv - 1)`` and the SSM state
    ``(B, d_inner, d_state)``."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba(nn.Module):
    """Mamba-1 mixer ``(B, L, d_model) -> (B, L, d_model)``; defaults as mamba-ssm
    (``d_state=16, d_conv=4, expand=2, dt_rank=ceil(d_model/16)``)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False
                 ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        with torch.no_grad():
            bound = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> MambaState:
        """Zero conv and SSM states."""
        return MambaState(torch.zeros(batch, self.d_inner, self.d_conv - 1, dtype=dtype,
                                      device=device),
                          torch.zeros(batch, self.d_inner, self.d_state, dtype=dtype,
                                      device=device))

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (..., d_inner)`` -> delta before bias ``(..., d_inner)``, B, C ``(..., N)``."""
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), b, c

    def forward(self, x: torch.Tensor, state: MambaState | None = None,
                return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        """``x (B, L, d_model)``, optionally continuing from ``state``; with ``return_state``
        also the state after the last token."""
        batch, length, _ = x.shape
        if state is None:
            state = self.init_state(batch, x.dtype, x.device)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv_in = torch.cat([state.conv.to(x.dtype), xs.transpose(1, 2)], dim=-1)
        u = F.silu(self.conv1d(conv_in))  # (B, d_inner, L): the conv state is the left pad
        delta, b, c = self._ssm_inputs(u.transpose(1, 2))
        y, ssm = selective_scan(u, delta.transpose(1, 2), -torch.exp(self.A_log),
                                b.transpose(1, 2), c.transpose(1, 2), D=self.D,
                                z=z.transpose(1, 2), delta_bias=self.dt_proj.bias,
                                delta_softplus=True, return_last_state=True,
                                initial_state=state.ssm)
        out = self.out_proj(y.transpose(1, 2))
        if not return_state:
            return out
        return out, MambaState(conv_in[..., conv_in.shape[-1] - (self.d_conv - 1):], ssm)

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token ``x_t (B, d_model)`` -> ``(out_t (B, d_model), new state)``."""
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)
        window = torch.cat([state.conv.to(x_t.dtype), xs[..., None]], dim=-1)  # (B, d_inner, K)
        u = F.silu((window * self.conv1d.weight[:, 0]).sum(-1)
                   + (0 if self.conv1d.bias is None else self.conv1d.bias))
        delta, b, c = self._ssm_inputs(u)
        y, ssm = selective_scan_step(state.ssm, u, delta, -torch.exp(self.A_log), b, c,
                                     D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                     delta_softplus=True)
        return self.out_proj(y), MambaState(window[..., 1:], ssm)
