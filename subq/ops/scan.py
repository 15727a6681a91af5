"""The Mamba-1 selective scan (S6), with mamba-ssm's ``selective_scan_fn`` semantics.

For every channel ``d`` and state index ``n`` (``[mamba]``, Gu & Dao 2023, eq. 2a-2b with
zero-order-hold discretisation of A and Euler discretisation of B):

    delta_t = softplus(delta_t + delta_bias)           (bias and softplus optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n]  +  D[d] * u_t
    out_t   = y_t * silu(z_t)                           (gate optional)

Shapes (the layout of mamba-ssm): ``u, delta, z (B, D, L)``; ``A (D, N)``; ``D, delta_bias
(D,)``; ``B`` and ``C`` each either time-invariant ``(D, N)``, shared by all channels
``(B, N, L)``, or grouped ``(B, G, N, L)`` with ``D % G == 0`` (channel ``c`` reads group
``c // (D / G)``; ``G = D`` is per-channel). States are ``(B, D, N)``.

Three forms of the same function:

* :func:`selective_scan_reference`: the explicit loop over t, one :func:`selective_scan_step`
  per token; what the fast form is held to.
* :func:`selective_scan`: the fast form, a two-level chunked scan with time-major states
  ``(B, L, N, D)``. The sequence is cut into chunks of ``T = _CHUNK`` tokens. (1) Within every
  chunk, all chunks at once, the recurrence ``h_t = a_t h_{t-1} + x_t`` runs from a zero state
  in ``T`` in-place steps ``x_t += a_t x_{t-1}``, each on a contiguous slice, while the same
  loop turns the decays into in-chunk products ``P_t = a_0 ... a_t``. (2) The chunk entry
  states are carried across chunks, ``H_{k+1} = P_{k, T-1} H_k + x^{loc}_{k, T-1}``. (3) Each
  token adds its entry state's contribution, ``h_t = x^{loc}_t + P_t H_k``. Decays
  ``exp(delta A)`` are only ever multiplied, never divided, so nothing overflows and a product
  underflows only where its true value is below the floating-point range (the closed form
  ``exp(S_t) cumsum(exp(-S_s) x_s)`` is not stable: it overflows once a chunk decays by ~88 nats
  in float32). The work runs in tiles of batch rows x ``_BLOCK`` tokens (about ``_TILE`` state
  entries, so the tile's decays and states live in reused, cache-resident buffers and never in
  freshly paged memory), the state carried across a row's tiles, so the ``(B, L, N, D)`` states
  are never held whole: ``y_t = sum_n C_t h_t`` is a batched matrix product per tile. The
  backward pass is a custom autograd function: it recomputes each tile's states from the saved
  chunk entry states and runs the adjoint scan ``g_t = a_{t+1} g_{t+1} + C_t dy_t`` backwards
  with the same chunked machinery; then ``dx_t = g_t`` and ``d(delta_t A) = g_t a_t h_{t-1}``.
  Memory is O(B N D L / T + _TILE) besides the inputs and outputs, which are made time-major
  ``(B, L, D)`` once (free when the caller passes transposed views, as the Mamba mixer does).
  Without autograd (inference, or no input requiring a gradient) the same tile loop runs with
  everything elementwise fused into it: each tile's ``delta`` is discretised, ``delta u``
  formed, and ``(y + D u) silu(z)`` written to the output, all per tile in small reused
  buffers, so no whole-sequence intermediate exists at all. The decays are computed as
  ``2^(delta A log2 e)``: on the CPU torch's ``exp2`` costs half its ``exp``, and the decays
  are the scan's one transcendental per state entry.
* :func:`selective_scan_step`: one token, for decoding.

On the CPU with float32 inputs :func:`selective_scan` hands the whole computation (with or
without autograd) to the fused C kernel of :mod:`subq.ops.scan_kernel`, one pass per block of
channels forward and one backward, when it builds on the machine; the chunked form above is
what runs everywhere else (float64, half precision, CUDA, no C compiler) and is held to the
same reference.

Half precision inputs are computed in float32; outputs have ``u``'s dtype, states the
accumulation dtype (float64 for float64 input, float32 otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import scan_kernel
from .common import accumulation_dtype

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = 2^(x log2(e))
_CHUNK = 32  # tokens per chunk (T): the in-chunk loop runs T steps, the carry L / T
_BLOCK = 512  # tokens per tile (a multiple of _CHUNK)
_TILE = 1 << 21  # about this many (token, N, D) state entries per tile buffer (8 MiB float32)


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
           delta_bias: torch.Tensor | None, initial_state: torch.Tensor | None,
           time_dim: bool) -> None:
    """``ValueError`` naming the argument for shapes that do not fit the layout above."""
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise ValueError("u must be a floating-point tensor")
    if u.dim() != (3 if time_dim else 2):
        raise ValueError(f"u must be {'(B, D, L)' if time_dim else '(B, D)'}, "
                         f"got shape {tuple(u.shape)}")
    batch, channels = u.shape[:2]
    if A.dim() != 2 or A.shape[0] != channels or A.is_complex():
        raise ValueError(f"A must be a real (D, N) = ({channels}, N) tensor, "
                         f"got {tuple(A.shape)}")
    n = A.shape[1]
    for name, x in (("delta", delta), ("z", z)):
        if x is not None and x.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(x.shape)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and tuple(x.shape) != (channels,):
            raise ValueError(f"{name} must have shape (D,) = ({channels},), got {tuple(x.shape)}")
    tail = (u.shape[2],) if time_dim else ()
    for name, x in (("B", B), ("C", C)):
        if x.dim() == 2 and time_dim:
            ok = tuple(x.shape) == (channels, n)
        elif x.dim() == 2 + time_dim:
            ok = tuple(x.shape) == (batch, n, *tail)
        elif x.dim() == 3 + time_dim:
            ok = (x.shape[0] == batch and x.shape[1] >= 1 and channels % x.shape[1] == 0
                  and tuple(x.shape[2:]) == (n, *tail))
        else:
            ok = False
        if not ok:
            forms = "(D, N), (B, N, L) or (B, G, N, L)" if time_dim else "(B, N) or (B, G, N)"
            raise ValueError(f"{name} must be {forms} with D % G == 0 "
                             f"for u {tuple(u.shape)} and N={n}, got {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, channels, n):
        raise ValueError(f"initial_state must be (B, D, N) = ({batch}, {channels}, {n}), "
                         f"got {tuple(initial_state.shape)}")


def _per_channel(x: torch.Tensor, channels: int, time_dim: bool, acc: torch.dtype
                 ) -> torch.Tensor:
    """B or C as ``(B|1, D|1, L|1, N)`` (with ``time_dim``) or ``(B, D|1, N)`` (without)."""
    x = x.to(acc)
    if x.dim() == 2 and time_dim:  # (D, N): time-invariant
        return x[None, :, None]
    if x.dim() == 2 + time_dim:  # (B, N[, L]): shared by all channels
        return x.transpose(1, 2)[:, None] if time_dim else x[:, None]
    groups = x.shape[1]  # (B, G, N[, L]): channel c reads group c // (D / G)
    x = x.repeat_interleave(channels // groups, dim=1)
    return x.transpose(2, 3) if time_dim else x


def _discretise_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None,
                      delta_softplus: bool, acc: torch.dtype) -> torch.Tensor:
    """``softplus(delta + delta_bias)`` (each part optional); ``delta`` has channels last."""
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    return F.softplus(delta) if delta_softplus else delta


def _swap_last(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, X, Y)`` -> contiguous ``(B, Y, X)`` in ``dtype``: free when ``x`` is already a
    transposed view of such a tensor (as in the Mamba mixer); otherwise one 2-D copy per batch
    row, which takes torch's cache-blocked transpose (a 3-D transposing copy reads with a
    stride of a whole row per element and runs several times slower)."""
    dtype = dtype or x.dtype
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).to(dtype)
    x = x.contiguous()
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1], dtype=dtype)
    for row in range(x.shape[0]):
        out[row].copy_(x[row].T)
    return out


