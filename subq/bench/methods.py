"""What the efficiency benchmark measures: every registered mechanism, the materialised
``vanilla`` softmax attention CAB compares against, and the peers, as one kind of record.

A :class:`Method` has a name, a source (``subq``, ``baseline`` or ``peer``), the patterns it
is measured on and ``build(q, k, v, pattern, seed)``, which returns a function of
``(q, k, v)`` to time (tensor options such as learned tables are drawn once, from ``seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import subq
from subq.registry import ALL_PATTERNS, Mechanism, Pattern, mechanisms

from . import peers

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    source: str
    patterns: frozenset[Pattern]
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Pattern, int], Attend]
    label: str = ""


def _subq_method(mech: Mechanism) -> Method:
    def build(q, k, v, pattern, seed):
        generator = torch.Generator(device=q.device).manual_seed(seed)
        options = mech.sample_options(q, k, v, generator=generator)
        return lambda q, k, v: subq.attention(q, k, v, method=mech.name, causal=pattern.causal,
                                              cross=pattern.cross, **options)
    return Method(mech.name, "subq", mech.patterns, build, f"subq {mech.name}")


def vanilla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pattern: Pattern) -> torch.Tensor:
    """CAB's vanilla attention: softmax(q k^T / sqrt(D)) v with the (L x L) matrix
    materialised (causal self masks j > i)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if pattern is Pattern.CAUSAL_SELF:
        future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


VANILLA = Method("vanilla", "baseline", ALL_PATTERNS,
                 lambda q, k, v, pattern, seed: (
                     lambda q, k, v: vanilla_attention(q, k, v, pattern)),
                 "materialised softmax(QK^T)V (CAB's vanilla)")


def _peer_method(peer: peers.Peer) -> Method:
    def build(q, k, v, pattern, seed):
        torch.manual_seed(seed)
        return peer.build(q, k, v, pattern)
    return Method(peer.name, "peer", peer.patterns, build, f"peer: {peer.package}")


def all_methods() -> dict[str, Method]:
    """Every method by name: subq's mechanisms (registry order), vanilla, the peers found."""
    found = {m.name: _subq_method(m) for m in mechanisms()}
    found[VANILLA.name] = VANILLA
    for peer in peers.PEERS.values():
        found.setdefault(peer.name, _peer_method(peer))
    return found


def missing_peers() -> dict[str, str]:
    """Peers whose package did not import, with the reason."""
    return dict(peers.MISSING)
