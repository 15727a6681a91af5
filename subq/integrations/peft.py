"""Parameter-efficient fine-tuning of a transformers language model: NTK-Attention and the
methods its paper compares against (Liang et al., "Toward Infinite-Long Prefix in
Transformer", arXiv:2406.14036), all counted by the same code.

=======  ==========================================================  ============================
method   what trains, per chosen layer                               count per layer
=======  ==========================================================  ============================
ntk      NTK-Attention's prefix summaries ``Z (Hq, d, d)``, ``k``    ``Hq (d^2 + d)``
         ``(Hq, d)`` (:func:`~subq.integrations.transformers.add_ntk_prefixes`)
lora     LoRA (Hu et al., 2021) on ``q_proj`` and ``v_proj``, rank   ``r (in_q + out_q + in_v +
         ``r``: ``W x + (alpha / r) B A x``                          out_v)``
prefix   prefix tuning / P-Tuning v2 (Li & Liang, 2021; Liu et al.,  ``2 Hkv m d``
         2022): ``m`` learned key/value pairs per key-value head,
         visible to every query, not rotated
full     every parameter of the model                                all
=======  ==========================================================  ============================

For SmolLM2-135M (30 layers, ``Hq = 9``, ``Hkv = 3``, ``d = 64``, hidden 576): NTK trains
37,440 numbers per layer, LoRA 1,920 per unit of rank, a prefix 384 per token, so
:func:`matched_rank` gives ``r = 20`` (+2.6 %) and :func:`matched_prefix_length` ``m = 98``
(+0.5 %).

NTK-Attention and LoRA start as the stock model (their new factors are zero); a prefix cannot:
its keys take softmax mass whatever they hold. :func:`add_kv_prefixes` starts it, as Li &
Liang recommend, from the model's own keys and values of real text (``init_ids``) computed at
positions ``-m .. -1``: rotary embeddings depend on the distance only, so at step 0 the model
computes exactly what the stock model computes on the inputs with that text before them (as
with P-Tuning v2's prefix passed as a KV cache, the inputs continue after the prefix). Without
``init_ids`` the pairs start ``N(0, 1)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..nn.lora import LoRALinear
from .transformers import add_ntk_prefixes, attention_geometry, chosen_modules, patch

METHODS = ("ntk", "lora", "prefix", "full")
LORA_TARGETS = ("q_proj", "v_proj")


class KVPrefix(nn.Module):
    """Prefix tuning's learned keys ``(1, Hkv, m, d)`` and values ``(1, Hkv, m, dv)`` of one
    layer, prepended to the layer's keys and values (after RoPE) by the attention function
    of :mod:`subq.integrations.transformers`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        if keys.dim() != 4 or values.shape[:3] != keys.shape[:3] or keys.shape[0] != 1:
            raise ValueError(f"keys (1, Hkv, m, d) and values (1, Hkv, m, dv) must agree; got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        self.keys = nn.Parameter(keys.detach().clone())
        self.values = nn.Parameter(values.detach().clone())

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def ntk_count(model: nn.Module, layers: Iterable[int] | None = None) -> int:
    """Trainable numbers of :func:`add_ntk_prefixes` on ``layers``: ``Hq (d^2 + d)`` each."""
    heads, _, d = attention_geometry(model)
    return len(chosen_modules(model, layers)) * heads * (d * d + d)


def _linear(module: nn.Module, name: str) -> nn.Linear:
    layer = getattr(module, name, None)
    if isinstance(layer, LoRALinear):
        layer = layer.base
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"attention module {type(module).__name__} has no linear {name!r}; "
                         f"LoRA targets must name its projections")
    return layer


def lora_count(model: nn.Module, rank: int, layers: Iterable[int] | None = None,
               targets: Sequence[str] = LORA_TARGETS) -> int:
    """Trainable numbers of :func:`add_lora`: ``r (in + out)`` per target and layer."""
    return sum(rank * (_linear(m, t).in_features + _linear(m, t).out_features)
               for m in chosen_modules(model, layers).values() for t in targets)


def prefix_count(model: nn.Module, length: int, layers: Iterable[int] | None = None) -> int:
    """Trainable numbers of :func:`add_kv_prefixes`: ``2 Hkv m d`` per layer."""
    _, kv_heads, d = attention_geometry(model)
    return len(chosen_modules(model, layers)) * 2 * kv_heads * length * d


def matched_rank(model: nn.Module, layers: Iterable[int] | None = None,
                 targets: Sequence[str] = LORA_TARGETS) -> int:
    """The LoRA rank whose count is nearest NTK-Attention's on the same layers."""
    layers = None if layers is None else list(layers)
    return max(1, round(ntk_count(model, layers) / lora_count(model, 1, layers, targets)))


