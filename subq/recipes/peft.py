"""Parameter-efficient fine-tuning recipes.

:func:`add_ntk_attention` (NTK-Attention, ``ntk`` in DESIGN.md): every multi-head self
attention of a model (a module with ``qkv``, ``proj`` and ``heads``, e.g.
:class:`subq.nn.dit.SoftmaxAttention`) is replaced by :class:`subq.nn.ntk.NTKSelfAttention`
sharing its projections; everything else is frozen, so only ``h (d^2 + d)`` prefix numbers
per layer train. The prefixes start at zero: the patched model computes what it did before.
"""

from __future__ import annotations

from torch import nn

from ..nn.dit import SoftmaxAttention
from ..nn.ntk import NTKPrefix, NTKSelfAttention


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
