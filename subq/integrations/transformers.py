"""subq mechanisms inside Hugging Face transformers' attention interface.

    >>> from subq.integrations.transformers import patch
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> patch(model, "hip", layers=range(3, 30))      # layers 0-2 keep the model's attention

:func:`register` adds every registered mechanism to ``transformers.AttentionInterface`` as
``"subq_<name>"`` (and a matching entry to ``AttentionMaskInterface``), so that
``from_pretrained(..., attn_implementation="subq_local")`` or
``model.set_attn_implementation("subq_local")`` runs the whole model on it. Options come from
``model.config.subq_options`` (a dict, the mechanism's defaults where absent).
:func:`patch` swaps chosen layers only, each with its own options.

What an attention function receives (transformers 5.x, e.g. ``LlamaAttention.forward``):
``module`` (with ``is_causal``, ``layer_idx``), ``query (B, Hq, Lq, D)``, ``key``/``value``
``(B, Hkv, Lk, D)`` after RoPE and after the KV cache update (grouped-query heads as they
are: subq takes ``Hq % Hkv == 0`` directly), ``attention_mask`` as built by the mask
function registered under the same name, ``dropout``, ``scaling``; it returns the output
``(B, Lq, Hq, Dv)`` and the attention weights (``None`` here, as for ``sdpa``).

Masks. The mask function registered for ``subq_<name>`` does not build the
``(B, 1, Lq, Lk)`` mask: it returns ``None`` when no key is padding and otherwise the
``(B, Lk)`` bool padding mask (``True`` = keep, HF's convention), which the attention
function turns into subq's ``key_padding_mask`` (``True`` = ignore). A mechanism that cannot
take padding raises ``NotImplementedError`` naming ``key_padding_mask``. A causal sliding
window of ``w`` keys (transformers' ``sliding_window``, keys ``i - w < j <= i``) is run by
``dense`` as ``local(window=w - 1)``; ``local`` keeps the smaller window; other mechanisms
run while the window covers every key and are refused where it binds. Soft-capped logits
(Gemma 2) run on ``dense`` and ``local`` only. Other mask patterns (chunks, packed
sequences, extra ``or``/``and`` masks, a ready 4-D mask) raise ``NotImplementedError``
naming the pattern (:mod:`subq.integrations.hf_masks`).

Causality and the KV cache. ``Lq == Lk`` (training, scoring, the prefill of generation) is
ordinary self attention, causal if ``module.is_causal``; a non-causal ``Lq != Lk`` is cross
attention. A causal call with ``Lq < Lk`` is generation with a cache: the ``Lq`` new queries
sit at the end of the ``Lk`` keys (bottom-right aligned causality), and each is fed through
the mechanism's ``step``. Its decoding state lives on the attention module beside the
transformers cache; when it does not match the cache (the first step after a prefill, or a
new prompt), it is rebuilt by stepping through the cached keys and values with the queries
of the layer's last causal prefill (kept, detached, for that purpose), the state HiP's
search reads its representative queries from. Without a matching prefill (the cache holds
no queries) the rebuild steps with zero queries: still exact for mechanisms whose state is
a function of the keys and values alone (``dense``'s KV cache, ``local``'s window).
A left-padded batch decodes with every mechanism that decodes: ``dense``, ``local``,
``linear`` and ``ntk`` run it at once with the padding masked; ``hip``, ``scout`` and ``hax``,
whose blocks and segments count positions from the first token, run its self attention and
its decoding row by row, each row over its real tokens alone (:mod:`subq.padded_rows`), so
that each row generates what its prompt generates alone. Only the default ``DynamicCache`` is
supported. When beam search
reorders the cache's batch rows, each new row is matched to the old row it copies by its
keys' checksum and the state is reordered with :func:`subq.reorder_state`, not rebuilt.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import subq
from subq import registry
from subq.api import padding_by_rows
from subq.integrations.hf_masks import mask_pattern
from subq.integrations.softcap import softcapped_attention
from subq.nn.ntk import NTKPrefix
from subq.ops import masks
from subq.padded_rows import attention_by_rows

PREFIX = "subq_"
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")


def implementation_name(method: str) -> str:
    """The attention-interface name of a subq mechanism: ``"subq_<method>"``."""
    return PREFIX + registry.get(method).name


def register() -> list[str]:
    """Register every subq mechanism with transformers; returns the names (idempotent)."""
    names = []
    for mech in registry.mechanisms():
        name = PREFIX + mech.name
        AttentionInterface.register(name, functools.partial(attention_forward, method=mech.name))
        AttentionMaskInterface.register(name, padding_mask)
        names.append(name)
    return names


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function=causal_mask_function,
                 attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                 **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask hook for subq: ``None`` or the ``(B, Lk)`` keep mask of the keys.

    Called by ``create_causal_mask``/``create_sliding_window_causal_mask``/
    ``create_bidirectional_mask`` with the 2-D ``attention_mask`` (``True`` = real token) that
    covers the cached and the new tokens. The pattern is read by
    :func:`subq.integrations.hf_masks.mask_pattern`; for a causal sliding window of ``w``
    keys the keep mask (all ``True`` without padding) carries ``subq_window = w``. Where
    :func:`patch` left layers on the model's own attention (``config.subq_stock_attention``),
    the keep mask also carries the mask that implementation builds (``subq_stock_mask``), and
    a pattern subq cannot run is refused only when a subq layer receives it
    (``subq_refused``).
    """
    arguments = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size, **kwargs)
    stock = getattr(kwargs.get("config"), "subq_stock_attention", None)
    refused = window = None
    try:
        pattern, window = mask_pattern(mask_function, q_length, kv_length, q_offset,
                                       kv_offset, local_size, kwargs.get("device"))
    except NotImplementedError as error:
        if stock is None:
            raise
        refused = str(error)
    keep = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if keep is not None:
        keep = keep[:, kv_offset:kv_offset + kv_length]
    if window is None and stock is None:
        return None if keep is None or bool(keep.all()) else keep
    if keep is None:
        keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device"))
    keep.subq_window = window
    keep.subq_refused = refused
    if stock is not None:
        keep.subq_stock_mask = ALL_MASK_ATTENTION_FUNCTIONS[stock](**arguments)
    return keep