def _layout_like(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Time-major ``y (B, L, D)`` as ``(B, D, L)`` stored like ``u`` (so that the elementwise
    tail reads both with the same strides)."""
    return y.transpose(1, 2) if u.transpose(1, 2).is_contiguous() else _swap_last(y)


def _output(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
            acc: torch.dtype) -> torch.Tensor:
    """``(y + D u) * silu(z)`` with the optional parts left out; ``D`` broadcasts over time."""
    if D is not None:
        d = D.to(acc)
        y = y + u.to(acc) * (d[:, None] if u.dim() == 3 else d)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)


def selective_scan_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective scan: ``h = exp(delta A) h + delta B u``, ``y = C.h + D u``.

    Args:
        state: ``(B, D, N)``, the state after the previous token (zeros before the first).
        u, delta, z: ``(B, D)``; ``A (D, N)``; ``D, delta_bias (D,)``.
        B, C: ``(B, N)`` (shared by all channels) or ``(B, G, N)`` (grouped, ``D % G == 0``);
            a time-invariant ``(D, N)`` is passed as ``(B, D, N)`` (``expand``).

    Returns:
        ``(out (B, D) in u's dtype, new state (B, D, N) in the accumulation dtype)``.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, state, time_dim=False)
    return _step(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _step(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    acc = accumulation_dtype(u.dtype)
    channels = u.shape[1]
    delta = _discretise_delta(delta, delta_bias, delta_softplus, acc)
    decay = torch.exp(delta[..., None] * A.to(acc))
    state = decay * state.to(acc) + (delta * u.to(acc))[..., None] * _per_channel(
        B, channels, False, acc)
    y = (state * _per_channel(C, channels, False, acc)).sum(-1)
    return _output(y, u, D, z, acc), state


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> ScanResult:
    """The selective scan as an explicit loop over time: :func:`selective_scan_step` per token.

    Same arguments and result as :func:`selective_scan`; O(L) sequential steps.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, time_dim=True)
    acc = accumulation_dtype(u.dtype)
    batch, channels, length = u.shape
    state = u.new_zeros(batch, channels, A.shape[1], dtype=acc) if initial_state is None \
        else initial_state.to(acc)
    if B.dim() == 2:  # time-invariant (D, N) -> one group per channel, constant over time
        B = B[None, :, :, None].expand(batch, channels, A.shape[1], max(length, 1))
    if C.dim() == 2:
        C = C[None, :, :, None].expand(batch, channels, A.shape[1], max(length, 1))
    outs = []
    for t in range(length):
        out, state = _step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                           None if z is None else z[..., t], delta_bias, delta_softplus)
        outs.append(out)
    out = torch.stack(outs, dim=-1) if outs else u.new_zeros(u.shape)
    return (out, state) if return_last_state else out


