"""Parameter counts, the one measure every equal-parameter comparison in subq uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def num_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, a tensor shared between modules (a tied embedding) once."""
    return sum(p.numel() for p in model.parameters())


def count_on_meta(build: Callable[[], nn.Module]) -> int:
    """:func:`num_parameters` of the model ``build()`` makes, built on the meta device (no
    memory, no initialisation): cheap enough to search widths with."""
    with torch.device("meta"):
        return num_parameters(build())