def _key_padding_mask(attention_mask: torch.Tensor | None, key: torch.Tensor
                      ) -> torch.Tensor | None:
    refused = getattr(attention_mask, "subq_refused", None)
    if refused is not None:
        raise NotImplementedError(refused)
    if attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())):
        return None
    if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
        raise NotImplementedError(
            "subq attention takes a 2-D padding attention_mask (batch, keys); got "
            f"{tuple(attention_mask.shape)} {attention_mask.dtype} (a ready 4-D mask or a "
            "custom mask pattern cannot be turned into subq's key_padding_mask)")
    if attention_mask.shape != (key.shape[0], key.shape[2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"(batch, keys)={(key.shape[0], key.shape[2])}")
    return ~attention_mask


def _stock_attention(module: torch.nn.Module):
    """The model's own attention function for a layer :func:`patch` did not name (None for
    the others, and when the whole model runs subq): transformers' registered implementation,
    or the ``eager_attention_forward`` of the module's modeling file."""
    if getattr(module, "subq_attention", None) is not None:
        return None
    name = getattr(getattr(module, "config", None), "subq_stock_attention", None)
    if name is None:
        return None
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward


def _method_and_options(module: torch.nn.Module, method: str) -> tuple[str, dict[str, Any]]:
    override = getattr(module, "subq_attention", None)
    if override is not None:
        return override
    return method, dict(getattr(getattr(module, "config", None), "subq_options", None) or {})


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, *, method: str,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function registered as ``"subq_<method>"`` (see the module docstring).

    ``query (B, Hq, Lq, D)``, ``key (B, Hkv, Lk, D)``, ``value (B, Hkv, Lk, Dv)`` ->
    ``((B, Lq, Hq, Dv), None)``.
    """
    stock = _stock_attention(module)
    if stock is not None:
        return stock(module, query, key, value, getattr(attention_mask, "subq_stock_mask", None),
                     dropout=dropout, scaling=scaling, **kwargs)
    method, options = _method_and_options(module, method)
    prefix = getattr(module, "ntk_prefix", None)
    if method == "ntk" and prefix is not None:
        options = {**options, "z": prefix.z.to(query.dtype), "kz": prefix.kz.to(query.dtype)}
    if kwargs.get("output_attentions"):
        warnings.warn(f"subq attention {method!r} returns no attention weights "
                      "(output_attentions=True gives None for its layers); subq.weights(q, k, "
                      "method=...) computes a mechanism's attention matrix", stacklevel=2)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"subq attention {method!r} does not take {name!r}")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    key_padding_mask = _key_padding_mask(attention_mask, key)
    lq, lk = query.shape[2], key.shape[2]
    kv_prefix = getattr(module, "kv_prefix", None)
    window = _sliding_window(module, attention_mask, kwargs.get("sliding_window"))
    softcap = kwargs.get("softcap")
    if (softcap is not None and dropout) or (
            kv_prefix is not None and (window is not None or softcap is not None)):
        raise NotImplementedError(
            f"layer {_layer(module)}: subq runs soft-capped layers without attention dropout, "
            "and sliding-window or soft-capped layers without a kv_prefix (prefix tuning)")
    if softcap is not None:
        out = _softcapped(module, method, options, query, key, value, key_padding_mask,
                          causal, scaling, softcap, window)
        return out.transpose(1, 2).contiguous(), None
    if window is not None:
        method, options = _windowed(module, method, options, window, lk)
    if kv_prefix is not None:
        if method != "dense":
            raise NotImplementedError(
                f"a layer with a kv_prefix (prefix tuning) runs on dense attention; this one "
                f"is patched with {method!r}")
        out = _dense_sdpa(query, key, value, key_padding_mask, causal, scaling, dropout,
                          prefix=kv_prefix)
    elif dropout:
        if method not in ("dense", "local") or lq != lk:
            raise NotImplementedError(
                f"subq attention {method!r} applies no attention dropout (only 'dense' and "
                f"'local' do, as SDPA); got dropout={dropout} in training: set the model "
                "config's attention dropout to 0 (attention_dropout, "
                "attention_probs_dropout_prob or attn_pdrop, by family) to train with it")
        band = None
        if method == "local":
            band = masks.window_mask(lq, lk, _local_window(options), causal, query.device)
        out = _dense_sdpa(query, key, value, key_padding_mask, causal, scaling, dropout,
                          band=band)
    elif causal and lq < lk:
        out = _decode(module, method, options, query, key, value, key_padding_mask, scaling)
    else:
        if key_padding_mask is not None and lq == lk and padding_by_rows(method):
            out = attention_by_rows(functools.partial(
                subq.attention, method=method, causal=causal, scale=scaling, **options),
                query, key, value, key_padding_mask)
        else:
            out = subq.attention(query, key, value, method=method, causal=causal,
                                 cross=lq != lk, scale=scaling,
                                 key_padding_mask=key_padding_mask, **options)
        if causal and lq == lk and registry.get(method).decodes:
            module._subq_prefill = _Prefill(query.detach(), _checksum(key))
    return out.transpose(1, 2).contiguous(), None


def _layer(module: torch.nn.Module) -> str:
    return str(getattr(module, "layer_idx", "?"))


def _local_window(options: dict[str, Any]) -> int:
    """``local``'s ``window`` in ``options`` (its default where absent)."""
    return registry.get("local").resolve_options(dict(options))["window"]


def _sliding_window(module, attention_mask, sliding_window: int | None) -> int | None:
    """The layer's causal sliding window ``w`` (keys ``q - w < j <= q``, transformers'
    ``sliding_window``): the one the model passes, checked against the one its mask asks
    for, or the mask's when the model passes none."""
    from_mask = getattr(attention_mask, "subq_window", None)
    if sliding_window is not None and from_mask is not None and sliding_window != from_mask:
        raise ValueError(f"layer {_layer(module)}: the model passes sliding_window="
                         f"{sliding_window} but its mask has a window of {from_mask} keys")
    return sliding_window if sliding_window is not None else from_mask


def _windowed(module, method: str, options: dict[str, Any], window: int, keys: int
              ) -> tuple[str, dict[str, Any]]:
    """The mechanism and options that run a layer whose keys lie in a causal sliding window
    of ``window`` keys: transformers' ``sliding_window = w`` is subq's ``local`` with
    ``window = w - 1`` (``local`` counts the keys before the query). ``dense`` runs as that
    ``local``; ``local`` keeps the smaller of its own window and the layer's; another
    mechanism runs as it is while the window covers all ``keys`` of the call, and is refused
    when it would bind."""
    if method == "dense":
        return "local", {"window": window - 1}
    if method == "local":
        return "local", {**options, "window": min(_local_window(options), window - 1)}
    if window >= keys:
        return method, options
    raise NotImplementedError(
        f"layer {_layer(module)} attends within a sliding window of {window} keys (the "
        f"config's sliding_window) and this call has {keys}; subq's {method!r} cannot be "
        "restricted to a window: 'dense' and 'local' run the window exactly (dense as "
        f"local(window={window - 1})); patch this layer with one of them or leave it out of "
        "patch(layers=...)")


def _softcapped(module, method, options, query, key, value, key_padding_mask, causal, scaling,
                softcap, window):
    """A layer that soft-caps its logits (Gemma 2's ``attn_logit_softcapping``): ``dense``
    and ``local`` run :func:`subq.integrations.softcap.softcapped_attention` over the keys
    transformers holds (its cache included, so decoding needs no subq state)."""
    if method not in ("dense", "local"):
        raise NotImplementedError(
            f"layer {_layer(module)}: this model soft-caps its attention logits "
            f"(attn_logit_softcapping={softcap}); subq applies that with 'dense' and 'local' "
            f"only, not {method!r}: patch this layer with one of them, or leave it out of "
            "patch(layers=...)")
    if method == "local":
        own = _local_window(options) + 1  # keys seen, the query's own included
        window = own if window is None else min(window, own)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return softcapped_attention(query, key, value, softcap=softcap, scale=scale, causal=causal,
                                window=window, key_padding_mask=key_padding_mask)


def _dense_sdpa(query, key, value, key_padding_mask, causal, scaling, dropout=0.0,
                prefix=None, band=None):
    """Dense attention as transformers' ``sdpa`` computes it: one
    ``F.scaled_dot_product_attention`` call with ``dropout_p``, ``is_causal`` when no mask is
    needed, else a boolean mask (bottom-right causality when ``Lq < Lk``), grouped heads
    through ``enable_gqa``; so a seeded run draws the same dropout as stock SDPA. ``prefix``
    (a ``kv_prefix`` with ``keys (1, Hkv, m, D)``, ``values (1, Hkv, m, Dv)``): those pairs
    come first and every query sees them (prefix tuning). ``band (Lq, Lk)``: keys allowed
    beside that (``local``'s window, run as SDPA with dropout draws SDPA's own)."""
    lq, lk = query.shape[2], key.shape[2]
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    if band is not None:
        mask = band if mask is None else mask & band
    if causal and lq > 1 and (mask is not None or lq != lk or prefix is not None):
        rows = torch.arange(lq, device=query.device)[:, None] + (lk - lq)
        allowed = torch.arange(lk, device=query.device)[None, :] <= rows
        mask = allowed if mask is None else mask & allowed
    if prefix is not None:
        batch = query.shape[0]
        key = torch.cat([prefix.keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix.values.to(value.dtype).expand(batch, -1, -1, -1), value],
                          dim=2)
        if mask is not None:
            seen = mask.new_ones(*mask.shape[:-1], prefix.length)
            mask = torch.cat([seen, mask], dim=-1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout,
        is_causal=causal and mask is None and lq > 1, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])


