"""Tiny random models of the transformers families the integration is tested on (built from
configs, no download). Causal LMs: Llama, GPT-2 (attention dropout 0.1 by default), and the
families with sliding-window layers: Mistral and Phi-3 (every layer windowed), Qwen2 (the
layers from ``max_window_layers`` on), Gemma 2 (alternating, with attention-logit
soft-capping, eager attention) and Gemma 3 (alternating). Encoders: BERT (dropout 0.1) and
ViT."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTModel,
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
    "llama": (LlamaForCausalLM, LlamaConfig, dict(head_dim=8)),
}
WINDOWED = sorted(_FAMILIES.keys() - {"llama"})
_GPT2 = dict(vocab_size=97, n_embd=48, n_layer=3, n_head=6, n_positions=256, eos_token_id=None,
             bos_token_id=1, pad_token_id=0)
_ENCODER = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                intermediate_size=64)
CAUSAL_LMS = sorted([*_FAMILIES, "gpt2"])
FAMILIES = sorted([*CAUSAL_LMS, "bert", "vit"])


def tiny_family(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny random model of family ``name`` (its stock attention implementation)."""
    torch.manual_seed(seed)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**{**_GPT2, **overrides})).eval()
    if name == "bert":
        config = BertConfig(vocab_size=97, **_ENCODER, **overrides)
        return BertModel(config, add_pooling_layer=False).eval()
    if name == "vit":
        config = ViTConfig(image_size=16, patch_size=4, **_ENCODER, **overrides)
        return ViTModel(config, add_pooling_layer=False).eval()
    model_class, config_class, options = _FAMILIES[name]
    return model_class(config_class(**{**_COMMON, **options, **overrides})).eval()
