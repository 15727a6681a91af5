"""The GGUF -> transformers converter, on a tiny synthetic Llama GGUF written with ``gguf``."""

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")
gguf = pytest.importorskip("gguf", reason="needs the hf extra: pip install -e .[hf]")

from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from subq.integrations import gguf as converter  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
WORDS = ["hello", "world"]


def _llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order: within a head of 2h rows, row 2i is HF row i, 2i+1 is h+i."""
    out = torch.empty_like(weight)
    size = weight.shape[0] // heads
    half = size // 2
    for h in range(heads):
        for i in range(half):
            out[h * size + 2 * i] = weight[h * size + i]
            out[h * size + 2 * i + 1] = weight[h * size + half + i]
    return out


def _vocab():
    alphabet = sorted(ByteLevel.alphabet())
    merges = []
    for word in WORDS:  # merge each word left to right: h e -> he, he l -> hel, ...
        for n in range(1, len(word)):
            merges.append((word[:n], word[n]))
    tokens = ["<|endoftext|>", *alphabet, *[a + b for a, b in merges]]
    tokens = list(dict.fromkeys(tokens))
    return tokens, [f"{a} {b}" for a, b in merges]


def _write_gguf(path, model: LlamaForCausalLM, quantize_embedding: bool):
    config = model.config
    tokens, merges = _vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    names = {v: k for k, v in converter._GLOBAL_NAMES.items()}
    parts = {v: k for k, v in converter._BLOCK_NAMES.items()}
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in names:
            gguf_name = names[name]
        else:
            _, _, block, *middle, kind = name.split(".")
            gguf_name = f"blk.{block}.{parts['.'.join(middle)]}.{kind}"
        weight = weight.detach().float()
        if ".q_proj." in name:
            weight = _llama_cpp_rows(weight, HEADS)
        elif ".k_proj." in name:
            weight = _llama_cpp_rows(weight, KV_HEADS)
        array = weight.numpy()
        if name == "model.embed_tokens.weight" and quantize_embedding:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_model():
    tokens, _ = _vocab()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HEADS * HEAD_DIM,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = _tiny_model()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path, model, quantize_embedding=False)
    return model, path, converter.cached_conversion(path, path.parent / "cache")


def test_unpermute_inverts_llama_cpp_row_order():
    weight = torch.randn(3 * 8, 5)
    assert torch.equal(converter.unpermute_rotary_rows(_llama_cpp_rows(weight, 3), 3), weight)


def test_converted_model_matches_source_logits(converted):
    model, _, out = converted
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert loaded.config.num_key_value_heads == KV_HEADS


def test_converted_tokenizer_applies_merges_and_specials(converted):
    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens, _ = _vocab()
    ids = tokenizer("hello world 42<|endoftext|>")["input_ids"]
    assert ids[0] == tokens.index("hello")
    assert tokens[ids[1]] == "Ġ" and ids[2] == tokens.index("world")
    assert [tokens[i] for i in ids[3:6]] == ["Ġ", "4", "2"]  # digits split one by one
    assert ids[-1] == 0 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world 42"


def test_quantized_tensors_are_dequantized(tmp_path):
    model = _tiny_model()
    path = tmp_path / "q8.gguf"
    _write_gguf(path, model, quantize_embedding=True)
    loaded = AutoModelForCausalLM.from_pretrained(converter.convert(path, tmp_path / "out"))
    source = model.model.embed_tokens.weight
    got = loaded.model.embed_tokens.weight
    error = (got - source).abs().max() / source.abs().max()
    assert 0 < error < 1e-2  # Q8_0 rounding, not garbage


def test_cached_conversion_is_reused(converted):
    _, path, out = converted
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert converter.cached_conversion(path, path.parent / "cache") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_architectures_are_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match="llama"):
        converter.convert(tmp_path / "gpt2.gguf", tmp_path / "out")
