"""The libraries a user would otherwise pick, wrapped to subq's ``(B, H, L, D)`` contract.

Each peer is a :class:`Peer`: a name, the patterns it is measured on, and ``build(q, k, v,
pattern)`` returning a function of ``(q, k, v)`` with ``q, k, v (B, H, L, D) -> (B, H, L, D)``
(the benchmark uses ``Lq == Lk``; cross patterns pass separate keys). Only the attention core
of each library is timed: no projections, no output layer. A peer whose package does not
import is listed in :data:`MISSING` with the reason, and the benchmark reports it as missing.

- ``performer-pytorch``: FAVOR+ ``FastAttention`` (``nb_features = int(D ln D)``, orthogonal
  softmax-kernel features); noncausal for NS/NC/CC (each row depends on its own query only),
  its non-CUDA causal prefix-sum form for CS.
- ``nystrom-attention``: ``NystromAttention`` with 256 landmarks, 6 pinv iterations, no
  residual conv; its q/k/v projection and output layer are replaced by identities. NS.
- ``local-attention``: ``LocalAttention(window_size=256)`` (buckets of 256 that look one
  bucket back, and one forward when noncausal), no rotary embedding. NS, CS.
- ``reformer-pytorch``: ``LSHAttention`` (bucket 64, 8 hashes), shared-QK as in Reformer: the
  queries serve as keys. NS, CS.
- ``fla`` (fla-core): the pure-PyTorch ``naive_chunk_linear_attn`` (1 + elu feature map,
  normalised) and ``naive_chunk_simple_gla`` (per-head decay ``1 - 2^-(5 + h)``, as RetNet),
  loaded from their files so that the Triton kernels of ``fla.ops`` are never imported. CS.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..registry import ALL_PATTERNS, SELF_PATTERNS, Pattern

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Peer:
    """One peer implementation: ``build(q, k, v, pattern)`` returns the call to time."""

    name: str
    package: str
    patterns: frozenset[Pattern]
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Pattern], Attend]


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _performer(module) -> Peer:
    def build(q, k, v, pattern):
        dim = q.shape[-1]
        attn = module.FastAttention(dim, nb_features=int(dim * math.log(dim)),
                                    causal=pattern is Pattern.CAUSAL_SELF).to(q.device)
        return lambda q, k, v: attn(q, k, v)
    return Peer("performer", "performer-pytorch", ALL_PATTERNS, build)


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _nystrom(module) -> Peer:
    def build(q, k, v, pattern):
        heads, dim = q.shape[1], q.shape[-1]
        attn = module.NystromAttention(dim=3 * heads * dim, dim_head=dim, heads=heads,
                                       num_landmarks=256, pinv_iterations=6, residual=False)
        attn.to_qkv, attn.to_out = _Identity(), _Identity()
        attn = attn.to(q.device)

        def call(q, k, v):
            b, h, n, d = q.shape
            x = torch.cat([_heads_last(t).reshape(b, n, h * d) for t in (q, k, v)], dim=-1)
            return attn(x).view(b, n, h, d).transpose(1, 2)
        return call
    return Peer("nystromformer", "nystrom-attention", frozenset({Pattern.NONCAUSAL_SELF}), build)


def _local(module) -> Peer:
    def build(q, k, v, pattern):
        attn = module.LocalAttention(window_size=256, causal=pattern.causal, autopad=True,
                                     use_rotary_pos_emb=False).to(q.device)
        return lambda q, k, v: attn(q, k, v)
    return Peer("local-attention", "local-attention", SELF_PATTERNS, build)


def _reformer(module) -> Peer:
    def build(q, k, v, pattern):
        attn = module.LSHAttention(bucket_size=64, n_hashes=8, causal=pattern.causal)

        def call(q, k, v):
            b, h, n, d = q.shape
            out = attn(q.reshape(b * h, n, d), v.reshape(b * h, n, v.shape[-1]))[0]
            return out.view(b, h, n, -1)
        return call
    return Peer("reformer-lsh", "reformer-pytorch", SELF_PATTERNS, build)


def _fla_file(relative: str):
    """Load one pure-PyTorch file of fla without running ``fla.ops.__init__`` (Triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla (pip install fla-core) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    file_spec = importlib.util.spec_from_file_location(f"_subq_peer_{path.stem}", path)
    if file_spec is None or not path.exists():
        raise ImportError(f"fla has no {relative}")
    loaded = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(loaded)
    return loaded


def _fla_linear(module) -> Peer:
    def build(q, k, v, pattern):
        def call(q, k, v):
            fq, fk = (_heads_last(F.elu(t) + 1) for t in (q, k))
            out = module.naive_chunk_linear_attn(fq, fk, _heads_last(v), normalize=True)
            return _heads_last(out)
        return call
    return Peer("fla-linear-attn", "fla-core",
                frozenset({Pattern.CAUSAL_SELF}), build)


def _fla_simple_gla(module) -> Peer:
    def build(q, k, v, pattern):
        b, h, n, _ = q.shape
        decay = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(h, device=q.device)))
        g = decay.to(q.dtype).expand(b, n, h)

        def call(q, k, v):
            out, _ = module.naive_chunk_simple_gla(*(_heads_last(t) for t in (q, k, v)), g)
            return _heads_last(out).to(q.dtype)
        return call
    return Peer("fla-simple-gla", "fla-core", frozenset({Pattern.CAUSAL_SELF}), build)


_SOURCES: tuple[tuple[str, Callable[[], object], Callable[[object], Peer]], ...] = (
    ("performer", lambda: importlib.import_module("performer_pytorch"), _performer),
    ("nystromformer", lambda: importlib.import_module("nystrom_attention"), _nystrom),
    ("local-attention", lambda: importlib.import_module("local_attention"), _local),
    ("reformer-lsh", lambda: importlib.import_module("reformer_pytorch"), _reformer),
    ("fla-linear-attn", lambda: _fla_file("ops/linear_attn/naive.py"), _fla_linear),
    ("fla-simple-gla", lambda: _fla_file("ops/simple_gla/naive.py"), _fla_simple_gla),
)


def _discover() -> tuple[dict[str, Peer], dict[str, str]]:
    found, missing = {}, {}
    for name, load, wrap in _SOURCES:
        try:
            found[name] = wrap(load())
        except Exception as exc:  # any import failure means "missing", never fatal
            missing[name] = f"{type(exc).__name__}: {exc}"
    return found, missing


#: Peers that imported, by name, and peers that did not, with the reason.
PEERS, MISSING = _discover()
