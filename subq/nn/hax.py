"""The HAX-Mamba mixer (``[hax]``, Zhan et al., NeurIPS 2025, Fig. 3 and Sec. 4): a Mamba-1
mixer with a parallel sparse-attention branch over its post-conv SSM input.

For ``x (B, L, d_model)`` (``u`` = post-conv, post-SiLU SSM input, ``(B, L, d_inner)``):

    K, Q   = xx_proj(u)                  (d_inner -> 2 d_state, no bias); K <- K / sqrt(d_state)
    V      = u
    s_j    = MLP([K_j.detach(), normalize(sum_{p <= j} Q_p).detach()])   (key-selection score)
    attn   = softmax over S_i of (Q_i . K_j) V_j      (subq.ops.hax, one head, scale 1)
    y      = SSM(u, gate z) + E * attn * silu(z)      (E in R^{d_inner}, initialised to ones)
    out    = out_proj(y)

``S`` is chosen by ``sparse``: ``hax`` (sign-bit LSH + key selection, ``k_total // 2`` keys
each), ``lsh``, ``ks``, or the context-independent baselines ``window``, ``sink``,
``dilated`` (``dilation = max_length // k``), ``window+dilated`` and ``full`` (dense causal).
The LSH projections are redrawn every training forward (from the global RNG) and fixed in
eval (the ``projections`` buffer). The scoring MLP gets no gradient from the selection; it is
trained by the ranking loss (:func:`ranking_loss`), whose value times ``rank_weight``
(``alpha = 0.1``) a training forward leaves in ``self.aux_loss`` for the model to add.

``official_code_normalization=True`` reproduces the released code: the query summary is
normalised along the sequence and the LSH centre is the whole-sequence mean; both look at
future tokens (non-causal). The default normalises per token and centres by the prefix mean.

Decoding (``init_state``/``step``, and ``forward(x, state, return_state=True)`` to prefill or
continue) carries :class:`HaxMambaState`: Mamba's conv and SSM states, the running sum of the
queries (the scorer's query summary), and the ``hax`` op's own decoding cache
(:class:`subq.ops.hax.HaxCache`, through ``subq.init_state``/``subq.step``: the LSH codes and
recency of the live keys, their key-selection scores and top-k flags, the cached keys/values,
the centring sums). Stepping equals ``forward`` at every position (not with
``official_code_normalization``, which looks at future tokens). The LSH projections are the
fixed ``projections`` buffer (as in eval) in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from ..ops.hax import COMPONENTS, HaxCache
from ..ops.scan import selective_scan, selective_scan_step
from .mamba import Mamba, MambaState

SPARSE = tuple(COMPONENTS)


def pairwise_rank_targets(y: torch.Tensor) -> torch.Tensor:
    """``(..., n, n)`` targets ``(1[y_a > y_b] + 1[y_a >= y_b]) / 2`` in ``{0, 1/2, 1}``."""
    a, b = y[..., :, None], y[..., None, :]
    return ((a > b).to(y.dtype) + (a >= b).to(y.dtype)) / 2


def pairwise_ranking_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of ``x_a - x_b`` against :func:`pairwise_rank_targets` of ``y``
    over all ``n x n`` pairs; ``x, y (..., n)``."""
    logits = x[..., :, None] - x[..., None, :]
    return F.binary_cross_entropy_with_logits(logits, pairwise_rank_targets(y.detach()))


