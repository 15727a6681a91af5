"""The visual selective scan (VMamba's SS2D) over a set of scan directions on an image grid.

A ``(B, C, H, W)`` map is unrolled into 1-D sequences (``cross_scan``), each is run through
the Mamba-1 selective scan (:func:`subq.ops.scan.selective_scan`), and the sequences are put
back on the grid and summed (``cross_merge``). Scan directions (``[groupmamba]``, VMamba's
CrossScan):

* ``row``: row-major raster, ``h`` outer, ``w`` inner: scan index ``s = h W + w``;
* ``column``: column-major raster, ``w`` outer, ``h`` inner: ``s = w H + h``;
* ``row_reversed`` and ``column_reversed``: the same orders backwards (``s -> L - 1 - s``).

Plain raster orders (not snakes); each ``cross_merge`` is the exact inverse of its
``cross_scan``. VMamba scans all four directions over all channels; GroupMamba gives each
quarter of the channels one direction (:class:`subq.nn.groupmamba.GroupMambaLayer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.common import accumulation_dtype
from ..ops.scan import selective_scan

DIRECTIONS = ("row", "column", "row_reversed", "column_reversed")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def cross_scan(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Unroll ``x (B, C, H, W)`` into ``(B, C, H W)`` in the order of ``direction``."""
    _check_direction(direction)
    seq = (x.transpose(2, 3) if direction.startswith("column") else x).flatten(2)
    return seq.flip(-1) if direction.endswith("reversed") else seq


