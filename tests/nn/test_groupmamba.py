"""GroupMamba layer and its visual selective scan (spec groupmamba.md, section 3.6.2-3.6.3):
scan orders and their inverses, SS2D against an explicit loop reference, causality of each
direction in its own order (with the 3x3 conv halo), and the layer algebra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subq.nn import groupmamba
from subq.nn.groupmamba import GroupMambaLayer
from subq.nn.visual_scan import (
    DIRECTIONS,
    VisualSelectiveScan,
    cross_merge,
    cross_scan,
    scan_jointly,
    scan_order,
)
from subq.ops.scan import selective_scan_reference

from ..helpers import rel_rms


def _expected_order(height: int, width: int, direction: str) -> list[int]:
    """Raster indices h W + w in visiting order, written out with explicit loops."""
    if direction.startswith("row"):
        order = [h * width + w for h in range(height) for w in range(width)]
    else:
        order = [h * width + w for w in range(width) for h in range(height)]
    return order[::-1] if direction.endswith("reversed") else order


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_order_and_inverse(direction):
    height, width = 5, 7
    x = torch.randn(2, 3, height, width)
    order = _expected_order(height, width, direction)
    assert scan_order(height, width, direction).tolist() == order
    seq = cross_scan(x, direction)
    assert torch.equal(seq, x.flatten(2)[..., order])
    assert torch.equal(cross_merge(seq, direction, height, width), x)
    y = torch.randn(2, 3, height * width)
    assert torch.equal(cross_scan(cross_merge(y, direction, height, width), direction), y)


def test_bad_direction_and_length():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="direction"):
        cross_scan(x, "diagonal")
    with pytest.raises(ValueError, match="H\\*W"):
        cross_merge(x.flatten(2), "row", 4, 4)
    with pytest.raises(ValueError, match="directions"):
        VisualSelectiveScan(8, directions=())
    with pytest.raises(ValueError, match="direction"):
        VisualSelectiveScan(8, directions=("row", "snake"))
    with pytest.raises(ValueError, match="d_inner and d_state"):
        scan_jointly([VisualSelectiveScan(8), VisualSelectiveScan(8, d_state=2)],
                     [torch.randn(1, 2, 2, 8)] * 2)


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (norm gains and biases included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _ss2d_reference(m: VisualSelectiveScan, x: torch.Tensor) -> torch.Tensor:
    """SS2D by hand: explicit index orders and the sequential selective-scan loop."""
    batch, height, width, _ = x.shape
    n, rank = m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T
    xs, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    xs = xs.permute(0, 3, 1, 2)
    if m.conv2d is not None:
        xs = F.conv2d(xs, m.conv2d.weight, m.conv2d.bias, padding=m.conv2d.padding,
                      groups=m.d_inner)
    xs = F.silu(xs).flatten(2)  # (B, d_inner, L) in raster order
    y = torch.zeros_like(xs)
    for k, direction in enumerate(m.directions):
        order = _expected_order(height, width, direction)
        u = xs[..., order]
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], u)
        dt, b, c = proj[:, :rank], proj[:, rank:rank + n], proj[:, rank + n:]
        delta = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dt)
        rows = slice(k * m.d_inner, (k + 1) * m.d_inner)
        out = selective_scan_reference(u, delta, -torch.exp(m.A_logs[rows]), b, c,
                                       D=m.Ds[rows], delta_bias=m.dt_projs_bias[k],
                                       delta_softplus=True)
        y[..., order] += out
    y = y.transpose(1, 2).reshape(batch, height, width, m.d_inner)
    y = F.layer_norm(y, (m.d_inner,), m.out_norm.weight, m.out_norm.bias, m.out_norm.eps)
    return (y * F.silu(z)) @ m.out_proj.weight.T


@pytest.mark.parametrize("d_state,ssm_ratio,directions", [
    (1, 1.0, ("column_reversed",)), (4, 2.0, DIRECTIONS), (1, 1.0, ("row", "column"))])
def test_visual_scan_matches_loop_reference(d_state, ssm_ratio, directions):
    m = _randomise(VisualSelectiveScan(8, d_state=d_state, ssm_ratio=ssm_ratio,
                                       directions=directions)).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    assert rel_rms(_ss2d_reference(m, x), out) <= 1e-10


def _halo_first(height, width, position, direction, radius):
    """Earliest scan index among the (2 radius + 1)^2 neighbourhood of raster ``position``."""
    rank = {r: s for s, r in enumerate(_expected_order(height, width, direction))}
    h, w = divmod(position, width)
    return min(rank[i * width + j]
               for i in range(max(h - radius, 0), min(h + radius + 1, height))
               for j in range(max(w - radius, 0), min(w + radius + 1, width)))


@pytest.mark.parametrize("d_conv", [1, 3])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_direction_is_causal_in_its_own_order(direction, d_conv):
    height, width = 6, 7
    m = VisualSelectiveScan(8, d_state=1, ssm_ratio=1.0, d_conv=d_conv,
                            directions=(direction,)).double()
    x = torch.randn(2, height, width, 8, dtype=torch.float64)
    # away from the corners, so that some scan positions precede the halo in every order
    position = int(torch.randint(2, height - 2, ())) * width + int(torch.randint(2, width - 2, ()))
    x2 = x.clone()
    x2[:, position // width, position % width] += torch.randn(2, 8, dtype=torch.float64)
    change = (m(x2) - m(x)).abs().amax(dim=(0, 3)).flatten()  # per raster position
    order = scan_order(height, width, direction)
    change = change[order]  # per scan position
    first = _halo_first(height, width, position, direction, (d_conv - 1) // 2)
    own = _expected_order(height, width, direction).index(position)
    assert 0 < first <= own
    assert (change[:first] <= 1e-13).all()
    assert change[first] > 1e-6 and change[own] > 1e-6 and change[-1] > 1e-9


def test_layer_groups_scan_the_four_directions():
    layer = GroupMambaLayer(32)
    assert [g.directions for g in layer.groups] == [(d,) for d in DIRECTIONS]
    for g in layer.groups:
        assert g.d_inner == 8 and g.d_state == 1 and g.dt_rank == 1
        assert g.conv2d.kernel_size == (3, 3)
        assert torch.equal(g.A_logs, torch.zeros(8, 1)) and torch.equal(g.Ds, torch.ones(8))
    assert layer.fc1.out_features == 2 and torch.equal(layer.skip_scale, torch.ones(1))


def _ln(layer: GroupMambaLayer, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (layer.dim,), layer.norm.weight, layer.norm.bias, layer.norm.eps)


@pytest.mark.parametrize("neutral_affinity", [True, False])
def test_layer_algebra(neutral_affinity, monkeypatch):
    """Spec 3.6.3: VSSS outputs 1 and affinity 1 -> ``proj(LN(skip_scale LN(x)))``; with the
    real affinity ``a`` -> ``proj(LN(skip_scale LN(x) a))``."""
    layer = _randomise(GroupMambaLayer(32)).double()
    monkeypatch.setattr(groupmamba, "scan_jointly",
                        lambda groups, xs: [torch.ones_like(x) for x in xs])
    if neutral_affinity:
        with torch.no_grad():
            layer.fc2.weight.zero_()
            layer.fc2.bias.fill_(50.0)  # sigmoid(50) == 1 in float64
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    normed = _ln(layer, x)
    if neutral_affinity:
        affinity = torch.ones(3, 32, dtype=torch.float64)
    else:
        hidden = torch.relu(normed.mean(1) @ layer.fc1.weight.T + layer.fc1.bias)
        affinity = torch.sigmoid(hidden @ layer.fc2.weight.T + layer.fc2.bias)
    expected = _ln(layer, layer.skip_scale * normed * affinity[:, None]) @ layer.proj.weight.T \
        + layer.proj.bias
    assert rel_rms(expected, layer(x, 4, 5)) <= 1e-12


def test_layer_is_the_grouped_composition():
    """Channel group k of ``LN(x)`` goes through ``mamba_gk`` (run alone) and lands in group
    k: the joint scan of the four groups equals the four modules one by one."""
    layer = _randomise(GroupMambaLayer(16)).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    grid = _ln(layer, x).view(2, 3, 4, 16)
    outs = [layer.groups[k](grid[..., 4 * k:4 * k + 4]) for k in range(4)]
    hidden = torch.relu(grid.mean((1, 2)) @ layer.fc1.weight.T + layer.fc1.bias)
    affinity = torch.sigmoid(hidden @ layer.fc2.weight.T + layer.fc2.bias)
    y = torch.cat(outs, -1) * layer.skip_scale * grid * affinity[:, None, None]
    expected = layer.proj(_ln(layer, y)).view(2, 12, 16)
    assert rel_rms(expected, layer(x, 3, 4)) <= 1e-12
    # not causal in any order: the affinity pools over all tokens
    x2 = x.clone()
    x2[:, -1] += torch.randn(2, 16, dtype=torch.float64)
    assert (layer(x2, 3, 4) - layer(x, 3, 4))[:, 0].abs().max() > 1e-9


def test_layer_gradcheck():
    layer = _randomise(GroupMambaLayer(16)).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, 2, 3), (x,), fast_mode=True)


def test_layer_shapes_dtypes_and_bad_input():
    layer = GroupMambaLayer(32)
    out = layer(torch.randn(2, 1, 32), 1, 1)  # the class-token call
    assert out.shape == (2, 1, 32) and torch.isfinite(out).all()
    half = layer(torch.randn(1, 6, 32).half(), 2, 3)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    with pytest.raises(ValueError, match="H\\*W"):
        layer(torch.randn(1, 6, 32), 2, 2)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 6, 16), 2, 3)
    with pytest.raises(ValueError, match="divisible"):
        GroupMambaLayer(30)
