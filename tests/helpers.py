"""Shared test helpers: relative RMS error, random inputs, calls with a mechanism's options, a
diffusion model that knows its x_0, a word-level stand-in for a tokenizer."""

from __future__ import annotations

import re

import torch

import subq
from subq.registry import Mechanism, Pattern


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64; 0 for two empty or two all-zero tensors."""
    ref, out = ref.detach().double(), out.detach().double()
    denom = ref.pow(2).mean().sqrt()
    num = (ref - out).pow(2).mean().sqrt()
    if denom == 0:
        return float(num)
    return float(num / denom)


def random_qkv(batch=2, q_heads=4, kv_heads=2, lq=33, lk=None, dim=16, value_dim=None,
               dtype=torch.float64, requires_grad=False, generator=None):
    """Fresh normal q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)."""
    lk = lq if lk is None else lk
    value_dim = dim if value_dim is None else value_dim
    shapes = [(batch, q_heads, lq, dim), (batch, kv_heads, lk, dim),
              (batch, kv_heads, lk, value_dim)]
    return [torch.randn(s, dtype=dtype, generator=generator).requires_grad_(requires_grad)
            for s in shapes]


def pattern_lengths(pattern: Pattern, length: int) -> tuple[int, int]:
    """(Lq, Lk) for a pattern: equal for self attention, different for cross attention."""
    if pattern.cross:
        return length, length + 13
    return length, length


def call_options(mech: Mechanism, q, k, v) -> dict:
    """The mechanism's test options plus the tensor options it needs for these inputs."""
    generator = torch.Generator().manual_seed(1234)
    options = dict(mech.test_options)
    options.update(mech.sample_options(q, k, v, generator=generator))
    return options


def run(fn_name: str, mech: Mechanism, pattern: Pattern, q, k, v, **kwargs):
    """``subq.attention`` / ``subq.reference`` for one mechanism and pattern."""
    fn = {"fast": subq.attention, "reference": subq.reference}[fn_name]
    options = call_options(mech, q, k, v)
    options.update(kwargs)
    return fn(q, k, v, method=mech.name, causal=pattern.causal, cross=pattern.cross, **options)


def diffusion_oracle(diffusion, x0: torch.Tensor):
    """``model_fn(x, t)`` that knows ``x0``: the noise that explains ``x_t`` under ``diffusion``
    (a possibly respaced :class:`~subq.recipes.gaussian_diffusion.GaussianDiffusion`, called
    with its original timesteps), with the variance output ``v = -1``."""
    inverse = {int(s): i for i, s in enumerate(diffusion.timestep_map)}

    def model_fn(x, t):
        own = torch.tensor([inverse[int(s)] for s in t])
        eps = diffusion.eps_from_x0(x, own, x0)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model_fn


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: words (with their leading space), punctuation
    and newlines as tokens, ids on first sight (0 is the end of sequence). Words listed in
    ``split`` encode as two tokens."""

    eos_token_id = 0

    def __init__(self, split: tuple[str, ...] = ()) -> None:
        self.ids: dict[str, int] = {"<eos>": self.eos_token_id}
        self.split = split

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = []
        for piece in re.findall(r" ?\w+|[^\w ]|\n", text):
            pieces += [piece[:2], piece[2:]] if piece.strip() in self.split else [piece]
        return [self.ids.setdefault(p, len(self.ids)) for p in pieces]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.encode(t) for t in texts]}

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.ids.items()}
        return "".join(words[int(i)] for i in ids)
