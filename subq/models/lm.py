"""A small decoder-only byte language model whose token mixer is chosen by name, for training
experiments that compare mechanisms at equal parameter counts.

    x      = embed(tokens)                                    (B, L, d_model)
    x      = x + mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))      (n_layers times)
    logits = RMSNorm(x) @ embed.weight^T                      (head tied to the embedding)

Mixers (``MIXERS``):

* every registered mechanism with the causal self pattern, as multi-head attention with RoPE
  on q and k and grouped-query heads (:class:`subq.nn.scout.RopeAttention`), except two that
  own parameters: ``ntk`` adds the learned prefix summaries ``Z, k`` of
  :class:`subq.nn.ntk.NTKPrefix` (zero-initialised; ``|k|`` has zero gradient at 0, so only
  ``Z`` learns from there), and ``kernelized_rpe`` is :class:`CausalKernelizedRPE` (a learned
  relative-position table and no RoPE; its ``feature_map``/``normalize`` options make the
  PRF and no-normalisation baselines mixers of the same grid);
* ``mamba`` (:class:`subq.nn.mamba.Mamba`, no RoPE) and ``mamba+hax``
  (:class:`subq.nn.hax.HaxMamba`; its ranking loss is :meth:`LM.aux_loss`); both decode token
  by token (``mamba+hax`` not with ``official_code_normalization``, which sees the future);
* ``scout+swa`` and ``scout+mamba``: :class:`subq.nn.scout.ScoutBlock` layers. A SCOUT block
  is two mixers and two MLPs, so one SCOUT block replaces two plain blocks: the LM has
  ``n_layers // 2`` of them (``n_layers`` must be even) and the same number of MLPs;
* ``fixed`` and ``axial``: the sparse patterns Combiner approximates with region summaries
  (:class:`SparseBaselineAttention`: Sparse Transformer's fixed pattern and row + column axial
  attention), the baselines of "Combiner-X beats X".

Equal parameters: with ``match_params`` (the default) the SwiGLU width of every mixer but
``dense`` is solved so that the LM has as many parameters as the dense LM of the same config
(:func:`matched_mlp_hidden`); what a mixer adds or saves is taken from (or given to) its MLPs.

Options (``LMConfig.options``) go to the mixer; ``DEFAULT_OPTIONS`` are chosen for training
lengths of about 256 and evaluation up to 4x that: sparse patterns see about 64 keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import subq

from .. import registry
from ..nn.hax import HaxMamba
from ..nn.mamba import Mamba
from ..nn.norm import RMSNorm
from ..nn.ntk import NTKPrefix
from ..nn.rpe import KernelizedRPEAttention
from ..nn.scout import AttentionState, RopeAttention, ScoutBlock, SwiGLU
from ..ops.masks import axial_sparse_mask, fixed_sparse_mask
from ..ops.reference import masked_attention
from .counting import num_parameters

_MECHANISMS = tuple(m.name for m in registry.mechanisms()
                    if registry.Pattern.CAUSAL_SELF in m.patterns)
_SCOUT = {"scout+swa": "swa", "scout+mamba": "mamba"}
MIXERS: tuple[str, ...] = (*_MECHANISMS, "mamba", "mamba+hax", *_SCOUT, "fixed", "axial")

#: Per-mixer options for training at L ~ 256 (evaluation to 4x), so that each sparse pattern
#: sees about 64 keys of 256:
#:
#: * ``local``: 63 keys before the query + itself; ``scout+swa``: a 64-key window (its
#:   ``window`` counts the query) and SCOUT's segment 10 (the paper's); ``scout``: segment 10;
#: * ``hip``: sink 4 + top-32 keys (16 blocks of 2) + window 32 + the 8-query block; ``refresh
#:   = block_q``, so decoding equals the prefill exactly;
#: * ``hax``: 16 LSH + 16 selected keys, 2^4 sign buckets (about 16 of 256 keys per bucket);
#:   ``mamba+hax``: the same split of ``k_total = 32`` (its dilation follows ``max_len``);
#: * ``combiner``, ``fixed``, ``axial``: span 16 = sqrt(256), fixed rather than Combiner's
#:   ``ceil(sqrt(L))`` so that the pattern does not change with the length (prefix
#:   consistency across lengths, generation, evaluation at 4x);
#: * ``kernelized_rpe``: the mechanism's defaults, written out; ``mamba``: mamba-ssm's.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    **{name: {} for name in MIXERS},
    "local": {"window": 63},
    "kernelized_rpe": {"num_features": 32, "feature_map": "prf", "normalize": True},
    "combiner": {"variant": "fixed", "span": 16, "summary": "max"},
    "hip": {"topk": 32, "block_q": 8, "block_k": 2, "sink": 4, "window": 32, "refresh": 8},
    "scout": {"segment": 10},
    "hax": {"k_lsh": 16, "k_ks": 16, "num_hash": 4},
    "mamba+hax": {"k_total": 32, "num_hash": 4},
    "scout+swa": {"window": 64, "segment": 10},
    "scout+mamba": {"segment": 10},
    "fixed": {"span": 16},
    "axial": {"span": 16},
}

#: Model sizes: ``tiny`` for tests and quick runs, ``mini`` (0.82M parameters) for the
#: efficacy grid (every mixer of it on 2 cores in about 90 minutes), ``small`` (about 3.2M
#: parameters) for longer experiments.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "heads": 4},
    "mini": {"d_model": 128, "n_layers": 4, "heads": 4},
    "small": {"d_model": 256, "n_layers": 4, "heads": 4},
}


def _check_mixer(mixer: str) -> None:
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; valid mixers: {', '.join(MIXERS)}")


@dataclass
class LMConfig:
    """The LM's shape and mixer.

    Args:
        vocab_size: tokens (256: bytes).
        d_model, n_layers, heads: widths and depth (scout mixers: ``n_layers // 2`` blocks).
        kv_heads: key/value heads of the RoPE attention mixers (``None``: ``heads``).
        mlp_hidden: SwiGLU width of the dense LM (``None``: ``round(8/3 d_model)``); other
            mixers get :func:`matched_mlp_hidden` when ``match_params``.
        mixer: a name from ``MIXERS``.
        options: the mixer's options (:func:`lm_config` fills ``DEFAULT_OPTIONS``).
        rope_theta: RoPE base of the attention mixers.
        max_len: the longest sequence the model must handle, evaluation included; sizes the
            learned relative-position table of ``kernelized_rpe``.
        match_params: solve the SwiGLU width for dense's parameter count.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    mlp_hidden: int | None = None
    mixer: str = "dense"
    options: dict[str, Any] = field(default_factory=dict)
    rope_theta: float = 10000.0
    max_len: int = 1024
    match_params: bool = True

    def __post_init__(self) -> None:
        _check_mixer(self.mixer)
        if self.mixer in _SCOUT and self.n_layers % 2:
            raise ValueError(f"mixer {self.mixer!r} stacks one SCOUT block per two layers; "
                             f"n_layers must be even, got {self.n_layers}")


def lm_config(preset: str, mixer: str, **overrides: Any) -> LMConfig:
    """The config of ``preset`` (``PRESETS``) with ``mixer``, its ``DEFAULT_OPTIONS`` updated
    by ``overrides["options"]``, and any other field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    _check_mixer(mixer)
    unknown = sorted(set(overrides) - {f.name for f in fields(LMConfig)})
    if unknown:
        raise ValueError(f"unknown LMConfig field(s) {unknown}")
    options = {**DEFAULT_OPTIONS[mixer], **overrides.pop("options", {})}
    return LMConfig(**{**PRESETS[preset], **overrides, "mixer": mixer, "options": options})


class NTKRopeAttention(RopeAttention):
    """:class:`RopeAttention` by ``ntk`` with learned prefix summaries ``prefix.z (1, heads,
    head_dim, head_dim)`` and ``prefix.kz (1, heads, head_dim)``; decodes."""

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None,
                 rope_theta: float = 10000.0) -> None:
        super().__init__(d_model, heads, kv_heads, "ntk", rope_theta)
        self.prefix = NTKPrefix(heads, self.head_dim)

    def _summaries(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"z": self.prefix.z.to(dtype), "kz": self.prefix.kz.to(dtype)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, 0)
        return self._out(self.prefix(q, k, v, causal=True))

    def step(self, x_t: torch.Tensor, state: AttentionState
             ) -> tuple[torch.Tensor, AttentionState]:
        q, k, v = self._qkv(x_t[:, None], state.position)
        y, cache = subq.step(q, k, v, state.cache, method="ntk", **self._summaries(q.dtype))
        return self._out(y)[:, 0], AttentionState(cache, state.position + 1)


class CausalKernelizedRPE(KernelizedRPEAttention):
    """Causal 1-D :class:`subq.nn.rpe.KernelizedRPEAttention` (learned RPE table for offsets
    up to ``max_len - 1``, no RoPE) with the mechanism's feature map exposed:
    ``feature_map="prf"`` (or ``"trf"``), ``normalize=True`` (NPRF; ``False``: Performer's PRF),
    ``rpe=True`` (``False``: no table, no length limit), ``num_features=32``,
    ``shared_bias=False``, ``redraw=False``, ``seed=0``. No decoding."""

    def __init__(self, d_model: int, heads: int, max_len: int, **options: Any) -> None:
        super().__init__(d_model, heads, max_len, causal=True, **options)


class SparseBaselineAttention(RopeAttention):
    """Causal softmax attention over the fixed sparse pattern of a baseline that Combiner
    approximates with region summaries, so that "Combiner-X beats X" can be measured:
    ``"fixed"`` (Sparse Transformer: own span of ``span`` tokens plus the last ``summary``
    tokens of every earlier span, :func:`subq.ops.masks.fixed_sparse_mask`) and ``"axial"``
    (own row of ``span`` tokens plus the same column of every earlier row,
    :func:`subq.ops.masks.axial_sparse_mask`). Combiner keeps the same direct keys (own
    span / own row) and replaces the rest by summaries of whole regions.

    A boolean mask through the dense masked softmax: O(L^2) time and memory, meant for the
    short lengths of these experiments. No decoding. Defaults ``span=16``, ``summary=1``.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None,
                 rope_theta: float = 10000.0, *, variant: str, span: int = 16,
                 summary: int = 1) -> None:
        super().__init__(d_model, heads, kv_heads, "dense", rope_theta)
        if variant not in ("fixed", "axial"):
            raise ValueError(f"variant must be 'fixed' or 'axial', got {variant!r}")
        if not isinstance(span, int) or span < 1:
            raise ValueError(f"span must be a positive int, got {span!r}")
        if not isinstance(summary, int) or not 1 <= summary <= span:
            raise ValueError(f"summary must be an int in [1, span], got {summary!r}")
        if variant == "axial" and summary != 1:
            raise ValueError("summary is an option of 'fixed' only")
        self.variant, self.span, self.summary = variant, span, summary

    def allowed(self, length: int, device: torch.device) -> torch.Tensor:
        """The ``(L, L)`` boolean pattern."""
        if self.variant == "fixed":
            return fixed_sparse_mask(length, self.span, self.summary, device)
        return axial_sparse_mask(length, self.span, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, 0)
        allowed = self.allowed(x.shape[1], x.device)
        return self._out(masked_attention(q, k, v, allowed, self.head_dim ** -0.5))


class MixerBlock(nn.Module):
    """``x = x + mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))`` on ``(B, L, d_model)``."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int) -> None:
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(d_model), mixer
        self.mlp_norm, self.mlp = RMSNorm(d_model), SwiGLU(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Any:
        return self.mixer.init_state(batch, dtype, device)

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """``x_t (B, d_model)`` -> ``(out_t (B, d_model), new state)``."""
        mixed, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + mixed
        return x_t + self.mlp(self.mlp_norm(x_t)), state


def _mixer(config: LMConfig) -> nn.Module:
    """One token mixer of ``config`` (not a SCOUT block)."""
    name, d, options = config.mixer, config.d_model, config.options
    heads, kv_heads, theta = config.heads, config.kv_heads, config.rope_theta
    if name == "mamba":
        return Mamba(d, **options)
    if name == "mamba+hax":
        return HaxMamba(d, **{"max_length": config.max_len, **options})
    if name in ("fixed", "axial"):
        return SparseBaselineAttention(d, heads, kv_heads, theta, variant=name, **options)
    if name == "kernelized_rpe":
        return CausalKernelizedRPE(d, heads, config.max_len, **options)
    if name == "ntk":
        if options:
            raise ValueError(f"mixer 'ntk' takes no options, got {sorted(options)}")
        return NTKRopeAttention(d, heads, kv_heads, theta)
    registry.get(name).resolve_options(options)
    return RopeAttention(d, heads, kv_heads, name, theta, **options)


def _layers(config: LMConfig, mlp_hidden: int) -> nn.ModuleList:
    if config.mixer in _SCOUT:
        return nn.ModuleList(
            ScoutBlock(config.d_model, config.heads, config.kv_heads, mlp_hidden,
                       _SCOUT[config.mixer], rope_theta=config.rope_theta, **config.options)
            for _ in range(config.n_layers // 2))
    return nn.ModuleList(MixerBlock(_mixer(config), config.d_model, mlp_hidden)
                         for _ in range(config.n_layers))


def _dense_hidden(config: LMConfig) -> int:
    return round(8 * config.d_model / 3) if config.mlp_hidden is None else config.mlp_hidden


def matched_mlp_hidden(config: LMConfig) -> int:
    """The SwiGLU width that gives ``config``'s LM the parameter count of the dense LM of the
    same config (``config.mlp_hidden``'s width for ``dense``).

    Every mixer has ``n_layers`` SwiGLUs of ``3 d_model h`` parameters, so with ``P(h)`` the
    layers' count at width ``h``: ``h = 1 + round((P_dense - P(1)) / (3 d_model n_layers))``,
    within ``1.5 d_model n_layers`` parameters of dense. Counted on the meta device.
    """
    hidden = _dense_hidden(config)
    if config.mixer == "dense":
        return hidden
    with torch.device("meta"):
        target = num_parameters(_layers(replace(config, mixer="dense", options={}), hidden))
        probe = num_parameters(_layers(config, 1))
    solved = 1 + round((target - probe) / (3 * config.d_model * config.n_layers))
    if solved < 1:
        raise ValueError(f"mixer {config.mixer!r} alone has more parameters than the dense LM "
                         f"at d_model={config.d_model}; no SwiGLU width matches it")
    return solved


def _decodes(layer: nn.Module) -> bool:
    if isinstance(layer, ScoutBlock):
        return True
    mixer = layer.mixer
    if isinstance(mixer, (SparseBaselineAttention, CausalKernelizedRPE)):
        return False
    if isinstance(mixer, HaxMamba):
        return mixer.decodes
    if isinstance(mixer, RopeAttention):
        return registry.get(mixer.method).decodes
    return isinstance(mixer, Mamba)


def _check_tokens(tokens: Any, name: str) -> None:
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2
            or tokens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be an integer tensor (B, L), got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")


class LM(nn.Module):
    """The byte LM of ``config``: ``forward(tokens (B, L) int64) -> logits (B, L, vocab)``.
    The tied embedding starts at N(0, 0.02^2) (nanoGPT's), other layers at their own inits.

    ``mlp_hidden`` is the SwiGLU width in use; ``can_decode`` says whether every layer steps
    token by token (``init_state``/``step``); ``generate`` is greedy either way.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp_hidden = (matched_mlp_hidden(config) if config.match_params
                           else _dense_hidden(config))
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = _layers(config, self.mlp_hidden)
        self.norm = RMSNorm(config.d_model)

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model accepts (``None``: any)."""
        uses_table = (self.config.mixer == "kernelized_rpe"
                      and self.config.options.get("rpe", True))
        return self.config.max_len if uses_table else None

    def supports_length(self, length: int) -> bool:
        return self.max_length is None or length <= self.max_length

    @property
    def can_decode(self) -> bool:
        return all(_decodes(layer) for layer in self.layers)

    def num_parameters(self) -> int:
        """Parameters, the tied embedding counted once."""
        return num_parameters(self)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.embed.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, "tokens")
        if not self.supports_length(tokens.shape[1]):
            raise ValueError(f"length {tokens.shape[1]} exceeds max_length={self.max_length} "
                             f"of mixer {self.config.mixer!r}")
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self._logits(x)

    def aux_loss(self) -> torch.Tensor:
        """The mixers' auxiliary losses of the last forward (HAX's weighted ranking loss in
        training mode), to add to the LM loss; zero for other mixers."""
        total = self.embed.weight.new_zeros(())
        for module in self.modules():
            if isinstance(module, HaxMamba):
                total = total + module.aux_loss
        return total

    def init_state(self, batch: int) -> list[Any]:
        """Empty decoding states of every layer (needs ``can_decode``)."""
        if not self.can_decode:
            raise NotImplementedError(f"mixer {self.config.mixer!r} does not decode")
        weight = self.embed.weight
        return [layer.init_state(batch, weight.dtype, weight.device) for layer in self.layers]

    def step(self, token: torch.Tensor, state: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One token per sequence ``(B,)`` -> ``(logits (B, vocab), new state)``."""
        x = self.embed(token)
        new_state = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            x, layer_state = layer.step(x, layer_state)
            new_state.append(layer_state)
        return self._logits(x), new_state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation ``(B, L0) -> (B, L0 + new_tokens)``: by stepping every token
        when ``can_decode``, else by a full forward per new token. Deterministic in eval mode
        (HAX-Mamba redraws its hashes in training mode)."""
        _check_tokens(prompt, "prompt")
        if prompt.shape[1] < 1 or new_tokens < 0:
            raise ValueError(f"need a prompt of >= 1 token and new_tokens >= 0, got "
                             f"{tuple(prompt.shape)}, {new_tokens}")
        if not self.supports_length(prompt.shape[1] + new_tokens):
            raise ValueError(f"{prompt.shape[1]} + {new_tokens} tokens exceed max_length="
                             f"{self.max_length} of mixer {self.config.mixer!r}")
        tokens = prompt
        if not self.can_decode:
            for _ in range(new_tokens):
                nxt = self(tokens)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)
            return tokens
        state = self.init_state(prompt.shape[0])
        for t in range(prompt.shape[1]):
            logits, state = self.step(prompt[:, t], state)
        for i in range(new_tokens):
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if i + 1 < new_tokens:
                logits, state = self.step(nxt, state)
        return tokens