@dataclass
class _Prefill:
    """The queries of a layer's last causal prefill and a checksum of its keys."""

    queries: torch.Tensor
    checksum: torch.Tensor


@dataclass
class _DecodeRecord:
    """A mechanism's decoding state and the cached keys it has consumed (as a checksum)."""

    method: str
    state: Any
    length: int
    checksum: torch.Tensor


def _checksum(key: torch.Tensor) -> torch.Tensor:
    return key.sum(dim=2, dtype=torch.float64)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-9, atol=1e-9))


def _decode(module, method, options, query, key, value, key_padding_mask, scaling):
    if not registry.get(method).decodes:
        raise NotImplementedError(
            f"subq attention {method!r} does not decode token by token, so it cannot use the "
            "KV cache: generate with use_cache=False (every step recomputes the sequence), or "
            f"patch with one of {[m.name for m in registry.mechanisms() if m.decodes]}")
    past = key.shape[2] - query.shape[2]
    if key_padding_mask is not None and bool(key_padding_mask[:, past:].any()):
        raise NotImplementedError(
            "generation where a new token is padding: subq decodes left-padded prompts (the "
            "padding in the prefill), not padding inside the generated tokens")
    record = getattr(module, "_subq_decode", None)
    past_sum = _checksum(key[:, :, :past])
    if record is not None and record.method == method and record.length == past:
        record = _reordered(record, past_sum)
    if (record is None or record.method != method or record.length != past
            or not _same(record.checksum, past_sum)):
        prefill = getattr(module, "_subq_prefill", None)
        queries = (prefill.queries if prefill is not None and prefill.queries.shape[2] == past
                   and _same(prefill.checksum, past_sum) else None)
        padding = None if key_padding_mask is None else key_padding_mask[:, :past]
        record = _DecodeRecord(method, _replay(method, options, queries, query,
                                               key[:, :, :past], value[:, :, :past], scaling,
                                               padding), past, past_sum)
    state, outs = record.state, []
    for t in range(past, key.shape[2]):
        out_t, state = subq.step(query[:, :, t - past:t - past + 1], key[:, :, t:t + 1],
                                 value[:, :, t:t + 1], state, method, scale=scaling, **options)
        outs.append(out_t)
    module._subq_decode = _DecodeRecord(method, state, key.shape[2], _checksum(key))
    return torch.cat(outs, dim=2)


