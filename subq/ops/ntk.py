"""NTK-Attention: softmax attention plus a learned summary of an arbitrarily long prefix
(``ntk`` in DESIGN.md; Liang et al., "Toward Infinite-Long Prefix in Transformer").

A prefix ``P`` of any length m, with keys ``K_P`` and values ``V_P``, is replaced by
``Z = phi(K_P)^T V_P`` (``(d, dv)``) and ``k = phi(K_P)^T 1`` (``(d,)``), so that

    out_i = ( sum_j exp(s_ij) v_j + phi(q_i)^T Z ) / ( sum_j exp(s_ij) + phi(q_i)^T |k| ),
    s_ij  = scale * q_i . k_j,      phi(x) = ELU(x / d^(1/4)) + 1     (r = d features),

where ``j`` runs over the visible input keys (the causal mask and the key padding touch only
the input part: every query sees the whole prefix). ``Z = 0, k = 0`` is plain softmax
attention, and from that start both summaries train: the derivative of ``|k|`` at 0 is taken
as +1 (:func:`magnitude`), not torch's 0, which would leave ``k`` at 0. The max-trick
divides both terms by ``exp(M_i)`` with ``M_i = max(max_j s_ij, log(phi(q_i)^T |k|))``, which
is exact.

The input part stays quadratic in L (NTK-Attention is sub-quadratic in the prefix length m
only): the fast path walks the queries in blocks of ``_BLOCK_ROWS`` rows, so memory is
``O(rows * Lk)``, never an Lq x Lk tensor. Patterns: all four (in CAB's causal cross the
keys are all visible, so it equals noncausal cross). Decoding: a growing KV cache.

Options: ``z`` ``(B|1, Hq|1, d, dv)`` and ``kz`` ``(B|1, Hq|1, d)``; ``None`` means zero
(no prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, Mechanism, Option
from . import dense, masks
from .common import (
    accumulation_dtype,
    fused_attention_backward,
    fused_attention_with_lse,
    fused_kernel_applies,
    new_empty,
    repeat_kv,
)
from .dense import KVCache

_BLOCK_ROWS = 512


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = ELU(x / d^(1/4)) + 1`` over the last dim (size d); strictly positive."""
    return F.elu(x / x.shape[-1] ** 0.25) + 1.0


