"""NTK-Attention's learned prefix summaries as parameters (``ntk`` in DESIGN.md; Liang et
al., "Toward Infinite-Long Prefix in Transformer").

:class:`NTKPrefix` holds ``Z (1, h, d, dv)`` and ``k (1, h, d)`` per layer (h (d dv + d)
numbers, h (d^2 + d) for dv = d), zero-initialised so that the layer starts as the frozen
model, and computes

    out = (exp(Q K^T / sqrt(d)) V + phi(Q) Z) / (exp(Q K^T / sqrt(d)) 1 + phi(Q) |k|)

through ``subq.attention(method="ntk")``. :class:`NTKSelfAttention` is a multi-head self
attention (``qkv``/``proj`` like :class:`subq.nn.dit.SoftmaxAttention`) with such a prefix;
:func:`add_ntk_attention` swaps it into a pretrained model (every multi-head self
attention with ``qkv``, ``proj`` and ``heads``, e.g. :class:`subq.nn.dit.SoftmaxAttention`),
freezing the rest, so only ``h (d^2 + d)`` prefix numbers per layer train.

Both summaries train from the first step: the released code's ``|k|`` has zero gradient at
``k = 0``, so from this initialisation only ``Z`` would learn; subq's op takes the right
derivative of ``|k|`` at 0 (:func:`subq.ops.ntk.magnitude`), so the layer starts exactly as
the frozen model and ``k`` still receives a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

import subq

from .dit import SoftmaxAttention


class NTKPrefix(nn.Module):
    """Trainable prefix summaries ``z (1, heads, head_dim, value_dim)``, ``kz (1, heads,
    head_dim)``; ``forward(q, k, v, causal=False)`` with ``q (B, heads, L, head_dim)``."""

    def __init__(self, heads: int, head_dim: int, value_dim: int | None = None) -> None:
        super().__init__()
        value_dim = head_dim if value_dim is None else value_dim
        self.z = nn.Parameter(torch.zeros(1, heads, head_dim, value_dim))
        self.kz = nn.Parameter(torch.zeros(1, heads, head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        return subq.attention(q, k, v, method="ntk", causal=causal, z=self.z.to(q.dtype),
                              kz=self.kz.to(q.dtype))


class NTKSelfAttention(SoftmaxAttention):
    """Multi-head self attention with an NTK prefix: DiT's ``qkv = Linear(D, 3D)`` and
    ``proj`` around NTK-Attention. Called as ``attn(x, H, W)`` (the grid is unused) like the
    DiT attention modules; ``causal`` for language models."""

    def __init__(self, dim: int, heads: int = 6, qkv_bias: bool = True,
                 causal: bool = False) -> None:
        super().__init__(dim, heads, qkv_bias, method="ntk")
        self.causal = causal
        self.prefix = NTKPrefix(heads, dim // heads)

    @classmethod
    def wrap(cls, attn: nn.Module, causal: bool = False) -> NTKSelfAttention:
        """An NTK attention sharing ``attn``'s ``qkv`` and ``proj`` (and ``heads``) modules."""
        new = cls(attn.qkv.in_features, attn.heads, causal=causal)
        new.qkv, new.proj = attn.qkv, attn.proj
        return new.to(attn.qkv.weight.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.prefix(q, k, v, causal=self.causal)


def add_ntk_attention(model: nn.Module, targets: tuple[type, ...] = (SoftmaxAttention,),
                      causal: bool = False, keep_trainable: tuple[str, ...] = ()
                      ) -> list[NTKPrefix]:
    """Swap every ``targets`` module of ``model`` (in place) for NTK attention, freeze all
    other parameters except those whose names start with one of ``keep_trainable`` (a task
    head a fine-tune trains, e.g. ``("head.",)``) and return the new (trainable) prefixes."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(keep_trainable) if keep_trainable else False)
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if isinstance(child, targets) and not isinstance(child, NTKSelfAttention)]
    if not swaps:
        raise ValueError(f"model has no attention module of type {targets} to patch")
    prefixes = []
    for parent, name, child in swaps:
        patched = NTKSelfAttention.wrap(child, causal=causal)
        setattr(parent, name, patched)
        prefixes.append(patched.prefix)
    return prefixes