def _reordered(record: _DecodeRecord, past_sum: torch.Tensor) -> _DecodeRecord | None:
    """``record`` with its state's batch rows reordered to match the cached keys whose
    checksums are ``past_sum (B', Hkv, D)``, or None when some row matches none of the
    record's. Beam search reorders transformers' cache (``index_select`` of its batch rows:
    beams kept, dropped, duplicated) between steps; the rows are exact copies, so each new row
    finds its source by its checksum, and the state follows without a re-prefill."""
    if _same(record.checksum, past_sum):
        return record
    old = record.checksum
    if past_sum.shape[1:] != old.shape[1:]:
        return None
    match = torch.isclose(past_sum[:, None], old[None], rtol=1e-9, atol=1e-9).flatten(2).all(-1)
    if not bool(match.any(dim=1).all()):
        return None
    index = match.to(torch.int8).argmax(dim=1)
    return _DecodeRecord(record.method, subq.reorder_state(record.state, index), record.length,
                         old.index_select(0, index))


def _replay(method, options, queries, query, key, value, scaling, padding=None):
    """A decoding state that has consumed ``key``/``value`` ``(B, Hkv, T, D)``, with
    ``queries (B, Hq, T, D)`` (the prefill's) or, when None, zeros shaped like ``query``, and
    the keys' ``padding (B, T)`` (:func:`subq.prefill_state`: at once where the mechanism
    can, else step by step; a padded batch where its state takes the padding)."""
    if queries is None:
        queries = query.new_zeros(query.shape[0], query.shape[1], key.shape[2], query.shape[-1])
    return subq.prefill_state(method, queries, key, value, scale=scaling,
                              key_padding_mask=padding, **options)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's attention modules (classes named ``*Attention``) by ``layer_idx``; in a
    model whose modules carry none (ViT and other encoders), the modules that call the
    attention interface (those with an ``is_causal`` attribute), numbered in model order."""
    candidates = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    found = {m.layer_idx: m for m in candidates if isinstance(getattr(m, "layer_idx", None), int)}
    if not found:
        found = dict(enumerate(m for m in candidates if hasattr(m, "is_causal")))
    return dict(sorted(found.items()))


def patch(model: torch.nn.Module, method: str, layers: Iterable[int] | None = None,
          **options: Any) -> list[int]:
    """Run the attention of ``layers`` (all by default) through subq mechanism ``method``.

    Layers not named keep what they had: the model's own attention implementation (``sdpa``,
    ``eager``, ..., with the mask it builds) when it was not a ``subq_`` one, else that
    implementation. The model is switched to ``"subq_dense"`` and remembers its own in
    ``config.subq_stock_attention`` while some layer runs it. Options are checked now.
    Returns the patched layer indices.
    """
    mech = registry.get(method)
    mech.resolve_options(options)
    chosen = chosen_modules(model, layers)
    register()
    for module in chosen.values():
        module.subq_attention = (mech.name, dict(options))
    current = str(model.config._attn_implementation)
    if not current.startswith(PREFIX):
        model.config.subq_original_attention = current
        model.set_attn_implementation(PREFIX + "dense")
    _refresh_stock_layers(model)
    return list(chosen)


def _refresh_stock_layers(model: torch.nn.Module) -> None:
    """``config.subq_stock_attention``: the model's own implementation while some attention
    module runs it (not patched), else None (so no stock mask is built for nothing)."""
    original = getattr(model.config, "subq_original_attention", None)
    stock_left = any(getattr(m, "subq_attention", None) is None
                     for m in attention_modules(model).values())
    model.config.subq_stock_attention = original if stock_left else None


def chosen_modules(model: torch.nn.Module, layers: Iterable[int] | None = None
                   ) -> dict[int, torch.nn.Module]:
    """The attention modules of ``layers`` (all by default), ``{layer: module}`` in order;
    ``ValueError`` naming the layers that do not exist."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError("found no attention module in this model: patch() looks for "
                         "modules named *Attention with a layer_idx or an is_causal attribute "
                         "(those that call transformers' attention interface); register() "
                         "and set_attn_implementation('subq_<method>') switch the whole model")
    chosen = list(modules) if layers is None else sorted(set(layers))
    missing = [i for i in chosen if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} do not exist; the model has layers "
                         f"{min(modules)}..{max(modules)}")
    return {i: modules[i] for i in chosen}


