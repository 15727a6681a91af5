"""A small language model for the synthetic recall tasks: token embedding, ``n_layers``
pre-norm residual mixer blocks (``x + mixer(norm(x))``, no MLPs, as the paper's joint-recall
models), a final norm and a linear head.

Mixers (``mixer=``): ``mamba`` (Mamba-1), ``mamba+<sparse>`` (:class:`subq.nn.hax.HaxMamba`
with ``sparse`` in ``hax, lsh, ks, window, sink, dilated, window+dilated, full``) and
``dense`` (causal softmax attention, ``heads`` heads).
"""

from __future__ import annotations

import torch
from torch import nn

from ..api import attention
from ..nn.hax import SPARSE, HaxMamba
from ..nn.mamba import Mamba
from ..nn.norm import RMSNorm

MIXERS = ("mamba", "dense", *(f"mamba+{s}" for s in SPARSE))


class CausalSelfAttention(nn.Module):
    """Dense causal multi-head attention ``(B, L, d) -> (B, L, d)``."""

    def __init__(self, d_model: int, heads: int = 4) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        y = attention(q, k, v, method="dense", causal=True)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


def make_mixer(name: str, d_model: int, *, k_total: int = 16, num_hash: int = 8,
               max_length: int = 2048) -> nn.Module:
    """One mixer by name (see ``MIXERS``)."""
    if name == "mamba":
        return Mamba(d_model)
    if name == "dense":
        return CausalSelfAttention(d_model)
    if name in MIXERS:
        return HaxMamba(d_model, sparse=name.removeprefix("mamba+"), k_total=k_total,
                        num_hash=num_hash, max_length=max_length)
    raise ValueError(f"mixer must be one of {MIXERS}, got {name!r}")


class RecallLM(nn.Module):
    """``tokens (B, L) -> logits (B, L, vocab)``; ``aux_loss()`` sums the mixers' auxiliary
    losses (HAX's ranking loss) of the last forward."""

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2,
                 mixer: str = "mamba", **mixer_kwargs) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.mixers = nn.ModuleList(make_mixer(mixer, d_model, **mixer_kwargs)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            x = x + mixer(norm(x))
        return self.head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        total = self.head.weight.new_zeros(())
        for mixer in self.mixers:
            total = total + getattr(mixer, "aux_loss", 0.0)
        return total
