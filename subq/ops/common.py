"""Small helpers the mechanisms share: grouped-query head expansion, accumulation dtype,
a masked softmax that is safe on rows with no visible key, and output allocation that tests
can poison with NaN so that an unwritten element cannot pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison_outputs = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this context :func:`new_empty` fills its buffers with NaN (a test aid)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous


def new_empty(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty`` on ``like``'s device; NaN-filled under :func:`poison_outputs`."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and half precision accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D): key/value head h serves query heads
    h * groups ... (h + 1) * groups - 1, as in grouped-query attention."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)


def fused_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             causal: bool = False, attn_mask: torch.Tensor | None = None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash kernel, ``softmax(scale q k^T + attn_mask) v`` and its log-sum-exp
    for ``(Z, G, L, D)`` inputs (no gradient through the log-sum-exp). The kernel reads the
    last dim as contiguous whatever its stride (torch 2.13), so a strided last dim is copied
    first; other views (permuted, expanded) it reads correctly."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)[:2]
    return out, lse


def fused_kernel_applies(q: torch.Tensor, v: torch.Tensor, *others: torch.Tensor | None,
                         differentiable: bool = False) -> bool:
    """Whether :func:`fused_attention_with_lse` may serve a call: CPU, equal query and value
    head dims (the kernel's constraint), not under ``torch.compile``, and no gradient to carry
    through any of the tensors (its log-sum-exp has none) unless the caller is
    ``differentiable`` (it brings its own backward, e.g. through
    :func:`fused_attention_backward`)."""
    tensors = [x for x in (q, v, *others) if x is not None]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return (q.device.type == "cpu" and q.shape[-1] == v.shape[-1]
            and (differentiable or not needs_grad) and not torch.compiler.is_compiling())


def fused_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                             causal: bool = False, attn_mask: torch.Tensor | None = None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's CPU flash backward of :func:`fused_attention_with_lse`: ``(dq, dk, dv)`` from
    ``grad_out`` and the forward's ``lse``. The kernel recomputes ``P = exp(S - lse)`` and
    forms ``dS = P (dO V^T - rowsum(dO o))`` with ``o = out``, so passing another ``out``
    shifts the row term; that is how a caller adds a gradient reaching the log-sum-exp
    (``dS += P g_lse`` is ``rowsum(dO out') = rowsum(dO o) - g_lse``)."""
    tensors = (grad_out, q, k, v, out)
    grad_out, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in tensors)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=attn_mask, scale=scale)


def merge_weights(lses: list[torch.Tensor]) -> list[torch.Tensor]:
    """Weights that merge softmaxes over disjoint key groups into their joint softmax:
    ``w_g = exp(lse_g - logsumexp_g lse_g)``, so ``out = sum_g w_g out_g`` exactly, where
    ``out_g`` and ``lse_g`` are group g's softmax output and log-sum-exp (equal shapes; a group
    a row does not see has ``lse = -inf`` and weight 0)."""
    total = torch.stack(lses).logsumexp(dim=0)
    return [torch.exp(lse - total) for lse in lses]


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed``; rows with nothing allowed are 0.

    Unlike ``softmax(scores.masked_fill(~allowed, -inf))`` this gives zeros, not NaN, on
    empty rows, in the forward and the backward pass.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty_row = ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty_row, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)


def step_padding(padding: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """A decoding cache's key-padding mask ``(B, N)`` (``True`` = padding, from a padded
    prefill; None: none) after a step appended one real key, kept to the cache's last
    ``keys`` columns."""
    if padding is None:
        return None
    padding = torch.cat([padding, padding.new_zeros(padding.shape[0], 1)], dim=1)
    return padding[:, padding.shape[1] - keys:]


def visible_keys(padding: torch.Tensor | None, keys: int, device) -> torch.Tensor:
    """``(B | 1, 1, 1, keys)`` bool: the cached keys a decoding query may attend to."""
    if padding is None:
        return torch.ones(1, 1, 1, keys, dtype=torch.bool, device=device)
    return ~padding[:, None, None, :]