def add_ntk_prefixes(model: torch.nn.Module, layers: Iterable[int] | None = None
                     ) -> dict[int, NTKPrefix]:
    """NTK-Attention as parameter-efficient fine-tuning of a transformers model (Liang et al.):
    the attention of ``layers`` (all by default) becomes NTK-Attention over the model's own
    ``q, k, v`` (after RoPE, grouped-query heads as they are), each layer with a trainable
    :class:`subq.nn.ntk.NTKPrefix` (``Z (1, Hq, d, d)``, ``k (1, Hq, d)``) registered on its
    attention module as ``ntk_prefix``. The prefixes start at zero, so the model computes what
    it did before (logits and greedy tokens, with the KV cache too); both summaries train from
    the first step. Freezing the rest is the caller's choice. Returns ``{layer: prefix}``."""
    modules = attention_modules(model)
    chosen = patch(model, "ntk", layers=layers)
    heads, _, head_dim = attention_geometry(model)
    prefixes = {}
    for i in chosen:
        module = modules[i]
        weight = next(module.parameters())
        module.ntk_prefix = NTKPrefix(heads, head_dim).to(weight.device)
        prefixes[i] = module.ntk_prefix
    return prefixes


def attention_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(query heads, key-value heads, head dim)`` from a transformers model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv_heads, head_dim


def unpatch(model: torch.nn.Module, layers: Iterable[int] | None = None) -> None:
    """Undo :func:`patch` on ``layers`` (all by default): they return to the model's own
    attention."""
    modules = attention_modules(model)
    for i in modules if layers is None else layers:
        modules[i].__dict__.pop("subq_attention", None)
        modules[i].__dict__.pop("_subq_decode", None)
        modules[i].__dict__.pop("_subq_prefill", None)
        modules[i]._modules.pop("ntk_prefix", None)
        modules[i]._modules.pop("kv_prefix", None)
    _refresh_stock_layers(model)


def patched_layers(model: torch.nn.Module) -> Mapping[int, tuple[str, dict[str, Any]]]:
    """``{layer: (method, options)}`` of the layers :func:`patch` swapped."""
    return {i: m.subq_attention for i, m in attention_modules(model).items()
            if getattr(m, "subq_attention", None) is not None}