def prefix_summaries(prefix_keys: torch.Tensor, prefix_values: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z = phi(K_P)^T V_P`` ``(B, H, d, dv)`` and ``k = phi(K_P)^T 1`` ``(B, H, d)`` of an
    explicit prefix ``K_P (B, H, m, d)``, ``V_P (B, H, m, dv)``."""
    features = feature_map(prefix_keys)
    return features.transpose(-1, -2) @ prefix_values, features.sum(dim=-2)


def _check_summaries(q: torch.Tensor, dv: int, z: torch.Tensor | None,
                     kz: torch.Tensor | None) -> None:
    batch, heads, _, dim = q.shape
    for name, x, tail in (("z", z, (dim, dv)), ("kz", kz, (dim,))):
        if x is None:
            continue
        if (not isinstance(x, torch.Tensor) or x.dim() != 2 + len(tail)
                or tuple(x.shape[2:]) != tail or x.shape[0] not in (1, batch)
                or x.shape[1] not in (1, heads) or not x.is_floating_point()):
            raise ValueError(f"option {name!r} of mechanism 'ntk' must be a floating tensor of "
                             f"shape (B|1, Hq|1, {', '.join(map(str, tail))}) with B={batch}, "
                             f"Hq={heads}; got {tuple(getattr(x, 'shape', ()))}")


def _prefix_terms(q: torch.Tensor, dv: int, z: torch.Tensor | None, kz: torch.Tensor | None,
                  acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(q) Z`` ``(B, Hq, Lq, dv)`` and ``phi(q) |k|`` ``(B, Hq, Lq)`` in ``acc``."""
    features = feature_map(q.to(acc))
    num = features.new_zeros(*q.shape[:3], dv) if z is None else features @ z.to(acc)
    if kz is None:
        den = features.new_zeros(q.shape[:3])
    else:
        den = (features * magnitude(kz.to(acc))[:, :, None, :]).sum(-1)
    return num, den


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` whose derivative at ``x = 0`` is +1 rather than torch's 0. ``|x|`` has no
    derivative at 0 and any value in ``[-1, 1]`` is a subgradient; torch's 0 would freeze a
    summary ``k`` initialised to 0 (the start that makes NTK-Attention equal softmax
    attention) forever, so only ``Z`` would learn. The right derivative lets ``k`` leave 0 on
    the first step; the forward value is ``|x|`` exactly."""
    return x.abs() + (x - x.detach()) * (x == 0)


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` row-wise, 0 where nothing (no key, no prefix mass) is visible."""
    empty = den == 0
    return num / den.masked_fill(empty, 1.0)[..., None]


def ntk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  cross: bool = False, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None, z: torch.Tensor | None = None,
                  kz: torch.Tensor | None = None) -> torch.Tensor:
    """NTK-Attention, blocked over queries: ``(B, Hq, Lq, D)`` -> ``(B, Hq, Lq, Dv)``.

    ``z (B|1, Hq|1, D, Dv)``, ``kz (B|1, Hq|1, D)``: the prefix summaries (``None`` = 0).
    """
    batch, q_heads, lq, dim = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    _check_summaries(q, dv, z, kz)
    scale = dim ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    groups = q_heads // k.shape[1]
    keys = repeat_kv(k, groups).to(acc)
    values = repeat_kv(v, groups).to(acc)
    prefix_num, prefix_den = _prefix_terms(q, dv, z, kz, acc)
    if fused_kernel_applies(q, v, k, z, kz, differentiable=True):
        return _fused(q.to(acc), keys, values, causal and not cross, scale, key_padding_mask,
                      prefix_num, prefix_den).to(q.dtype)
    key_ok = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = new_empty(batch, q_heads, lq, dv, like=q)
    for start in range(0, lq, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, lq)
        scores = torch.einsum("bhid,bhjd->bhij", q[:, :, start:stop].to(acc), keys) * scale
        allowed = None
        if causal and not cross:
            allowed = masks.causal_mask(lq, lk, q.device)[start:stop][None, None]
        if key_ok is not None:
            allowed = key_ok if allowed is None else allowed & key_ok
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p_num, p_den = prefix_num[:, :, start:stop], prefix_den[:, :, start:stop]
        # The shift cancels between numerator and denominator; it only keeps exp() in range.
        shift = torch.maximum(scores.amax(dim=-1), p_den.log()).detach()
        shift = shift.masked_fill(torch.isinf(shift), 0.0)
        e = torch.exp(scores - shift[..., None])
        rescale = torch.exp(-shift)
        num = e @ values + p_num * rescale[..., None]
        den = e.sum(dim=-1) + p_den * rescale
        out[:, :, start:stop] = _divide(num, den).to(q.dtype)
    return out


def _fused(q, keys, values, causal, scale, key_padding_mask, prefix_num, prefix_den
           ) -> torch.Tensor:
    """The fused form (:class:`_FusedNTK`) with the key padding as an additive bias and the
    rows that see no key marked, for the merge."""
    bias = empty = None
    if key_padding_mask is not None:
        bias = torch.zeros(key_padding_mask.shape, dtype=keys.dtype, device=q.device
                           ).masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        seen = ~key_padding_mask
        visible = seen.cumsum(-1) if causal else seen.sum(-1, keepdim=True).expand(
            -1, q.shape[2])
        empty = (visible[:, :q.shape[2]] == 0)[:, None]
    return _FusedNTK.apply(q, keys, values, prefix_num, prefix_den, causal, scale, bias, empty)


class _FusedNTK(torch.autograd.Function):
    """NTK-Attention at the cost of dense attention, forward and backward. The input part is
    torch's fused kernel, which returns the softmax output ``o_i`` and its log-sum-exp ``l_i``
    (``o_i e^(l_i)`` is the input part's numerator, ``e^(l_i)`` its denominator), so with
    ``n_i = phi(q_i)^T Z`` and ``d_i = phi(q_i)^T |k|``

        out_i = (o_i e^(l_i) + n_i) / (e^(l_i) + d_i)

    exactly (computed with the shift ``max(l_i, log d_i)``; a row that sees no key has
    ``l_i = -inf`` and takes the prefix alone). Backward, with ``g = dL/dout`` and
    ``a_i = e^(l_i) / (e^(l_i) + d_i)``: ``dL/do = a g``, ``dL/dl = a g . (o - out)``,
    ``dL/dn = g / (e^l + d)``, ``dL/dd = -(g . out) / (e^l + d)``. The kernel's backward takes
    ``dO = a g`` and forms ``dS = P (dO V^T - rowsum(dO o))``; the log-sum-exp's gradient adds
    ``P dL/dl`` to ``dS``, and ``rowsum(dO o) - dL/dl = a g . out``: the same backward call with
    ``out`` in place of ``o`` (:func:`fused_attention_backward`). No score matrix is kept or
    formed, so time and memory are dense attention's plus O(L d dv)."""

    @staticmethod
    def forward(ctx, q, keys, values, prefix_num, prefix_den, causal, scale, bias, empty):
        o, lse = fused_attention_with_lse(q, keys, values, causal=causal, attn_mask=bias,
                                          scale=scale)
        # The kernel gives a row that sees no key o = 0, lse = 0; such a row must weigh 0.
        seen = lse if empty is None else lse.masked_fill(empty, float("-inf"))
        shift = torch.maximum(seen, prefix_den.log())
        shift = shift.masked_fill(torch.isinf(shift), 0.0)
        weight, rescale = torch.exp(seen - shift), torch.exp(-shift)
        den = weight + prefix_den * rescale
        out = _divide(o * weight[..., None] + prefix_num * rescale[..., None], den)
        ctx.save_for_backward(q, keys, values, lse, out, weight, rescale, den, bias)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, keys, values, lse, out, weight, rescale, den, bias = ctx.saved_tensors
        nothing = den == 0  # _divide's rows: out = numerator, den takes no gradient
        safe = den.masked_fill(nothing, 1.0)
        grad_o = grad * (weight / safe)[..., None]
        dq, dk, dv = fused_attention_backward(grad_o, q, keys, values, out, lse,
                                              causal=ctx.causal, attn_mask=bias,
                                              scale=ctx.scale)
        share = rescale / safe
        grad_num = grad * share[..., None]
        grad_den = (-(grad * out).sum(-1) * share).masked_fill(nothing, 0.0)
        return dq, dk, dv, grad_num, grad_den, None, None, None, None


def _allowed(lq, lk, causal, cross, key_padding_mask, device):
    base = masks.causal_mask(lq, lk, device) if causal and not cross else masks.full_mask(
        lq, lk, device)
    return masks.with_key_padding(base, key_padding_mask)


def reference(q, k, v, *, causal=False, cross=False, scale=None, key_padding_mask=None,
              z=None, kz=None):
    """The formula as written: ``(E v + phi(q) Z) / (E 1 + phi(q) |k|)`` with the explicit
    ``E = exp(scale q k^T)`` masked to 0 (no max-trick), ``(B, Hq, Lq, Lk)``."""
    _check_summaries(q, v.shape[-1], z, kz)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhid,bhjd->bhij", q.to(acc), repeat_kv(k, groups).to(acc)) * scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, cross, key_padding_mask, q.device)
    e = torch.exp(scores).masked_fill(~allowed, 0.0)
    p_num, p_den = _prefix_terms(q, v.shape[-1], z, kz, acc)
    num = e @ repeat_kv(v, groups).to(acc) + p_num
    return _divide(num, e.sum(dim=-1) + p_den).to(q.dtype)


def init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, z=None, kz=None
               ) -> KVCache:
    """Dense attention's KV cache (the prefix summaries are options, not state)."""
    return dense.init_state(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                            value_dim=value_dim, dtype=dtype, device=device)


def prefill_state(q, k, v, *, scale=None, z=None, kz=None, key_padding_mask=None) -> KVCache:
    """The cache after a prefill: its keys and values and padding."""
    return KVCache(k, v, key_padding_mask)


def step(q_t, k_t, v_t, state: KVCache, *, scale=None, z=None, kz=None
         ) -> tuple[torch.Tensor, KVCache]:
    """Append (k_t, v_t) to the cache; attend to it (but its padding) and to the prefix
    summaries."""
    state = dense.appended(state, k_t, v_t)
    out = ntk_attention(q_t, state.keys, state.values, cross=True, scale=scale,
                        key_padding_mask=state.padding, z=z, kz=kz)
    return out, state


def sample_options(q, k, v, generator):
    """Random prefix summaries whose mass is comparable to that of ``Lk`` input keys."""
    if q.dim() != 4:
        return {}  # malformed input: let the entry point report it
    batch, heads, _, dim = q.shape
    dv = v.shape[-1]
    z = torch.randn(batch, heads, dim, dv, generator=generator)
    kz = torch.randn(1, heads, dim, generator=generator) * max(k.shape[2], 1) / dim
    return {"z": z.to(q.device, q.dtype) * max(k.shape[2], 1) / dim,
            "kz": kz.to(q.device, q.dtype)}


MECHANISM = Mechanism(
    name="ntk",
    paper="ntk",
    summary="softmax attention + learned (d^2+d) summary of an infinite prefix",
    fn=ntk_attention,
    reference=reference,
    patterns=ALL_PATTERNS,
    exact=False,
    options=(
        Option("z", torch.Tensor, None,
               "prefix value summary Z = phi(K_P)^T V_P, (B|1, Hq|1, D, Dv); None: zero",
               nullable=True),
        Option("kz", torch.Tensor, None,
               "prefix key summary k = phi(K_P)^T 1, (B|1, Hq|1, D); None: zero",
               nullable=True),
    ),
    init_state=init_state,
    step=step,
    prefill_state=prefill_state,
    sample_options=sample_options,
)
