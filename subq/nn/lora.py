"""Low-rank adaptation of a linear layer (LoRA, Hu et al., 2021, arXiv:2106.09685).

    y = W x + b + (alpha / r) * B A x,   A (r, in), B (out, r)

``W`` and ``b`` are the frozen base layer's; ``A`` starts Gaussian with standard deviation
``1 / r`` and ``B`` at zero, so the adapted layer computes what the base did until ``B`` trains.
Scale-DiT's bridge switches the low-rank term per call (``lora=False`` for the frozen path);
a PEFT fine-tune leaves it on.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B(A(x))`` where the LoRA term is switched per call."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, **factory) / rank)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor, lora: bool = True) -> torch.Tensor:
        out = self.base(x)
        if lora:
            out = out + self.scaling * (x @ self.lora_a.t()) @ self.lora_b.t()
        return out

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b]
