"""The public entry: :func:`attention` and its siblings check their input once, here, and
dispatch to a mechanism's callables. Mechanisms in ``subq.ops`` may assume checked input.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import registry
from .padded_rows import RowStates
from .registry import Mechanism, Pattern


@dataclass(frozen=True)
class _Call:
    mechanism: Mechanism
    pattern: Pattern
    scale: float
    options: dict[str, Any]


def _check_tensor(name: str, x: Any, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    """Check SDPA's layout: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
    Hq % Hkv == 0."""
    _check_tensor("q", q, "(B, Hq, Lq, D)")
    _check_tensor("k", k, "(B, Hkv, Lk, D)")
    named = [("k", k)]
    if v is not None:
        _check_tensor("v", v, "(B, Hkv, Lk, Dv)")
        named.append(("v", v))
    for name, x in named:
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch {x.shape[0]} but q has batch {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {q.shape[-1]}; they must match")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q's heads ({q.shape[1]}) must be a multiple of k's heads ({k.shape[1]}) "
            "for grouped-query attention"
        )
    if v is not None:
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v has {v.shape[1]} heads but k has {k.shape[1]}; they must match")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"v has length {v.shape[2]} but k has {k.shape[2]}; they must match")


def _resolve_pattern(mech: Mechanism, lq: int, lk: int, causal: Any, cross: Any) -> Pattern:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if cross is None:
        cross = lq != lk
    elif not isinstance(cross, bool):
        raise ValueError(f"cross must be a bool or None, got {cross!r}")
    elif not cross and lq != lk:
        raise ValueError(
            f"cross=False (self attention) needs Lq == Lk, got Lq={lq}, Lk={lk}; "
            "pass cross=True or cross=None for cross attention"
        )
    pattern = Pattern.of(causal, cross)
    if pattern not in mech.patterns:
        supported = ", ".join(p.value for p in Pattern if p in mech.patterns)
        raise NotImplementedError(
            f"mechanism {mech.name!r} does not support the {pattern.value} pattern "
            f"(causal={causal}, cross={cross}); it supports: {supported}"
        )
    return pattern


def _resolve_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    return float(scale)


def _check_key_padding_mask(mask: Any, k: torch.Tensor) -> None:
    if mask is None:
        return
    expected = (k.shape[0], k.shape[2])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (B, Lk)={expected} "
            "with True marking padding keys to ignore"
        )
    if tuple(mask.shape) != expected:
        raise ValueError(f"key_padding_mask must have shape (B, Lk)={expected}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")


def _prepare(method: str, q, k, v, causal, cross, scale, key_padding_mask, options) -> _Call:
    mech = registry.get(method)
    check_qkv(q, k, v)
    pattern = _resolve_pattern(mech, q.shape[2], k.shape[2], causal, cross)
    _check_key_padding_mask(key_padding_mask, k)
    return _Call(mech, pattern, _resolve_scale(scale, q.shape[-1]), mech.resolve_options(options))


def _is_empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No batch, no query or no key: the output is known without calling the mechanism."""
    return q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0


