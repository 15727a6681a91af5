"""The sparse baseline patterns of Combiner's comparison (subq/ops/masks.py): Sparse
Transformer's fixed pattern and causal row-major axial attention, against loops."""

from __future__ import annotations

import pytest
import torch

from subq.ops.masks import axial_sparse_mask, causal_mask, fixed_sparse_mask


def _fixed_loop(length: int, span: int, summary: int) -> torch.Tensor:
    out = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            out[i, j] = j // span == i // span or j % span >= span - summary
    return out


def _axial_loop(length: int, span: int) -> torch.Tensor:
    out = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        row, col = divmod(i, span)
        for j in range(i + 1):
            out[i, j] = j // span == row or j % span == col
    return out


@pytest.mark.parametrize("length,span,summary", [(37, 5, 1), (32, 8, 3), (10, 16, 2)])
def test_fixed_equals_loop(length, span, summary):
    assert torch.equal(fixed_sparse_mask(length, span, summary), _fixed_loop(length, span,
                                                                            summary))


@pytest.mark.parametrize("length,span", [(37, 5), (32, 8), (10, 16)])
def test_axial_equals_loop(length, span):
    assert torch.equal(axial_sparse_mask(length, span), _axial_loop(length, span))


def test_worked_example_and_reductions():
    # span 4, query 9 (row 2, column 1): fixed sees 8, 9 and the span ends 3, 7; axial sees
    # 8, 9 and the column keys 1, 5
    assert fixed_sparse_mask(12, 4, 1)[9].nonzero().flatten().tolist() == [3, 7, 8, 9]
    assert axial_sparse_mask(12, 4)[9].nonzero().flatten().tolist() == [1, 5, 8, 9]
    assert torch.equal(fixed_sparse_mask(20, 4, 4), causal_mask(20, 20))
    assert torch.equal(axial_sparse_mask(20, 1), causal_mask(20, 20))
    assert torch.equal(axial_sparse_mask(20, 32), causal_mask(20, 20))
