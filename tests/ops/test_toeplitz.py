"""FFT Toeplitz products (subq/ops/toeplitz.py) against the dense Toeplitz matrix."""

from __future__ import annotations

import pytest
import torch

from subq.ops.toeplitz import causal_diagonals, dense_toeplitz, fft_size, toeplitz_matmul

from ..helpers import rel_rms


@pytest.mark.parametrize("lq, lk", [(1, 1), (63, 63), (500, 500), (37, 120), (120, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_fft_product_equals_dense_float64(lq, lk, causal):
    c = torch.rand(3, lq + lk - 1, dtype=torch.float64) * 5
    if causal:
        c = causal_diagonals(c, lq)
    x = torch.randn(2, 3, lk, 7, dtype=torch.float64)
    dense = dense_toeplitz(c, lq, lk) @ x
    assert rel_rms(dense, toeplitz_matmul(c, x, lq)) <= 1e-12


def test_fft_product_float32_long():
    n = 8192
    c = torch.rand(2 * n - 1, dtype=torch.float64)
    x = torch.randn(n, 3, dtype=torch.float64)
    dense = dense_toeplitz(c, n, n) @ x
    assert rel_rms(dense, toeplitz_matmul(c.float(), x.float(), n)) <= 1e-4


def test_dense_toeplitz_layout_and_causal_diagonals():
    c = torch.arange(5.0)  # offsets -2..2 for Lq = Lk = 3
    expected = torch.tensor([[2.0, 3.0, 4.0], [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    assert torch.equal(dense_toeplitz(c, 3, 3), expected)
    assert torch.equal(dense_toeplitz(causal_diagonals(c, 3), 3, 3), expected.tril())


@pytest.mark.parametrize("lq, lk", [(1, 1), (3, 5), (8, 9), (100, 29)])
def test_fft_size_is_a_large_enough_power_of_two(lq, lk):
    n = fft_size(lq, lk)
    assert n >= lq + lk - 1 and n & (n - 1) == 0 and n < 2 * (lq + lk - 1) + 1


def test_gradients_flow_to_diagonals_and_input():
    c = torch.rand(2, 13, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, x: toeplitz_matmul(c, x, 8), (c, x))
