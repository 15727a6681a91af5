"""Token orders of image grids (Scale-DiT): bijections, inverses, locality, RoPE anchors."""

from __future__ import annotations

import pytest
import torch

from subq.ops.token_order import ORDERS, grid_order, grid_positions, hilbert_index, inverse


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("count, width, window", [(64 * 64, 64, 16), (37, 6, 4), (100, 12, 3)])
def test_orders_are_bijections_with_inverses(order, count, width, window):
    perm = grid_order(count, width, window, order)
    assert sorted(perm.tolist()) == list(range(count))
    x = torch.randn(2, count, 3)
    assert torch.equal(x[:, perm][:, inverse(perm)], x)
    assert torch.equal(perm[inverse(perm)], torch.arange(count))


def test_hilbert_index_is_a_continuous_bijection():
    side = 16
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    d = hilbert_index(x.flatten(), y.flatten(), side)
    assert sorted(d.tolist()) == list(range(side * side))
    cells = torch.stack([x.flatten(), y.flatten()], dim=1)[torch.argsort(d)]
    assert ((cells[1:] - cells[:-1]).abs().sum(dim=1) == 1).all()  # unit steps only


@pytest.mark.parametrize("order", ["window_first", "hilbert"])
def test_each_window_is_contiguous(order):
    width, window = 64, 16
    perm = grid_order(width * width, width, window, order)
    row, col = perm // width, perm % width
    window_id = (row // window) * (width // window) + col // window
    runs = window_id.view(-1, window * window)
    assert (runs == runs[:, :1]).all()
    assert torch.equal(runs[:, 0], torch.arange(16))  # windows in raster order
    if order == "window_first":  # raster inside the window
        assert torch.equal(perm[:window * window] // width % window,
                           torch.arange(window).repeat_interleave(window))


def test_hilbert_blocks_of_128_are_compact():
    width = 64
    perm = grid_order(width * width, width, 16, "hilbert")
    for block in perm.view(-1, 128):
        rows, cols = block // width, block % width
        extent = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
        assert extent in ((8, 16), (16, 8))


def test_low_res_anchors_scale_positions():
    h, w, r = 3, 5, 4
    anchors = grid_positions(h, w, factor=r)
    i = torch.randint(h, ()).item()
    j = torch.randint(w, ()).item()
    assert anchors[i * w + j].tolist() == [r * i, r * j]
    assert torch.equal(grid_positions(h * r, w * r)[(r * i) * (w * r) + r * j], anchors[i * w + j])


def test_unknown_order_raises():
    with pytest.raises(ValueError, match="order"):
        grid_order(16, 4, 2, "zigzag")