def matched_prefix_length(model: nn.Module, layers: Iterable[int] | None = None) -> int:
    """The prefix length whose count is nearest NTK-Attention's on the same layers."""
    layers = None if layers is None else list(layers)
    return max(1, round(ntk_count(model, layers) / prefix_count(model, 1, layers)))


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             layers: Iterable[int] | None = None, targets: Sequence[str] = LORA_TARGETS
             ) -> list[LoRALinear]:
    """Wrap ``targets`` of the attention of ``layers`` (all by default) in
    :class:`~subq.nn.lora.LoRALinear` of rank ``rank`` (``alpha`` defaults to ``2 rank``, the
    scaling 2 of the NTK paper's LoRA baseline, r 8 and alpha 16), in place."""
    alpha = 2.0 * rank if alpha is None else alpha
    wrapped = []
    for module in chosen_modules(model, layers).values():
        for name in targets:
            layer = LoRALinear(_linear(module, name), rank, alpha)
            setattr(module, name, layer)
            wrapped.append(layer)
    return wrapped


@torch.no_grad()
def _real_keys_and_values(model: nn.Module, init_ids: torch.Tensor
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's cached keys and values of ``init_ids (m,)`` run through the model at
    positions ``-m .. -1``, just before the inputs' ``0, 1, ...``."""
    device = next(model.parameters()).device
    positions = torch.arange(-init_ids.numel(), 0, device=device)[None]
    out = model(input_ids=init_ids.view(1, -1).to(device), position_ids=positions,
                use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers]


def add_kv_prefixes(model: nn.Module, length: int, layers: Iterable[int] | None = None,
                    init_ids: torch.Tensor | None = None) -> dict[int, KVPrefix]:
    """Prefix tuning on ``layers`` (all by default): ``length`` learned key/value pairs per
    key-value head, registered as ``kv_prefix`` on each attention module, whose attention
    becomes subq's dense attention over ``[prefix; keys]`` (every query sees the whole prefix;
    causality and padding apply to the real keys). ``init_ids (length,)``: token ids whose
    keys and values start the prefix (see the module docstring). Returns ``{layer: prefix}``."""
    if length < 1:
        raise ValueError(f"prefix length must be >= 1, got {length}")
    chosen = chosen_modules(model, layers)
    _, kv_heads, d = attention_geometry(model)
    weight = next(model.parameters())
    if init_ids is not None:
        if init_ids.dim() != 1 or init_ids.numel() != length:
            raise ValueError(f"init_ids must be ({length},) token ids, got "
                             f"{tuple(init_ids.shape)}")
        real = _real_keys_and_values(model, init_ids)
    patch(model, "dense", layers=list(chosen))
    prefixes = {}
    for i, module in chosen.items():
        if init_ids is None:
            keys = torch.randn(1, kv_heads, length, d, dtype=weight.dtype, device=weight.device)
            values = torch.randn_like(keys)
        else:
            keys, values = real[i]
        module.kv_prefix = KVPrefix(keys, values)
        prefixes[i] = module.kv_prefix
    return prefixes


def apply_peft(model: nn.Module, method: str, *, rank: int | None = None,
               alpha: float | None = None, prefix_length: int | None = None,
               layers: Iterable[int] | None = None, init_ids: torch.Tensor | None = None
               ) -> list[nn.Parameter]:
    """Freeze ``model`` and add ``method`` (one of :data:`METHODS`) on ``layers``; returns the
    parameters that train. ``rank`` (LoRA) and ``prefix_length`` (prefix) default to the
    values matched to NTK-Attention's count (:func:`matched_rank`,
    :func:`matched_prefix_length`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    layers = None if layers is None else list(layers)
    if method == "full":
        model.requires_grad_(True)
        return list(model.parameters())
    model.requires_grad_(False)
    if method == "ntk":
        new = [p for prefix in add_ntk_prefixes(model, layers).values()
               for p in prefix.parameters()]
    elif method == "lora":
        rank = matched_rank(model, layers) if rank is None else rank
        new = [p for layer in add_lora(model, rank, alpha, layers)
               for p in layer.lora_parameters()]
    else:
        length = matched_prefix_length(model, layers) if prefix_length is None else prefix_length
        new = [p for prefix in add_kv_prefixes(model, length, layers, init_ids).values()
               for p in prefix.parameters()]
    for p in new:
        p.requires_grad_(True)
    return new


def trainable_count(model: nn.Module) -> int:
    """Numbers that train (``requires_grad``), shared tensors once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