def cross_merge(y: torch.Tensor, direction: str, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`cross_scan`: ``y (B, C, H W)`` in scan order -> ``(B, C, H, W)``."""
    _check_direction(direction)
    if y.shape[-1] != height * width:
        raise ValueError(f"y must have H*W = {height * width} positions, got {y.shape[-1]}")
    if direction.endswith("reversed"):
        y = y.flip(-1)
    if direction.startswith("column"):
        return y.unflatten(-1, (width, height)).transpose(-2, -1)
    return y.unflatten(-1, (height, width))


def scan_order(height: int, width: int, direction: str,
               device: torch.device | str | None = None) -> torch.Tensor:
    """``(H W,)`` raster indices ``h W + w`` in the order ``direction`` visits them."""
    grid = torch.arange(height * width, device=device).view(1, 1, height, width)
    return cross_scan(grid, direction)[0, 0]


class VisualSelectiveScan(nn.Module):
    """SS2D (``forward_type v2``): ``x (B, H, W, d_model) -> (B, H, W, d_model)``.

    With ``d_inner = ssm_ratio * d_model``, ``K = len(directions)``, ``N = d_state``::

        x, z = in_proj(x);  z = silu(z)
        x    = silu(dwconv_{d_conv x d_conv}(x))                   (skipped for d_conv = 1)
        u_k  = cross_scan(x, direction_k)                           (B, d_inner, L)
        dt, B_k, C_k = x_proj_k(u_k)                                (R, N, N), no bias
        y_k  = selective_scan(u_k, dt_proj_k(dt), A_k, B_k, C_k, D_k,
                              delta_bias_k, softplus)               (B, C shared by channels)
        y    = sum_k cross_merge(y_k, direction_k)
        out  = out_proj(LayerNorm(y) * z)

    Each direction has its own ``x_proj``, ``dt_proj``, ``A = -exp(A_log)`` and ``D``;
    parameter names follow the released code (``x_proj_weight (K, R + 2N, d_inner)``,
    ``dt_projs_weight (K, d_inner, R)``, ``dt_projs_bias (K, d_inner)``, ``A_logs (K d_inner,
    N)``, ``Ds (K d_inner,)``). Initialisation as mamba-ssm: ``A_log[d, n] = log(n + 1)``,
    ``D = 1``, ``dt_proj`` weight ``U(+-R^-1/2)``, bias = softplus^-1 of ``dt_0 ~
    logUniform[dt_min, dt_max]`` floored at ``dt_init_floor``; ``x_proj`` as a default
    ``nn.Linear``. Defaults: ``d_state=16, ssm_ratio=2, d_conv=3, dt_rank=ceil(d_model/16)``
    and all four directions (VMamba); GroupMamba uses ``d_state=1, ssm_ratio=1`` and one
    direction. The scan runs in float32 for half-precision input (float64 stays float64).
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0,
                 d_conv: int = 3, dt_rank: int | None = None,
                 directions: Sequence[str] = DIRECTIONS, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        if not directions:
            raise ValueError("directions must name at least one scan direction")
        for direction in directions:
            _check_direction(direction)
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be an odd kernel size >= 1, got {d_conv}")
        self.directions = tuple(directions)
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.d_state = d_state
        self.dt_rank = rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        k = len(self.directions)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias) if d_conv > 1 else None
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)
                                             ).repeat(k * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        with torch.no_grad():
            self.x_proj_weight.uniform_(-d_inner ** -0.5, d_inner ** -0.5)
            self.dt_projs_weight.uniform_(-rank ** -0.5, rank ** -0.5)
            log_dt = torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) \
                + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_init_floor)
            self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def scan_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x (B, H, W, d_model)`` -> the scan's ``u, delta (B, K d_inner, L)``, ``B, C (B, K,
        N, L)`` (one group per direction, in the accumulation dtype) and the gate ``z (B, H,
        W, d_inner)``."""
        batch, height, width, _ = x.shape
        n, length = self.d_state, height * width
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = xs.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            xs = self.conv2d(xs)
        xs = F.silu(xs)  # (B, d_inner, H, W)
        us = torch.stack([cross_scan(xs, d) for d in self.directions], dim=1)  # (B, K, d, L)
        proj = torch.einsum("bkdl,kcd->bkcl", us, self.x_proj_weight)
        dts, b, c = proj.split([self.dt_rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        acc = accumulation_dtype(x.dtype)
        return (us.reshape(batch, -1, length).to(acc), dts.reshape(batch, -1, length).to(acc),
                b.to(acc), c.to(acc), z)

    def scan_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``A = -exp(A_log) (K d_inner, N)``, ``D (K d_inner,)``, ``delta_bias (K d_inner,)``."""
        return (-torch.exp(self.A_logs.to(dtype)), self.Ds.to(dtype),
                self.dt_projs_bias.reshape(-1).to(dtype))

    def merge_output(self, ys: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scan outputs ``ys (B, K d_inner, L)`` and gate ``z (B, H, W, d_inner)`` -> ``(B, H,
        W, d_model)``: merge the directions back onto the grid, norm, gate, project."""
        batch, height, width, _ = z.shape
        ys = ys.view(batch, len(self.directions), self.d_inner, height * width)
        y = sum(cross_merge(ys[:, i], d, height, width) for i, d in enumerate(self.directions))
        y = self.out_norm(y.permute(0, 2, 3, 1).to(z.dtype))
        return self.out_proj(y * F.silu(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, H, W, d_model)`` channels last -> ``(B, H, W, d_model)``."""
        u, delta, b, c, z = self.scan_inputs(x)
        a, d, bias = self.scan_parameters(u.dtype)
        ys = selective_scan(u, delta, a, b, c, D=d, delta_bias=bias, delta_softplus=True)
        return self.merge_output(ys, z)


def scan_jointly(modules: Sequence[VisualSelectiveScan], xs: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
    """``[m(x) for m, x in zip(modules, xs)]`` with ONE selective-scan call for all of them.

    The modules' channels are stacked along the scan's channel dim and their B, C become
    groups of the grouped ``(B, G, N, L)`` layout, so every module must have the same
    ``d_inner`` and ``d_state`` and every input the same ``(B, H, W)``. One call instead of
    ``len(modules)`` (GroupMamba's four groups) saves launches and per-call overhead.
    """
    if len({(m.d_inner, m.d_state) for m in modules}) != 1:
        raise ValueError("modules must share d_inner and d_state to be scanned jointly")
    parts = [m.scan_inputs(x) for m, x in zip(modules, xs, strict=True)]
    u, delta, b, c = (torch.cat([p[i] for p in parts], dim=1) for i in range(4))
    params = [m.scan_parameters(u.dtype) for m in modules]
    a, d, bias = (torch.cat([p[i] for p in params]) for i in range(3))
    ys = selective_scan(u, delta, a, b, c, D=d, delta_bias=bias, delta_softplus=True)
    sizes = [len(m.directions) * m.d_inner for m in modules]
    return [m.merge_output(y, p[4])
            for m, y, p in zip(modules, ys.split(sizes, dim=1), parts, strict=True)]
