"""subq: sub-quadratic attention for PyTorch, every mechanism behind one SDPA-like contract.

    >>> import torch, subq
    >>> q = torch.randn(1, 2, 100, 16)
    >>> subq.attention(q, q, q, method="local", causal=True, window=8).shape
    torch.Size([1, 2, 100, 16])
"""

from .api import (
    attention,
    init_state,
    prefill_state,
    reference,
    reorder_state,
    step,
    weights,
)
from .registry import Mechanism, Option, Pattern, get, mechanisms

__version__ = "0.1.0"

__all__ = [
    "Mechanism",
    "Option",
    "Pattern",
    "__version__",
    "attention",
    "get",
    "init_state",
    "mechanisms",
    "prefill_state",
    "reference",
    "reorder_state",
    "step",
    "weights",
]