def _scan_chunks(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``x (B, K, T, ...)`` becomes the states of ``h_t = a_t h_{t-1} + x_t`` over the
    ``K * T`` tokens (chunk-major), from the entry state ``h (B, ...)``; ``a`` becomes the
    in-chunk decays ``a[:, k, 0] * ... * a[:, k, t]`` (products only).

    Returns the entry state of every chunk ``(B, K, ...)`` and the state after the last token.
    """
    xs, as_ = x.unbind(2), a.unbind(2)
    for t in range(1, x.shape[2]):
        xs[t].addcmul_(as_[t], xs[t - 1])
        as_[t].mul_(as_[t - 1])
    entries = x.new_empty(x.shape[0], x.shape[1] + 1, *x.shape[3:])
    entries[:, 0] = h
    states = entries.unbind(1)
    for k, (x_end, a_end) in enumerate(zip(xs[-1].unbind(1), as_[-1].unbind(1),
                                                     strict=True)):
        torch.addcmul(x_end, a_end, states[k], out=states[k + 1])
    x.addcmul_(a, entries[:, :-1, None])
    return entries[:, :-1], entries[:, -1]


def _adjoint_chunks(a: torch.Tensor, g: torch.Tensor, r: torch.Tensor, rcum: torch.Tensor
                    ) -> torch.Tensor:
    """In place: ``g (B, K, T, ...)`` (holding ``c_t``) becomes the adjoint states
    ``g_t = a_{t+1} g_{t+1} + c_t`` of :func:`_scan_chunks`, where ``r (B, ...)`` flows into
    the last token from the right (``a_{end+1} g_{end+1}``, or the final state's cotangent).

    ``rcum`` (a buffer of ``g``'s shape) receives ``a[:, k, t+1] * ... * a[:, k, T-1]``.
    Returns ``a_0 g_0``: what flows on to the left of the first token.
    """
    rcum[:, :, -1] = 1.0
    for t in range(g.shape[2] - 2, -1, -1):
        g[:, :, t].addcmul_(a[:, :, t + 1], g[:, :, t + 1])
        torch.mul(a[:, :, t + 1], rcum[:, :, t + 1], out=rcum[:, :, t])
    inflows = [r] * g.shape[1]
    for k in range(g.shape[1] - 1, -1, -1):
        inflows[k] = r
        r = a[:, k, 0] * torch.addcmul(g[:, k, 0], rcum[:, k, 0], r)
    g.addcmul_(rcum, torch.stack(inflows, dim=1)[:, :, None])
    return r


def _chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(B, K * T, ...)`` -> ``(B, K, T, ...)`` (a view)."""
    return x.unflatten(1, (x.shape[1] // chunk, chunk))


def _per_group(h: torch.Tensor, groups: int) -> torch.Tensor:
    """States ``(B, S, N, D)`` as ``(B, S, G, N, D / G)`` (a view; contiguous for G = 1)."""
    return h[:, :, None] if groups == 1 else h.unflatten(3, (groups, -1)).transpose(2, 3)


def _sum_n(h: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_n c[b, s, d // (D / G), n] h[b, s, n, d]``: ``h (B, S, N, D)``, ``c (B|1, S|1,
    G, N)`` -> ``(B, S, D)`` (a batched matrix product), into ``out`` if given."""
    groups = c.shape[2]
    if out is None:
        return torch.matmul(c[..., None, :], _per_group(h, groups)).flatten(2)
    torch.matmul(c[..., None, :], _per_group(h, groups),
                 out=out.unflatten(2, (groups, 1, -1)))
    return out


def _sum_d(w: torch.Tensor, h: torch.Tensor, groups: int, scratch: torch.Tensor
           ) -> torch.Tensor:
    """``sum_{d in group g} w[b, s, d] h[b, s, n, d]``: ``w (B, S, D)``, ``h (B, S, N, D)``
    -> ``(B, S, G, N)``; ``scratch`` is a buffer of ``h``'s shape (a product and a reduction
    over the contiguous last dim beat a batched matrix-vector product several times)."""
    product = _per_group(scratch, groups)
    torch.mul(_per_group(h, groups), w.unflatten(2, (groups, -1))[:, :, :, None], out=product)
    return product.sum(-1)


def _outer(c: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b, s, n, d] = c[b, s, d // (D / G), n] w[b, s, d]``: ``c (B|1, S|1, G, N)``,
    ``w (B, S, D)``, ``out (B, S, N, D)``."""
    groups = c.shape[2]
    torch.mul(c.transpose(2, 3)[..., None], w.unflatten(2, (groups, -1))[:, :, None],
              out=out.unflatten(3, (groups, -1)))


def _blocks(length: int) -> list[tuple[int, int]]:
    return [(start, min(start + _BLOCK, length)) for start in range(0, length, _BLOCK)]


def _batch_slices(batch: int, tokens: int, state: tuple[int, ...]) -> list[slice]:
    """Batch rows per tile, so that a tile's ``(b, tokens, N, D)`` buffers hold about
    ``_TILE`` entries (stay cache-resident and reused, never fresh pages)."""
    rows = max(1, _TILE // (tokens * state[0] * state[1]))
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def _accumulate(grad: torch.Tensor, block: torch.Tensor, full: torch.Tensor, rows: slice,
                start: int, stop: int) -> None:
    """Add a tile's gradient ``(b, S, G, N)`` of B or C into ``grad`` (``full``'s shape
    ``(B|1, L|1, G, N)``): summed over the dims ``full`` broadcasts."""
    if full.shape[1] == 1:
        block = block.sum(1, keepdim=True)
    else:
        grad = grad[:, start:stop]
    if full.shape[0] == 1:
        grad += block.sum(0, keepdim=True)
    else:
        grad[rows] += block


def _tile_terms(dl: torch.Tensor, weight: torch.Tensor, A2: torch.Tensor, Bb: torch.Tensor,
                decay: torch.Tensor, drive: torch.Tensor) -> None:
    """Write a tile's decays ``exp(delta_t A) = 2^(delta_t A log2(e))`` and drives
    ``delta_t B_t u_t`` ``(b, S, N, D)`` into ``decay`` and ``drive``: ``dl (b, S, D)``,
    ``weight = delta_t u_t (b, S, D)``, ``A2 = A log2(e) (N, D)``, ``Bb (b|1, S|1, G, N)``."""
    torch.mul(dl[:, :, None], A2, out=decay).exp2_()
    _outer(Bb, weight, out=drive)


def _tile(x: torch.Tensor, rows: slice, start: int, stop: int) -> torch.Tensor:
    """Batch ``rows`` and tokens ``start:stop`` of a ``(B|1, L|1, G, N)`` tensor (size-1 dims
    broadcast)."""
    x = x if x.shape[0] == 1 else x[rows]
    return x if x.shape[1] == 1 else x[:, start:stop]


def _tiles(batch: int, length: int, state: tuple[int, ...]):
    """``(rows, start, stop)`` of every tile, batch slices outer, token blocks inner."""
    tokens = min(_BLOCK, length)
    return [(rows, start, stop) for rows in _batch_slices(batch, tokens, state)
            for start, stop in _blocks(length)]


def _forward_tiles(inputs, emit, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                   h0: torch.Tensor, length: int, entries: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The forward scan, tile by tile (batch rows x token blocks), the state carried across a
    row's blocks; returns the state after the last token ``(B, N, D)``.

    ``inputs(rows, start, stop, weight)`` returns the tile's discretised ``delta`` ``(b, S, D)``
    and writes ``delta u`` into the buffer ``weight (b, S, D)``; ``emit(rows, start, stop, y)``
    receives its ``y = sum_n C_t h_t`` ``(b, S, D)`` (a reused buffer).
    ``A (N, D)``, ``B, C (B|1, L|1, G, N)``, ``h0 (B, N, D)``, ``length`` a multiple of
    ``_CHUNK``; ``entries (B, L / _CHUNK, N, D)``, if given, receives every chunk's entry state.
    Each tile's ``(b, S, N, D)`` terms live in two reused buffers.
    """
    batch, chunk = h0.shape[0], _CHUNK
    tiles = _tiles(batch, length, A.shape)
    shape = (tiles[0][0].stop - tiles[0][0].start, tiles[0][2] - tiles[0][1], *A.shape)
    decay_buf, drive_buf = h0.new_empty(shape), h0.new_empty(shape)
    weight_buf, y_buf = (h0.new_empty(shape[:2] + A.shape[1:]) for _ in range(2))
    last, A2 = torch.empty_like(h0), A * _LOG2E
    for rows, start, stop in tiles:
        size = (rows.stop - rows.start, stop - start)
        decay, drive = decay_buf[:size[0], :size[1]], drive_buf[:size[0], :size[1]]
        weight = weight_buf[:size[0], :size[1]]
        dl = inputs(rows, start, stop, weight)
        _tile_terms(dl, weight, A2, _tile(Bm, rows, start, stop), decay, drive)
        tile_entries, last[rows] = _scan_chunks(_chunked(decay, chunk), _chunked(drive, chunk),
                                                h0[rows] if start == 0 else last[rows])
        if entries is not None:
            entries[rows, start // chunk:stop // chunk] = tile_entries
        emit(rows, start, stop,
             _sum_n(drive, _tile(Cm, rows, start, stop), out=y_buf[:size[0], :size[1]]))
    return last


class _SelectiveScan(torch.autograd.Function):
    """``y (B, L, D) = sum_n C_t h_t`` and the last state ``(B, N, D)``, all time-major:
    ``delta, u (B, L, D)`` (L a multiple of ``_CHUNK``), ``A (N, D)``, ``B, C (B|1, L|1, G,
    N)``, ``h0 (B, N, D)``. Runs tile by tile (batch rows x token blocks), the state carried
    across a row's blocks; each tile's ``(b, S, N, D)`` terms live in reused buffers."""

    @staticmethod
    def forward(ctx, delta, u, A, Bm, Cm, h0):
        batch, length = delta.shape[:2]
        y = torch.empty_like(delta)
        entries = delta.new_empty(batch, length // _CHUNK, *A.shape)

        def inputs(rows, start, stop, weight):
            torch.mul(delta[rows, start:stop], u[rows, start:stop], out=weight)
            return delta[rows, start:stop]

        def emit(rows, start, stop, y_tile):
            y[rows, start:stop] = y_tile

        last = _forward_tiles(inputs, emit, A, Bm, Cm, h0, length, entries)
        ctx.save_for_backward(delta, u, A, Bm, Cm, entries)
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        delta, u, A, Bm, Cm, entries = ctx.saved_tensors
        batch, length = delta.shape[:2]
        chunk, tiles = _CHUNK, _tiles(batch, length, A.shape)
        shape = (tiles[0][0].stop - tiles[0][0].start, tiles[0][2] - tiles[0][1], *A.shape)
        decay_buf, g_buf, rcum_buf = (delta.new_empty(shape) for _ in range(3))
        weight_buf = delta.new_empty(shape[:2] + A.shape[1:])
        buf = delta.new_empty(shape[0], shape[1] + 1, *shape[2:])
        ddelta, du = torch.empty_like(delta), torch.empty_like(u)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(Bm), torch.zeros_like(Cm)
        dh0, A2 = torch.empty_like(dh_last), A * _LOG2E
        for rows, start, stop in reversed(tiles):
            size, first = (rows.stop - rows.start, stop - start), start // chunk
            r = dh_last[rows] if stop == length else dh0[rows]
            dl, ub, dyb = delta[rows, start:stop], u[rows, start:stop], dy[rows, start:stop]
            Bb, Cb = _tile(Bm, rows, start, stop), _tile(Cm, rows, start, stop)
            decay, g = decay_buf[:size[0], :size[1]], g_buf[:size[0], :size[1]]
            # States, recomputed from the saved chunk entry states: buf[:, s + 1] = h_s.
            states = buf[:size[0], 1:size[1] + 1]
            previous = buf[:size[0], :size[1]]
            weight = torch.mul(dl, ub, out=weight_buf[:size[0], :size[1]])
            _tile_terms(dl, weight, A2, Bb, decay, states)
            a, h = _chunked(decay, chunk), _chunked(states, chunk)
            tile_entries = entries[rows, first:first + h.shape[1]]
            buf[:size[0], 0] = tile_entries[:, 0]
            h[:, :, 0].addcmul_(a[:, :, 0], tile_entries)
            hs, as_ = h.unbind(2), a.unbind(2)
            for t in range(1, chunk):
                hs[t].addcmul_(as_[t], hs[t - 1])
            dC_tile = _sum_d(dyb, states, Cm.shape[2], scratch=g)
            _outer(Cb, dyb, out=g)
            rcum = rcum_buf[:size[0], :size[1]]
            dh0[rows] = _adjoint_chunks(a, _chunked(g, chunk), r, _chunked(rcum, chunk))
            gB = _sum_n(g, Bb)
            _accumulate(dB, _sum_d(weight, g, Bm.shape[2], scratch=rcum), Bm, rows, start, stop)
            _accumulate(dC, dC_tile, Cm, rows, start, stop)
            dlog_decay = g.mul_(decay).mul_(previous)  # d loss / d (delta_t A)
            ddelta[rows, start:stop] = torch.mul(dlog_decay, A, out=rcum).sum(2) + ub * gB
            dA += dlog_decay.mul_(dl[:, :, None]).sum((0, 1))
            du[rows, start:stop] = dl * gB
        return ddelta, du, dA, dB, dC, dh0


class _LinearRecurrence(torch.autograd.Function):
    """:func:`linear_recurrence` in time-major layout ``(B, L, ...)``, L a multiple of the
    chunk; the backward runs the adjoint scan."""

    @staticmethod
    def forward(ctx, a, x):
        states = x.clone()
        _scan_chunks(_chunked(a.clone(), _CHUNK), _chunked(states, _CHUNK),
                     torch.zeros_like(x[:, 0]))
        ctx.save_for_backward(a, states)
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        a, states = ctx.saved_tensors
        g = dh.clone()
        _adjoint_chunks(_chunked(a, _CHUNK), _chunked(g, _CHUNK), torch.zeros_like(dh[:, 0]),
                        _chunked(torch.empty_like(a), _CHUNK))
        previous = torch.zeros_like(states)
        previous[:, 1:] = states[:, :-1]
        return g * previous, g


def _pad_time(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of ``x`` to ``length`` with ``value``."""
    extra = length - x.shape[1]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra), value=value) if extra else x


def _padded_length(length: int) -> int:
    return -(-length // _CHUNK) * _CHUNK


def linear_recurrence(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + x_t`` with ``h_{-1} = 0``, along dim 2.

    ``a``, ``x``: equal shapes ``(B, D, L, N)`` (time at dim 2). The chunked scan of
    :func:`selective_scan` (decays only multiplied, never divided);
    differentiable (the backward runs the adjoint scan).
    """
    length = a.shape[2]
    if length == 0:
        return x.clone()
    padded = _padded_length(length)
    a_t = _pad_time(a.movedim(2, 1), padded, 1.0).contiguous()
    x_t = _pad_time(x.movedim(2, 1), padded).contiguous()
    return _LinearRecurrence.apply(a_t, x_t)[:, :length].movedim(1, 2)


def _time_major_bc(x: torch.Tensor, padded: int, acc: torch.dtype) -> torch.Tensor:
    """B or C as ``(B|1, L|1, G, N)``: ``(D, N)`` -> ``(1, 1, D, N)``, ``(B, N, L)`` ->
    ``(B, L, 1, N)``, ``(B, G, N, L)`` -> ``(B, L, G, N)``; time padded with zeros."""
    x = x.to(acc)
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        x = x[:, None]
    return _pad_time(x.permute(0, 3, 1, 2), padded).contiguous()


def _fused_forward(u, delta, A, Bm, Cm, h0, D, z, delta_bias, delta_softplus, acc
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward without autograd, every elementwise step done per tile, so that no
    whole-sequence intermediate is allocated: a tile's ``delta`` is discretised and multiplied
    by ``u`` in the caller's layout (a channel-major block ``(b, D, S)`` of ``(B, D, L)``, or
    a time-major view), only ``delta`` and ``delta u`` are made time-major for the scan, and
    ``(y + D u) silu(z)`` is formed back in the caller's layout and written straight into the
    output: three transposing copies per tile (``delta``, ``delta u``, ``y``), each between
    small contiguous buffers. Arguments as
    :class:`_SelectiveScan` takes them (``A``, ``B``, ``C``, ``h0`` time-major) plus
    :func:`selective_scan`'s raw ones; returns ``out (B, D, L)`` and the last state
    ``(B, N, D)``."""
    length, padded = u.shape[2], _padded_length(u.shape[2])
    time_major = u.transpose(1, 2).is_contiguous()
    out = torch.empty_like(u.transpose(1, 2)).transpose(1, 2) if time_major \
        else torch.empty_like(u)
    skip = None if D is None else D.to(acc)[:, None]
    bias = None if delta_bias is None else delta_bias.to(acc)[:, None]
    rows0, start0, stop0 = _tiles(u.shape[0], padded, A.shape)[0]
    shape = (rows0.stop - rows0.start, u.shape[1], stop0 - start0)  # (b, D, S)

    def caller_layout():
        """A ``(b, D, S)`` buffer stored like the caller's tensors."""
        return h0.new_empty(shape) if not time_major \
            else h0.new_empty(shape[0], shape[2], shape[1]).transpose(1, 2)

    raw_buf, dl_buf, w_buf, y_buf, gate_buf = (caller_layout() for _ in range(5))
    dl_tm = h0.new_empty(shape[0], shape[2], shape[1])

    def discretise(block: torch.Tensor, out: torch.Tensor) -> None:
        """``softplus(block + delta_bias)`` (each part optional) into ``out``, in ``acc``: the
        allocation-free form of :func:`_discretise_delta`, which stays functional for
        autograd (``out=`` ops are not differentiable)."""
        raw = raw_buf[:out.shape[0], :, :out.shape[2]] if delta_softplus else out
        if bias is None:
            raw.copy_(block)
        else:
            torch.add(block, bias, out=raw)
        if delta_softplus:  # F.softplus (beta 1, threshold 20), which has no ``out=``
            torch.ops.aten.softplus.out(raw, 1, 20, out=out)

    def inputs(rows, start, stop, weight):
        b, real = rows.stop - rows.start, min(stop, length) - start
        dl, w = dl_buf[:b, :, :stop - start], w_buf[:b, :, :stop - start]
        discretise(delta[rows, :, start:start + real], dl[:, :, :real])
        torch.mul(dl[:, :, :real], u[rows, :, start:start + real], out=w[:, :, :real])
        dl[:, :, real:] = 0.0  # padding: decay 1, drive 0
        w[:, :, real:] = 0.0
        weight.copy_(w.transpose(1, 2))
        return dl_tm[:b, :stop - start].copy_(dl.transpose(1, 2))

    def emit(rows, start, stop, y):
        b, real = rows.stop - rows.start, min(stop, length) - start
        y_c = y_buf[:b, :, :real].copy_(y[:, :real].transpose(1, 2))
        if skip is not None:
            y_c.addcmul_(u[rows, :, start:start + real], skip)
        target = out[rows, :, start:start + real]
        if z is None:
            target.copy_(y_c)
        else:
            gate = F.silu(gate_buf[:b, :, :real].copy_(z[rows, :, start:start + real]),
                          inplace=True)
            torch.mul(y_c, gate, out=target)

    return out, _forward_tiles(inputs, emit, A, Bm, Cm, h0, padded)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> ScanResult:
    """Mamba-1 selective scan, fast chunked form (see the module docstring for the math).

    Args:
        u: ``(B, D, L)`` input.
        delta: ``(B, D, L)`` step sizes (before ``delta_bias`` and the optional softplus).
        A: ``(D, N)`` state matrix (diagonal per channel; real, usually negative).
        B, C: ``(D, N)``, ``(B, N, L)`` or ``(B, G, N, L)`` input and output projections.
        D: ``(D,)`` skip connection, or None.
        z: ``(B, D, L)`` gate (``out *= silu(z)``), or None.
        delta_bias: ``(D,)`` added to delta, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last token.
        initial_state: ``(B, D, N)`` state before the first token (zeros if None).

    Returns:
        ``out (B, D, L)`` in u's dtype, and with ``return_last_state`` the final state
        ``(B, D, N)`` in the accumulation dtype. Scanning ``[x1; x2]`` equals scanning ``x2``
        from the final state of ``x1``.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, time_dim=True)
    acc = accumulation_dtype(u.dtype)
    batch, channels, length = u.shape
    state0 = u.new_zeros(batch, channels, A.shape[1], dtype=acc) if initial_state is None \
        else initial_state.to(acc)
    if length == 0:
        out = u.new_zeros(u.shape)
        return (out, state0) if return_last_state else out
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                 for x in tensors)
    if scan_kernel.applies(*tensors):  # float32 on the CPU: the fused C kernel
        if needs_grad:
            out, last = scan_kernel.FusedSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias,
                                                             initial_state, delta_softplus)
        else:
            out, last = scan_kernel.selective_scan_forward(u, delta, A, B, C, D, z, delta_bias,
                                                           delta_softplus, initial_state)
        return (out, last) if return_last_state else out
    padded = _padded_length(length)
    A_t, state0_t = A.to(acc).T.contiguous(), state0.transpose(1, 2).contiguous()
    B_t, C_t = _time_major_bc(B, padded, acc), _time_major_bc(C, padded, acc)
    if not needs_grad:
        out, last = _fused_forward(u, delta, A_t, B_t, C_t, state0_t, D, z, delta_bias,
                                   delta_softplus, acc)
        return (out, last.transpose(1, 2)) if return_last_state else out
    delta_t = _discretise_delta(_swap_last(delta), delta_bias, delta_softplus, acc)
    u_t = _swap_last(u, acc)
    y, last = _SelectiveScan.apply(_pad_time(delta_t, padded), _pad_time(u_t, padded), A_t,
                                   B_t, C_t, state0_t)
    out = _output(_layout_like(y[:, :length], u), u, D, z, acc)
    return (out, last.transpose(1, 2)) if return_last_state else out
