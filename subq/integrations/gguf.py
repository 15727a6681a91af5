"""Convert a Llama-architecture GGUF file into a Hugging Face model directory, once.

transformers can read GGUF itself (``from_pretrained(dir, gguf_file=...)``), but it re-parses
the file on every load, and parsing a 49K-token vocabulary takes minutes on a small, busy
CPU. :func:`convert` does that work once and writes an ordinary directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load in
seconds:

* ``config.json``: a ``LlamaConfig`` built from the ``llama.*`` metadata;
* ``model.safetensors``: every tensor dequantized to float32 (``gguf.quants.dequantize``),
  renamed to transformers' Llama names, with llama.cpp's rotary row interleaving of the
  query and key projections undone;
* the tokenizer: the byte-level BPE vocabulary and merges (``tokenizer.ggml.model == "gpt2"``)
  with its special tokens, bos/eos/pad ids and chat template.

:func:`cached_conversion` keys the directory on the file's name, size and modification time
under ``~/.cache/subq/gguf`` (or ``$SUBQ_CACHE``), so a second call returns at once.
Needs the ``hf`` extra (``transformers``, ``gguf``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Bumped when the output format changes, so stale cached directories are rebuilt.
FORMAT_VERSION = 1
_MARKER = "subq-gguf.json"

# GGUF tensor name -> transformers Llama name ({i}: block index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp's pre-tokenizer names that split digits one by one before GPT-2's byte-level regex.
_DIGIT_SPLITTING_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2"})
_CONTROL_TOKEN = 3  # llama.cpp's token type for special (control) tokens


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF file lacks the metadata key {key!r}")
    return value


def _llama_config(reader, tied: bool):
    from transformers import LlamaConfig

    arch = _require(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(
            f"subq's GGUF converter handles the 'llama' architecture, this file is {arch!r}")
    heads = int(_require(reader, "llama.attention.head_count"))
    hidden = int(_require(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens) if tokens else 0))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_require(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_require(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))},
        tie_word_embeddings=tied,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return config


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a query/key projection's output rows.

    Within each head of ``2h`` rows, llama.cpp stores the rotary pairs interleaved
    ``(x_0, x_h), (x_1, x_{h+1}), ...`` (row ``2i`` is HF row ``i``, row ``2i+1`` is HF row
    ``h + i``); transformers' ``rotate_half`` wants the two halves contiguous. ``weight`` is
    ``(heads * 2h, ...)``; the result has the same shape.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_TENSOR.match(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart in transformers")
    block, part, kind = match.groups()
    return f"model.layers.{block}.{_BLOCK_NAMES[part]}.{kind}"


def _state_dict(reader, config) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # GGUF lists dimensions fastest-first; torch wants them slowest-first.
        shape = [int(n) for n in reversed(tensor.shape)]
        weight = torch.from_numpy(values.copy()).reshape(shape)
        name = _hf_name(tensor.name)
        if ".self_attn.q_proj." in name:
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        state[name] = weight.contiguous()
    return state


def _tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _require(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(
            f"subq's GGUF converter handles byte-level BPE tokenizers ('gpt2'), not {kind!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRE | _DIGIT_SPLITTING_PRE:
        raise NotImplementedError(f"unknown GGUF pre-tokenizer {pre!r}; subq knows "
                                  f"{sorted(_GPT2_PRE | _DIGIT_SPLITTING_PRE)}")
    tokens = list(_require(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre in _DIGIT_SPLITTING_PRE else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = _field(reader, "tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t == _CONTROL_TOKEN])

    def token(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else tokens[int(index)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` (config, float32 safetensors, tokenizer) from a Llama GGUF file.

    The directory is assembled beside ``out_dir`` and moved into place at the end, so an
    interrupted conversion never leaves a half-written directory behind.
    """
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    reader = GGUFReader(gguf_path)
    names = {t.name for t in reader.tensors}
    config = _llama_config(reader, tied="output.weight" not in names)
    state = _state_dict(reader, config)
    tokenizer = _tokenizer(reader)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        config.save_pretrained(work)
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(work)
        (work / _MARKER).write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "source": str(gguf_path.resolve()),
             "source_bytes": gguf_path.stat().st_size}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out_dir


def cache_root() -> Path:
    """``$SUBQ_CACHE`` or ``~/.cache/subq``."""
    return Path(os.environ.get("SUBQ_CACHE", Path.home() / ".cache" / "subq"))


def cached_conversion(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                      ) -> Path:
    """The converted directory of ``gguf_path``, converting it on the first call only."""
    gguf_path = Path(gguf_path)
    stat = gguf_path.stat()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    out_dir = root / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION:
        return out_dir
    return convert(gguf_path, out_dir)