def ranking_loss(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_keys: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The key-selection ranking loss: ``num_keys`` random key positions ``I`` per sequence,
    targets ``y_j = sum_{i >= I_j} sigmoid(q_i . k_{I_j})`` (the detached linear-attention mass
    the key receives), pairwise loss of ``scores (B, L)`` at ``I``. ``q, k (B, L, d)``."""
    batch, length = scores.shape
    n = min(num_keys, length)
    picks = torch.rand(batch, length, generator=generator,
                       device=scores.device).argsort(-1)[:, :n]              # (B, n)
    k_sel = k.detach().gather(1, picks[..., None].expand(-1, -1, k.shape[-1]))
    mass = torch.sigmoid(q.detach() @ k_sel.transpose(1, 2))                 # (B, L, n)
    later = torch.arange(length, device=q.device)[None, :, None] >= picks[:, None, :]
    y = (mass * later).sum(1)
    return pairwise_ranking_loss(scores.gather(1, picks), y)


@dataclass
class HaxMambaState:
    """The decoding state of :class:`HaxMamba`: ``mamba`` (conv ``(B, d_inner, d_conv - 1)``
    and SSM ``(B, d_inner, d_state)`` states), ``q_sum (B, d_state)`` (the sum of the queries so
    far: the scorer's query summary before normalisation) and ``attention``, the ``hax`` op's
    cache for one head (``head_dim = d_state``, ``value_dim = d_inner``)."""

    mamba: MambaState
    q_sum: torch.Tensor
    attention: HaxCache


class HaxMamba(Mamba):
    """Mamba-1 mixer plus the HAX sparse-attention branch ``(B, L, d_model) -> same``.

    Extra arguments (defaults as the paper's joint-recall runs): ``sparse="hax"`` (one of
    ``SPARSE``), ``k_total=64``, ``num_hash=8``, ``hash="sign"``, ``max_length=2048`` (sets the
    dilation), ``rank_weight=0.1``, ``official_code_normalization=False``.
    """

    def __init__(self, d_model: int, d_state: int = 16, *, sparse: str = "hax",
                 k_total: int = 64, num_hash: int = 8, hash: str = "sign",
                 max_length: int = 2048, rank_weight: float = 0.1,
                 official_code_normalization: bool = False, **mamba_kwargs) -> None:
        super().__init__(d_model, d_state, **mamba_kwargs)
        if sparse not in SPARSE:
            raise ValueError(f"sparse must be one of {SPARSE}, got {sparse!r}")
        per = k_total // len(COMPONENTS[sparse])
        if per < 1:
            raise ValueError(f"k_total must give each of {COMPONENTS[sparse]} >= 1 key, "
                             f"got {k_total}")
        self.sparse, self.rank_weight = sparse, rank_weight
        self.official = official_code_normalization
        self.options = dict(arch=sparse, k_lsh=per, k_ks=per, window=per, sinks=per,
                            dilation=max(1, max_length // per), num_hash=num_hash, hash=hash,
                            center="sequence_mean" if self.official else "prefix_mean")
        self.xx_proj = nn.Linear(self.d_inner, 2 * d_state, bias=False)
        self.gate = nn.Parameter(torch.ones(self.d_inner))
        self.register_buffer("projections", torch.randn(d_state, num_hash))
        self.scorer = None
        if "ks" in COMPONENTS[sparse]:
            self.scorer = nn.Sequential(
                nn.Linear(2 * d_state, 2 * d_state), nn.ReLU(),
                nn.Linear(2 * d_state, 2 * d_state), nn.ReLU(),
                nn.Linear(2 * d_state, 1))
        self.aux_loss = torch.zeros(())

    def key_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` scores of the keys from ``[k, normalize(prefix sum of q)]`` (detached)."""
        summary = F.normalize(q.detach().cumsum(1), dim=1 if self.official else -1)
        return self.scorer(torch.cat([k.detach(), summary], dim=-1))[..., 0]

    @property
    def decodes(self) -> bool:
        """Whether ``step`` is available: not with ``official_code_normalization`` (its query
        summary and LSH centre look at future tokens)."""
        return not self.official

    def _qk(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u (..., d_inner)`` -> ``q, k (..., d_state)`` (``k`` scaled by ``d_state^-1/2``)."""
        k, q = self.xx_proj(u).chunk(2, dim=-1)
        return q, k / math.sqrt(self.d_state)

    def _op_options(self) -> dict:
        """The ``hax`` op's options for a full forward (``projections`` redrawn in training)."""
        options = dict(self.options)
        if "lsh" in COMPONENTS[self.sparse]:
            options["projections"] = (torch.randn_like(self.projections) if self.training
                                      else self.projections)
        return options

    def sparse_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The attention branch on ``u (B, L, d_inner)``; sets ``self.aux_loss``."""
        q, k = self._qk(u)
        options = self._op_options()
        self.aux_loss = u.new_zeros(())
        if self.scorer is not None:
            scores = self.key_scores(q, k)
            options["key_scores"] = scores[:, None]
            if self.training:
                self.aux_loss = self.rank_weight * ranking_loss(scores, q, k,
                                                                self.options["k_ks"])
        out = api.attention(q[:, None], k[:, None], u[:, None], method="hax", causal=True,
                            scale=1.0, **options)
        return out[:, 0]

    def forward(self, x: torch.Tensor, state: HaxMambaState | None = None,
                return_state: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, HaxMambaState]:
        """``x (B, L, d_model)`` -> ``(B, L, d_model)``.

        With ``state`` (continue after it) or ``return_state`` (also return the state after
        the last token), the Mamba part runs as one scan from the state and the attention
        branch steps the ``hax`` op's decoding cache token by token (the op has no
        prefill-to-cache); the result equals stepping. Without either: the fast path.
        """
        if state is None and not return_state:
            xs, z = self.in_proj(x).chunk(2, dim=-1)
            u = F.silu(self.conv1d(F.pad(xs.transpose(1, 2), (self.d_conv - 1, 0))))
            delta, b, c = self._ssm_inputs(u.transpose(1, 2))
            y = selective_scan(u, delta.transpose(1, 2), -torch.exp(self.A_log),
                               b.transpose(1, 2), c.transpose(1, 2), D=self.D,
                               z=z.transpose(1, 2), delta_bias=self.dt_proj.bias,
                               delta_softplus=True).transpose(1, 2)
            attn = self.sparse_attention(u.transpose(1, 2))
            return self.out_proj(y + self.gate * attn * F.silu(z))
        if state is None:
            state = self.init_state(x.shape[0], x.dtype, x.device)
        self.aux_loss = x.new_zeros(())
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv_in = torch.cat([state.mamba.conv.to(x.dtype), xs.transpose(1, 2)], dim=-1)
        u = F.silu(self.conv1d(conv_in))  # (B, d_inner, L): the conv state is the left pad
        delta, b, c = self._ssm_inputs(u.transpose(1, 2))
        y, ssm = selective_scan(u, delta.transpose(1, 2), -torch.exp(self.A_log),
                                b.transpose(1, 2), c.transpose(1, 2), D=self.D,
                                z=z.transpose(1, 2), delta_bias=self.dt_proj.bias,
                                delta_softplus=True, return_last_state=True,
                                initial_state=state.mamba.ssm)
        u = u.transpose(1, 2)
        q, k = self._qk(u)
        q_sums = torch.cat([state.q_sum[:, None].to(q.dtype), q.detach()], 1).cumsum(1)[:, 1:]
        cache, outs = state.attention, []
        for t in range(x.shape[1]):
            attn_t, cache = self._attend(q[:, t], k[:, t], u[:, t], q_sums[:, t], cache)
            outs.append(attn_t)
        attn = torch.stack(outs, 1) if outs else torch.zeros_like(u)
        out = self.out_proj(y.transpose(1, 2) + self.gate * attn * F.silu(z))
        new = HaxMambaState(MambaState(conv_in[..., conv_in.shape[-1] - (self.d_conv - 1):],
                                       ssm),
                            q_sums[:, -1] if x.shape[1] else state.q_sum, cache)
        return (out, new) if return_state else out

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> HaxMambaState:
        """An empty state: zero Mamba states and query sum, an empty ``hax`` cache (holding
        the ``projections`` buffer as its LSH projections)."""
        if not self.decodes:
            raise NotImplementedError("HaxMamba cannot decode with "
                                      "official_code_normalization=True: its query summary and "
                                      "LSH centre depend on future tokens")
        options = dict(self.options)
        if "lsh" in COMPONENTS[self.sparse]:
            options["projections"] = self.projections
        cache = api.init_state("hax", batch=batch, kv_heads=1, head_dim=self.d_state,
                               value_dim=self.d_inner, dtype=dtype, device=device, **options)
        return HaxMambaState(super().init_state(batch, dtype, device),
                             torch.zeros(batch, self.d_state, dtype=dtype, device=device), cache)

    def _attend(self, q_t: torch.Tensor, k_t: torch.Tensor, u_t: torch.Tensor,
                q_sum: torch.Tensor, cache: HaxCache) -> tuple[torch.Tensor, HaxCache]:
        """One token of the attention branch: ``q_t, k_t, q_sum (B, d_state)``, ``u_t (B,
        d_inner)`` (``q_sum`` includes ``q_t``) -> ``(attn_t (B, d_inner), new cache)``."""
        options = dict(self.options)
        if self.scorer is not None:
            summary = F.normalize(q_sum, dim=-1)
            score = self.scorer(torch.cat([k_t.detach(), summary], dim=-1))  # (B, 1)
            options["key_scores"] = score[:, None]
        out, cache = api.step(q_t[:, None, None], k_t[:, None, None], u_t[:, None, None], cache,
                              method="hax", scale=1.0, **options)
        return out[:, 0, 0], cache

    def step(self, x_t: torch.Tensor, state: HaxMambaState
             ) -> tuple[torch.Tensor, HaxMambaState]:
        """One token ``x_t (B, d_model)`` -> ``(out_t (B, d_model), new state)``.

        Cost per step: Mamba's step, O(d_model d_inner + d_inner d_state), plus the ``hax``
        op's step over its ``N`` cached keys, O(N (d_state + d_inner)) time and memory. The
        cache holds the keys live in any sequence of the batch; per sequence at most
        ``min(t, 2^num_hash k_lsh + k_ks)`` for ``sparse="hax"`` (``num_hash k_lsh + k_ks``
        with ``hash="argmax"``); ``window``/``sink`` keep a bounded set, ``dilated`` one key
        per ``dilation`` tokens, ``full`` every token.
        """
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)
        window = torch.cat([state.mamba.conv.to(x_t.dtype), xs[..., None]], dim=-1)
        u = F.silu((window * self.conv1d.weight[:, 0]).sum(-1)
                   + (0 if self.conv1d.bias is None else self.conv1d.bias))
        delta, b, c = self._ssm_inputs(u)
        y, ssm = selective_scan_step(state.mamba.ssm, u, delta, -torch.exp(self.A_log), b, c,
                                     D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                     delta_softplus=True)
        q, k = self._qk(u)
        q_sum = state.q_sum.to(q.dtype) + q.detach()
        attn, cache = self._attend(q, k, u, q_sum, state.attention)
        out = self.out_proj(y + self.gate * attn * F.silu(z))
        return out, HaxMambaState(MambaState(window[..., 1:], ssm), q_sum, cache)
