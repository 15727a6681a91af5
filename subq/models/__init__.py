"""models"""

from .groupmamba import (
    GroupMamba,
    groupmamba_base,
    groupmamba_micro,
    groupmamba_small,
    groupmamba_tiny,
)

__all__ = ["GroupMamba", "groupmamba_base", "groupmamba_micro", "groupmamba_small",
           "groupmamba_tiny"]
