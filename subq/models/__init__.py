"""models"""

from .groupmamba import (
    GroupMamba,
    groupmamba_base,
    groupmamba_micro,
    groupmamba_small,
    groupmamba_tiny,
)
from .lm import DEFAULT_OPTIONS, LM, MIXERS, PRESETS, LMConfig, lm_config, matched_mlp_hidden

__all__ = ["DEFAULT_OPTIONS", "LM", "MIXERS", "PRESETS", "GroupMamba", "LMConfig",
           "groupmamba_base", "groupmamba_micro", "groupmamba_small", "groupmamba_tiny",
           "lm_config", "matched_mlp_hidden"]
