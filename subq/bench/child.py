"""Imported once by the memory probe's fork server, so every child starts with torch, subq,
the mechanisms and the peers already loaded (and no op ever run)."""

from subq.registry import mechanisms

from .measure import measure_config
from .methods import all_methods

mechanisms()
all_methods()

__all__ = ["measure_config"]
