"""What a transformers mask function asks for, read without building the ``(Lq, Lk)`` mask.

transformers hands its mask hook a ``mask_function(batch, head, q_idx, kv_idx)`` (causal,
bidirectional, a causal sliding window of ``w`` keys: ``q - w < kv <= q``, chunks, packed
sequences or user overlays combined with ``and``/``or``) and, for windows and chunks,
``local_size``. subq takes causal or bidirectional attention, and a causal sliding window
through ``local``; :func:`mask_pattern` tells which one a call asks for by evaluating the
function on up to :data:`PROBE_ROWS` query rows (the first, the last and rows evenly between)
against every key, and raises ``NotImplementedError`` naming the pattern otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

PROBE_ROWS = 33


def _probe(mask_function: Callable, q_length: int, kv_length: int, q_offset: int,
           kv_offset: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(allowed (R, Lk), q positions (R, 1), kv positions (1, Lk))`` on the probe rows, or
    None when the function cannot be evaluated on index tensors."""
    rows = torch.linspace(0, max(q_length - 1, 0), min(q_length, PROBE_ROWS), device=device)
    q_idx = rows.round().long().unique()[:, None] + q_offset
    kv_idx = torch.arange(kv_length, device=device)[None, :] + kv_offset
    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        allowed = mask_function(zero, zero, q_idx, kv_idx)
    except Exception:  # a vmap-only user function: not index based
        return None
    return torch.as_tensor(allowed, device=device).expand(q_idx.shape[0], kv_length), q_idx, kv_idx


def mask_pattern(mask_function: Callable, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, local_size: int | None = None,
                 device: torch.device | str | None = None) -> tuple[str, int | None]:
    """``("causal", None)``, ``("bidirectional", None)`` or ``("window", w)`` (a causal sliding
    window of ``w`` keys, the query's own included: transformers' ``sliding_window``), else
    ``NotImplementedError`` naming what the mask asks for."""
    if mask_function is causal_mask_function:
        return "causal", None
    if mask_function is bidirectional_mask_function:
        return "bidirectional", None
    probe = _probe(mask_function, q_length, kv_length, q_offset, kv_offset, device)
    if probe is None:
        raise NotImplementedError(
            "subq attention takes causal, bidirectional or sliding-window masks; this model's "
            "mask function cannot be evaluated on index tensors (a custom, vmap-only mask)")
    allowed, q_idx, kv_idx = probe
    causal = kv_idx <= q_idx
    if local_size is not None and torch.equal(allowed, causal & (kv_idx > q_idx - local_size)):
        return "window", int(local_size)
    if torch.equal(allowed, causal):
        return "causal", None
    if bool(allowed.all()):
        return "bidirectional", None
    if local_size is not None:
        cause = (f"chunked attention (chunks of {local_size} tokens) or a sliding window of "
                 f"{local_size} combined with another mask (e.g. bidirectional windows)")
    else:
        cause = "packed sequences or an extra mask function combined with the causal one"
    raise NotImplementedError(
        f"subq attention takes causal, bidirectional or causal sliding-window masks; this "
        f"model asks for {cause}")
