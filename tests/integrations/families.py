"""Tiny random models of the transformers families with sliding-window layers (built from
configs, no download): Mistral and Phi-3 (every layer windowed), Qwen2 (the layers from
``max_window_layers`` on), Gemma 2 (alternating, with attention-logit soft-capping, eager
attention) and Gemma 3 (alternating)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WINDOW = 5
_COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
               eos_token_id=None, pad_token_id=0)
_FAMILIES = {
    "mistral": (MistralForCausalLM, MistralConfig, dict(head_dim=8, sliding_window=WINDOW)),
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(sliding_window=WINDOW)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True,
                                                  sliding_window=WINDOW, max_window_layers=2)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(head_dim=8, sliding_window=WINDOW)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        head_dim=8, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2)),
}
FAMILIES = sorted(_FAMILIES)


def tiny_family(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny random model of family ``name`` (its stock attention implementation)."""
    model_class, config_class, options = _FAMILIES[name]
    torch.manual_seed(seed)
    return model_class(config_class(**{**_COMMON, **options, **overrides})).eval()
