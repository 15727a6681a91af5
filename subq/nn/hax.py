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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention
from ..ops.hax import COMPONENTS
from ..ops.scan import selective_scan
from .mamba import Mamba

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

    def sparse_attention(self, u: torch.Tensor) -> torch.Tensor:
        """The attention branch on ``u (B, L, d_inner)``; sets ``self.aux_loss``."""
        k, q = self.xx_proj(u).chunk(2, dim=-1)
        k = k / math.sqrt(self.d_state)
        options = dict(self.options)
        self.aux_loss = u.new_zeros(())
        if "lsh" in COMPONENTS[self.sparse]:
            options["projections"] = (torch.randn_like(self.projections) if self.training
                                      else self.projections)
        if self.scorer is not None:
            scores = self.key_scores(q, k)
            options["key_scores"] = scores[:, None]
            if self.training:
                self.aux_loss = self.rank_weight * ranking_loss(scores, q, k,
                                                                self.options["k_ks"])
        out = attention(q[:, None], k[:, None], u[:, None], method="hax", causal=True,
                        scale=1.0, **options)
        return out[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L, d_model)`` -> ``(B, L, d_model)``."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(F.pad(xs.transpose(1, 2), (self.d_conv - 1, 0))))
        delta, b, c = self._ssm_inputs(u.transpose(1, 2))
        y = selective_scan(u, delta.transpose(1, 2), -torch.exp(self.A_log), b.transpose(1, 2),
                           c.transpose(1, 2), D=self.D, z=z.transpose(1, 2),
                           delta_bias=self.dt_proj.bias, delta_softplus=True).transpose(1, 2)
        attn = self.sparse_attention(u.transpose(1, 2))
        return self.out_proj(y + self.gate * attn * F.silu(z))

    def step(self, x_t: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """Not available: Mamba's step would silently drop the attention branch."""
        raise NotImplementedError("HaxMamba does not decode token by token yet; the sparse "
                                  "attention decodes through subq.step(method='hax')")
