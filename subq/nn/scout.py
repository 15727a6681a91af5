"""The SCOUT decoder block (``[scout]``, Jafari et al. 2025), as the released code builds it:

    x = x + Mixer(RMSNorm(x))        # causal sliding-window attention, or the Mamba-1 mixer
    x = x + MLP1(RMSNorm(x))         # SwiGLU
    x = x + SCOUTAttn(RMSNorm(x))    # self + segment-checkpoint attention (subq "scout")
    x = x + MLP2(RMSNorm(x))

RoPE (theta 1e6) rotates q and k of both attentions; projections have no bias. The
sliding-window mixer is the *intended* causal window (the released code's training path runs
it unmasked; specs/scout.md explains): query i sees the ``window`` keys ``i - window < j <= i``,
itself included (subq's ``local`` mechanism with ``window - 1`` keys before the query).

Decoding: ``init_state`` then ``step`` per token; the SCOUT attention keeps only checkpoint
keys/values, the window mixer the last ``window - 1`` tokens, the Mamba mixer its conv and SSM
states. Stepping through a sequence equals ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import subq

from ..ops.scout import DEFAULT_SEGMENT
from .mamba import Mamba, MambaState
from .norm import RMSNorm
from .rope import RotaryEmbedding


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (fla's ``GatedMLP``)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass
class AttentionState:
    """A mechanism's decoding state (e.g. its KV cache) and the tokens seen (RoPE offset)."""

    cache: Any
    position: int = 0


class RopeAttention(nn.Module):
    """Multi-head causal self attention by a subq mechanism, RoPE on q and k, GQA.

    ``x (B, L, d_model) -> (B, L, d_model)``; ``options`` go to ``subq.attention``.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None,
                 method: str = "dense", rope_theta: float = 1e6, **options: Any) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if d_model % heads or heads % kv_heads:
            raise ValueError(f"heads ({heads}) must divide d_model ({d_model}) and be a "
                             f"multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.method, self.options = method, options
        self.q_proj = nn.Linear(d_model, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta)

    def _qkv(self, x: torch.Tensor, offset: int) -> list[torch.Tensor]:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, h, self.head_dim).transpose(1, 2)
                   for proj, h in ((self.q_proj, self.heads), (self.k_proj, self.kv_heads),
                                   (self.v_proj, self.kv_heads)))
        return [self.rope(q, offset), self.rope(k, offset), v]

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, 0)
        return self._out(subq.attention(q, k, v, method=self.method, causal=True,
                                        **self.options))

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> AttentionState:
        return AttentionState(subq.init_state(self.method, batch=batch, kv_heads=self.kv_heads,
                                              head_dim=self.head_dim, dtype=dtype,
                                              device=device, **self.options))

    def step(self, x_t: torch.Tensor, state: AttentionState
             ) -> tuple[torch.Tensor, AttentionState]:
        """``x_t (B, d_model)`` -> ``(out_t (B, d_model), new state)``."""
        q, k, v = self._qkv(x_t[:, None], state.position)
        y, cache = subq.step(q, k, v, state.cache, method=self.method, **self.options)
        return self._out(y)[:, 0], AttentionState(cache, state.position + 1)


@dataclass
class ScoutBlockState:
    mixer: AttentionState | MambaState
    attention: AttentionState


class ScoutBlock(nn.Module):
    """One SCOUT block ``(B, L, d_model) -> (B, L, d_model)``.

    Args:
        d_model, heads, kv_heads: widths; ``kv_heads`` defaults to ``heads``.
        mlp_hidden: SwiGLU hidden width (default ``round(8/3 * d_model)``).
        mixer: ``"swa"`` (causal sliding-window attention) or ``"mamba"``.
        window: keys each query sees in the window mixer, itself included (1024).
        segment: SCOUT's segment length S (10).
        rope_theta: RoPE base (1e6).
        mamba: keyword arguments of :class:`subq.nn.mamba.Mamba`.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None,
                 mlp_hidden: int | None = None, mixer: str = "swa", window: int = 1024,
                 segment: int = DEFAULT_SEGMENT, rope_theta: float = 1e6,
                 mamba: dict[str, Any] | None = None) -> None:
        super().__init__()
        if mixer not in ("swa", "mamba"):
            raise ValueError(f"mixer must be 'swa' or 'mamba', got {mixer!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        hidden = round(8 * d_model / 3) if mlp_hidden is None else mlp_hidden
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(4))
        self.mixer = (Mamba(d_model, **(mamba or {})) if mixer == "mamba" else
                      RopeAttention(d_model, heads, kv_heads, "local", rope_theta,
                                    window=window - 1))
        self.mlp1 = SwiGLU(d_model, hidden)
        self.attention = RopeAttention(d_model, heads, kv_heads, "scout", rope_theta,
                                       segment=segment)
        self.mlp2 = SwiGLU(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norms[0](x))
        x = x + self.mlp1(self.norms[1](x))
        x = x + self.attention(self.norms[2](x))
        return x + self.mlp2(self.norms[3](x))

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> ScoutBlockState:
        return ScoutBlockState(self.mixer.init_state(batch, dtype, device),
                               self.attention.init_state(batch, dtype, device))

    def step(self, x_t: torch.Tensor, state: ScoutBlockState
             ) -> tuple[torch.Tensor, ScoutBlockState]:
        """One token ``x_t (B, d_model)`` -> ``(out_t (B, d_model), new state)``."""
        mixed, mixer_state = self.mixer.step(self.norms[0](x_t), state.mixer)
        x_t = x_t + mixed
        x_t = x_t + self.mlp1(self.norms[1](x_t))
        attended, attention_state = self.attention.step(self.norms[2](x_t), state.attention)
        x_t = x_t + attended
        return x_t + self.mlp2(self.norms[3](x_t)), ScoutBlockState(mixer_state,
                                                                    attention_state)
