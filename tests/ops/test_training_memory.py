"""Training memory of the chunked mechanisms (issue 22): what autograd keeps for the backward
grows linearly in L and stays a small multiple of the inputs and the output, because the
backward rebuilds each chunk's intermediates instead of keeping them. Measured exactly, as the
bytes of the distinct storages the forward hands to autograd (``saved_tensors_hooks``), not
as a timing or an allocator reading."""

from __future__ import annotations

import pytest
import torch

import subq

from ..helpers import random_qkv

HEADS, DIM = 2, 16

def _rpe_bias(length: int) -> dict:
    """A learned per-head RPE bias (else kernelized RPE takes its O(L) linear path)."""
    bias = torch.randn(HEADS, 2 * length - 1, generator=torch.Generator().manual_seed(1))
    return {"bias": bias.requires_grad_()}


MECHANISMS = {"hip": lambda length: {}, "hax": lambda length: {}, "kernelized_rpe": _rpe_bias}
"""Mechanism and its options at a length: at L = 1024 HiP's key budget (sink, window, top-k
blocks) is already below L, so the sparse path is the one measured."""


def _saved_bytes(method: str, length: int, causal: bool) -> tuple[int, int]:
    """Bytes autograd keeps for the backward of one call, and the bytes of q, k, v and out."""
    q, k, v = random_qkv(1, HEADS, HEADS, length, dim=DIM, dtype=torch.float32,
                         requires_grad=True, generator=torch.Generator().manual_seed(length))
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = subq.attention(q, k, v, method=method, causal=causal, **MECHANISMS[method](length))
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, out))
    return sum(storages.values()), io_bytes


@pytest.mark.parametrize("method, causal", [
    (name, pattern.causal) for name in sorted(MECHANISMS)
    for pattern in (subq.Pattern.CAUSAL_SELF, subq.Pattern.NONCAUSAL_SELF)
    if pattern in subq.get(name).patterns])
def test_saved_for_backward_is_linear_in_length(method, causal):
    saved, io_bytes = _saved_bytes(method, 1024, causal)
    saved_2x, io_bytes_2x = _saved_bytes(method, 2048, causal)
    assert saved <= 4 * io_bytes, f"{saved / io_bytes:.1f}x the inputs and output"
    assert saved_2x <= 4 * io_bytes_2x, f"{saved_2x / io_bytes_2x:.1f}x the inputs and output"
    assert saved_2x <= 2.1 * saved, f"doubling L multiplies the saved bytes by {saved_2x / saved}"
