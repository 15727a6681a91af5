"""Mechanism records: what each attention mechanism is, what it supports, and its callables.

Every mechanism in subq is one file in ``subq/ops/`` that defines a module-level
``MECHANISM = Mechanism(...)``; this module imports those files (``BUILTIN`` below) and
keeps the records by name. The contract tests, the CLI's capability table and the
benchmark all iterate over :func:`mechanisms`, so a mechanism registered here is tested,
documented and measured with no further edits.
"""

from __future__ import annotations

import enum
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


class Pattern(enum.Enum):
    """CAB's four attention patterns: {noncausal, causal} x {self, cross}.

    In causal cross the keys are all visible and output ``i`` may depend only on queries ``<= i``.
    """

    NONCAUSAL_SELF = "noncausal self"
    CAUSAL_SELF = "causal self"
    NONCAUSAL_CROSS = "noncausal cross"
    CAUSAL_CROSS = "causal cross"

    @property
    def causal(self) -> bool:
        return self in (Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS)

    @property
    def cross(self) -> bool:
        return self in (Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS)

    @property
    def short(self) -> str:
        return {"noncausal self": "NS", "causal self": "CS",
                "noncausal cross": "NC", "causal cross": "CC"}[self.value]

    @classmethod
    def of(cls, causal: bool, cross: bool) -> Pattern:
        return {
            (False, False): cls.NONCAUSAL_SELF,
            (True, False): cls.CAUSAL_SELF,
            (False, True): cls.NONCAUSAL_CROSS,
            (True, True): cls.CAUSAL_CROSS,
        }[(bool(causal), bool(cross))]


ALL_PATTERNS = frozenset(Pattern)
SELF_PATTERNS = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})

#: Argument names of :func:`subq.attention`; no option may reuse them.
RESERVED_NAMES = frozenset(
    {"q", "k", "v", "method", "causal", "cross", "scale", "key_padding_mask", "state"}
)


@dataclass(frozen=True)
class Option:
    """A keyword-only option of a mechanism, with the paper's default.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``torch.Tensor`` or
    ``torch.Generator``. ``low``/``high`` bound numbers (inclusive), ``choices`` bounds
    strings; ``nullable`` allows ``None`` (whose meaning the ``doc`` states).
    """

    name: str
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False

    def check(self, value: Any, mechanism: str) -> Any:
        """Return ``value`` if it is acceptable, else raise ``ValueError`` naming the option."""
        where = f"option {self.name!r} of mechanism {mechanism!r}"
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"{where} must not be None")
        if self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            ok = isinstance(value, self.type)
        if not ok:
            raise ValueError(f"{where} must be of type {self.type.__name__}, got {value!r}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{where} must be >= {self.low}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{where} must be <= {self.high}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {self.choices}, got {value!r}")
        return value

    def describe(self) -> str:
        """``name=default`` for tables."""
        if self.type in (torch.Tensor, torch.Generator):
            default = "tensor" if self.type is torch.Tensor else "generator"
            return f"{self.name}={default if self.default is not None else None}"
        return f"{self.name}={self.default!r}"


def _no_sample_options(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       generator: torch.Generator) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Mechanism:
    """The record of one attention mechanism.

    Callables share one signature, ``fn(q, k, v, *, causal, cross, scale, key_padding_mask,
    **options)``; ``weights`` drops ``v``. ``fn`` is the fast path, ``reference`` the slow,
    obvious O(Lq x Lk) computation of the same function, ``weights`` its attention matrix
    ``(B, Hq, Lq, Lk)`` where the output is ``A @ v``. Mechanisms that decode give
    ``init_state(*, batch, kv_heads, head_dim, value_dim, dtype, device, **options)`` and
    ``step(q_t, k_t, v_t, state, *, scale, **options) -> (out_t, state)`` (causal self), and
    may give ``prefill_state(q, k, v, *, scale, **options) -> state``: the state ``step`` holds
    after the ``T`` tokens of ``q, k, v (B, H, T, D)``, built at once (without it
    :func:`subq.prefill_state` steps through them).

    ``exact`` says the output equals dense softmax attention for every input (every
    mechanism, exact or not, equals its own ``reference``).
    ``test_options`` make the mechanism non-trivial at test lengths (e.g. a window smaller
    than L); ``sample_options(q, k, v, generator)`` draws tensor-valued options a call needs
    (e.g. learned prefix summaries) for the tests and the benchmark.
    """

    name: str
    paper: str
    fn: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    patterns: frozenset[Pattern]
    exact: bool
    summary: str
    options: tuple[Option, ...] = ()
    weights: Callable[..., torch.Tensor] | None = None
    init_state: Callable[..., Any] | None = None
    step: Callable[..., tuple[torch.Tensor, Any]] | None = None
    prefill_state: Callable[..., Any] | None = None
    test_options: Mapping[str, Any] = field(default_factory=dict)
    sample_options: Callable[..., dict[str, Any]] = _no_sample_options

    def __post_init__(self) -> None:
        clash = RESERVED_NAMES & {o.name for o in self.options}
        if clash:
            raise ValueError(f"mechanism {self.name!r}: option names {sorted(clash)} are reserved")
        if (self.init_state is None) != (self.step is None):
            raise ValueError(f"mechanism {self.name!r}: give both init_state and step, or neither")
        if self.prefill_state is not None and self.step is None:
            raise ValueError(f"mechanism {self.name!r}: prefill_state needs step")
        if self.step is not None and Pattern.CAUSAL_SELF not in self.patterns:
            raise ValueError(f"mechanism {self.name!r}: decoding needs the causal self pattern")

    @property
    def decodes(self) -> bool:
        return self.step is not None

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and check every option; unknown names raise ``ValueError``."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for mechanism {self.name!r}; "
                f"it takes {sorted(known) or 'no options'}"
            )
        return {name: opt.check(given.get(name, opt.default), self.name)
                for name, opt in known.items()}


#: Modules of ``subq.ops`` that define ``MECHANISM``, in the order tables list them.
BUILTIN: tuple[str, ...] = (
    "dense",
    "local",
    "linear",
    "hierarchical_local",
    "ntk",
    "kernelized_rpe",
    "combiner",
    "hip",
    "scout",
    "hax",
)

_REGISTRY: dict[str, Mechanism] = {}
_builtins_loaded = False


def register(mechanism: Mechanism) -> Mechanism:
    """Add a mechanism record; its name must be new."""
    _load_builtins()
    if mechanism.name in _REGISTRY:
        raise ValueError(f"a mechanism named {mechanism.name!r} is already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in BUILTIN:
        register(importlib.import_module(f"subq.ops.{module}").MECHANISM)


def mechanisms() -> list[Mechanism]:
    """All registered mechanisms, built-ins first."""
    _load_builtins()
    return list(_REGISTRY.values())


def get(name: str) -> Mechanism:
    """The record named ``name``; ``ValueError`` listing the known names otherwise."""
    _load_builtins()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