def neutralise_padding(x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``x (B, H, Lk, ·)`` with the padded positions set to 0, so that whatever a padded key or
    value holds (garbage, inf, NaN) never reaches an output: a masked score is -inf, but
    ``0 * NaN`` is NaN in every product that still touches the padded entry (feature maps,
    FFTs, scans, the value sums of linear forms). The gradient at padded positions is 0."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def _run(which: str, method, q, k, v, causal, cross, scale, key_padding_mask, options
         ) -> torch.Tensor:
    """Check, then call the mechanism's fast path (``which="fn"``) or its reference. An empty
    batch or length gives an empty output; no keys at all: every query sees nothing and
    outputs zeros. Padded keys and values are zeroed first (:func:`neutralise_padding`)."""
    call = _prepare(method, q, k, v, causal, cross, scale, key_padding_mask, options)
    if _is_empty(q, k):
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    k, v = neutralise_padding(k, key_padding_mask), neutralise_padding(v, key_padding_mask)
    return getattr(call.mechanism, which)(
        q, k, v, causal=call.pattern.causal, cross=call.pattern.cross, scale=call.scale,
        key_padding_mask=key_padding_mask, **call.options,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "dense",
    causal: bool = False,
    cross: bool | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attention by any registered mechanism, in PyTorch SDPA's layout.

    Args:
        q: ``(B, Hq, Lq, D)`` queries.
        k: ``(B, Hkv, Lk, D)`` keys, ``Hq % Hkv == 0`` (grouped-query attention).
        v: ``(B, Hkv, Lk, Dv)`` values.
        method: a name from :func:`subq.mechanisms` (``subq list`` prints them).
        causal: for self attention, query ``i`` sees keys ``j <= i``; for cross attention
            (CAB's causal cross) the keys are all visible and output ``i`` depends only on
            queries ``<= i``.
        cross: ``None`` means ``Lq != Lk``; ``False`` demands ``Lq == Lk``.
        scale: logit scale, ``1/sqrt(D)`` by default.
        key_padding_mask: bool ``(B, Lk)``, ``True`` marks padding keys to ignore (the
            convention of ``torch.nn.MultiheadAttention``). A query that sees no key outputs 0.
        **options: the mechanism's keyword options (``subq list`` shows them with defaults).

    Returns:
        ``(B, Hq, Lq, Dv)``, same dtype and device as ``q``.

    Raises:
        ValueError: bad shapes, dtypes, unknown methods or options, option values out of range.
        NotImplementedError: a pattern or feature the mechanism does not support.
    """
    return _run("fn", method, q, k, v, causal, cross, scale, key_padding_mask, options)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "dense",
    causal: bool = False,
    cross: bool | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The mechanism's O(Lq x Lk) reference computation, with :func:`attention`'s arguments."""
    return _run("reference", method, q, k, v, causal, cross, scale, key_padding_mask, options)


def weights(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str = "dense",
    causal: bool = False,
    cross: bool | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The attention matrix ``A (B, Hq, Lq, Lk)`` with ``attention(...) == A @ v``."""
    call = _prepare(method, q, k, None, causal, cross, scale, key_padding_mask, options)
    if call.mechanism.weights is None:
        raise NotImplementedError(f"mechanism {method!r} has no attention matrix (weights)")
    if _is_empty(q, k):
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return call.mechanism.weights(
        q, neutralise_padding(k, key_padding_mask), causal=call.pattern.causal,
        cross=call.pattern.cross, scale=call.scale, key_padding_mask=key_padding_mask,
        **call.options,
    )


def _decoder(method: str) -> Mechanism:
    mech = registry.get(method)
    if not mech.decodes:
        decoders = [m.name for m in registry.mechanisms() if m.decodes]
        raise NotImplementedError(
            f"mechanism {method!r} does not decode token by token; these do: {decoders}"
        )
    return mech


def init_state(
    method: str,
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **options: Any,
) -> Any:
    """An empty decoding state (e.g. a KV cache) for causal self attention by ``method``."""
    mech = _decoder(method)
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    value_dim = head_dim if value_dim is None else value_dim
    if not isinstance(value_dim, int) or value_dim < 1:
        raise ValueError(f"value_dim must be a positive int, got {value_dim!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return mech.init_state(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                           value_dim=value_dim, dtype=dtype, device=device,
                           **mech.resolve_options(options))


def step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: Any,
    method: str,
    scale: float | None = None,
    **options: Any,
) -> tuple[torch.Tensor, Any]:
    """One decoding step of causal self attention.

    ``q_t (B, Hq, 1, D)``, ``k_t (B, Hkv, 1, D)``, ``v_t (B, Hkv, 1, Dv)``.

    Returns ``(out_t (B, Hq, 1, Dv), new_state)``. Stepping through a sequence equals the
    causal prefill (``attention(..., causal=True)``) at every position.
    """
    mech = _decoder(method)
    check_qkv(q_t, k_t, v_t)
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if x.shape[2] != 1:
            raise ValueError(f"{name} must hold one token (length 1), got length {x.shape[2]}")
    scale, resolved = _resolve_scale(scale, q_t.shape[-1]), mech.resolve_options(options)
    if isinstance(state, RowStates):
        return state.step(lambda q, k, v, s: mech.step(q, k, v, s, scale=scale, **resolved),
                          q_t, k_t, v_t)
    return mech.step(q_t, k_t, v_t, state, scale=scale, **resolved)


def prefill_state(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    **options: Any,
) -> Any:
    """The decoding state after the ``T`` tokens of ``q (B, Hq, T, D)``, ``k (B, Hkv, T, D)``,
    ``v (B, Hkv, T, Dv)``: what :func:`init_state` and ``T`` calls of :func:`step` give (then
    :func:`step` goes on from token ``T``). A mechanism that can build it at once does
    (``Mechanism.prefill_state``: e.g. a KV cache is the keys and values); the others step.

    ``key_padding_mask (B, T)`` (``True`` = padding, e.g. a left-padded batch of prompts):
    the padded keys never reach a later step's output, so each row decodes as its prompt
    would alone. Mechanisms whose ``prefill_state`` takes the padding (their layout has no
    absolute position) hold one state for the batch; the others (HiP, SCOUT, HAX: blocks and
    segments counted from the first token) hold one state per row, built from its real tokens
    alone (:class:`subq.padded_rows.RowStates`; :func:`step` and :func:`reorder_state` follow
    it), at the cost of a call per row and step."""
    mech = _decoder(method)
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k and v must hold the same tokens, got lengths {q.shape[2]} and "
                         f"{k.shape[2]}")
    _check_key_padding_mask(key_padding_mask, k)
    resolved = mech.resolve_options(options)
    scale = _resolve_scale(scale, q.shape[-1])
    padded = key_padding_mask is not None and bool(key_padding_mask.any())
    if padded and padding_by_rows(method):
        return RowStates.prefill(
            lambda q, k, v: prefill_state(method, q, k, v, scale=scale, **options),
            q, k, v, key_padding_mask)
    if padded:
        k, v = neutralise_padding(k, key_padding_mask), neutralise_padding(v, key_padding_mask)
        return mech.prefill_state(q, k, v, scale=scale, key_padding_mask=key_padding_mask,
                                  **resolved)
    if mech.prefill_state is not None and q.shape[2] > 0:
        return mech.prefill_state(q, k, v, scale=scale, **resolved)
    state = mech.init_state(batch=k.shape[0], kv_heads=k.shape[1], head_dim=k.shape[-1],
                            value_dim=v.shape[-1], dtype=k.dtype, device=k.device, **resolved)
    for t in range(q.shape[2]):
        _, state = mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                             scale=scale, **resolved)
    return state


def padding_by_rows(method: str) -> bool:
    """Whether a padded batch of ``method`` runs row by row (:mod:`subq.padded_rows`): it
    decodes, but its ``prefill_state`` takes no ``key_padding_mask``, because its layout counts
    positions from the first token, which padding would shift. False for a mechanism that does
    not decode (it takes padding, or refuses it, in :func:`attention` itself)."""
    mech = registry.get(method)
    return mech.decodes and (mech.prefill_state is None or "key_padding_mask" not in
                             inspect.signature(mech.prefill_state).parameters)


def reorder_state(state: Any, index: torch.Tensor) -> Any:
    """The decoding state of the batch rows ``index (B',)`` of ``state``'s batch: what beam
    search needs when it keeps, drops and duplicates sequences (transformers' cache reorder).

    A decoding state is a dataclass whose tensor fields are batch-first, except those its class
    names in ``UNBATCHED`` (e.g. HAX's shared projections and positions); each batched field is
    ``index_select``-ed along dim 0, the rest are kept. Stepping the reordered state equals
    stepping a state built from the reordered sequences. A padded batch's
    :class:`~subq.padded_rows.RowStates` reorders its rows, each a copy."""
    if not dataclasses.is_dataclass(state):
        raise ValueError(f"state must be a mechanism's decoding state (a dataclass), got "
                         f"{type(state).__name__}")
    if index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"index must be a 1-D long tensor of batch rows, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if isinstance(state, RowStates):
        return state.reorder(index, reorder_state)
    keep = getattr(state, "UNBATCHED", ())
    changes = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, torch.Tensor) and field.name not in keep:
            changes[field.name] = value.index_select(0, index.to(value.device))
    return dataclasses.replace(state, **changes)
