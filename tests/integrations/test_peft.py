"""PEFT methods on a transformers model: NTK-Attention, LoRA, prefix tuning, full fine-tuning.

Each method's start (the stock model for NTK and LoRA; the stock model reading the init text
first for a prefix), the trainable counts by formula and on SmolLM2-135M's geometry, what a
step changes, and cached generation.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from subq.integrations import peft  # noqa: E402
from subq.integrations import transformers as hf  # noqa: E402
from subq.nn.lora import LoRALinear  # noqa: E402

from .llama import generate, rel, tiny_llama  # noqa: E402


def _pair(layers: int = 3) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A tiny Llama in float64 and an identical copy to adapt."""
    stock = tiny_llama(layers).double()
    model = tiny_llama(layers).double()
    model.load_state_dict(stock.state_dict())
    return stock, model


@pytest.mark.parametrize("method", ["ntk", "lora"])
def test_ntk_and_lora_start_as_the_stock_model(method):
    stock, model = _pair()
    ids = torch.randint(0, 97, (2, 11))
    trained = peft.apply_peft(model, method, rank=3 if method == "lora" else None)
    with torch.no_grad():
        assert (model(ids).logits - stock(ids).logits).abs().max() < 1e-12
    assert torch.equal(generate(model, ids[:1], cache=True), generate(stock, ids[:1], cache=True))
    assert all(p.requires_grad for p in trained)
    assert peft.trainable_count(model) == sum(p.numel() for p in trained)


def test_prefix_starts_as_the_stock_model_reading_the_init_text_first():
    """Keys and values of real text at positions -m..-1: rotary embeddings see distances only,
    so the adapted model on x equals the stock model on [init; x] (its x positions), to the
    digits of the stock model itself run at positions shifted by -m."""
    stock, model = _pair()
    init, x = torch.randint(0, 97, (5,)), torch.randint(0, 97, (2, 9))
    prefixes = peft.add_kv_prefixes(model, 5, init_ids=init)
    assert sorted(prefixes) == [0, 1, 2] and prefixes[0].keys.shape == (1, 2, 5, 8)
    joined = torch.cat([init.expand(2, -1), x], dim=1)
    shifted = torch.arange(-5, 9)[None]
    with torch.no_grad():
        expected = stock(joined, position_ids=shifted).logits[:, 5:]
        assert (model(x).logits - expected).abs().max() < 1e-12
        assert rel(model(x).logits, stock(joined).logits[:, 5:]) < 1e-6


def test_prefix_generation_with_cache_equals_recompute_and_is_refused_elsewhere():
    model = tiny_llama()
    peft.add_kv_prefixes(model, 4)  # N(0, 1) pairs
    ids = torch.randint(0, 97, (1, 7))
    assert torch.equal(generate(model, ids, cache=True), generate(model, ids, cache=False))
    stock = tiny_llama()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if "kv_prefix" not in k})
    with torch.no_grad():
        assert rel(model(ids).logits, stock(ids).logits) > 1e-3  # the prefix is attended
    hf.patch(model, "local", layers=[1], window=4)
    with pytest.raises(NotImplementedError, match="kv_prefix"):
        model(ids)
    hf.unpatch(model)
    assert not any("kv_prefix" in name for name, _ in model.named_parameters())


def test_prefix_respects_padding():
    """A left-padded row equals the same sequence alone: padding keys are masked, the prefix
    stays visible to every query."""
    model = tiny_llama()
    peft.add_kv_prefixes(model, 3)
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[:1, 3:]).logits
    assert rel(batched[0, 3:], alone[0]) < 1e-5


def test_counts_follow_the_formulas_and_match_ntk():
    model = tiny_llama(layers=4)  # Hq 6, Hkv 2, d 8, hidden 48
    assert peft.ntk_count(model) == 4 * 6 * (8 * 8 + 8)
    assert peft.lora_count(model, 5) == 4 * 5 * ((48 + 48) + (48 + 16))
    assert peft.prefix_count(model, 7) == 4 * 2 * 2 * 7 * 8
    ntk = peft.ntk_count(model, layers=[1, 2])
    for method, matched, count in (
            ("lora", peft.matched_rank(model, [1, 2]),
             lambda r: peft.lora_count(model, r, [1, 2])),
            ("prefix", peft.matched_prefix_length(model, [1, 2]),
             lambda m: peft.prefix_count(model, m, [1, 2]))):
        gaps = [abs(count(n) - ntk) for n in (matched - 1, matched, matched + 1)]
        assert gaps[1] == min(gaps), method  # the nearest count to NTK's
        adapted = tiny_llama(layers=4)
        peft.apply_peft(adapted, method, layers=[1, 2])
        assert peft.trainable_count(adapted) == count(matched)


def test_smollm2_geometry_gives_rank_20_and_98_prefix_tokens():
    """SmolLM2-135M's shapes (built on the meta device, no weights): NTK trains
    30 x 9 x (64^2 + 64) numbers; LoRA r = 20 and a 98-token prefix come within 3 %."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert peft.ntk_count(model) == 1_123_200
    assert peft.matched_rank(model) == 20 and peft.lora_count(model, 20) == 1_152_000
    assert peft.matched_prefix_length(model) == 98
    assert peft.prefix_count(model, 98) == 1_128_960


@pytest.mark.parametrize("method", peft.METHODS)
def test_one_step_moves_only_what_trains(method):
    """After one optimiser step the frozen weights are bit-identical and every trainable
    tensor moved (NTK: both Z and k, from their zero start)."""
    model = tiny_llama()
    init = torch.randint(0, 97, (6,)) if method == "prefix" else None
    trained = peft.apply_peft(model, method, rank=2, prefix_length=6, init_ids=init)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trained_ids = {id(p) for p in trained}
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) in trained_ids), name
    if method == "ntk":
        names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if id(p) in trained_ids}
        assert names == {"z", "kz"}
    if method == "lora":
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 3


def test_bad_arguments_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        peft.apply_peft(model, "adapter")
    with pytest.raises(ValueError, match="layers"):
        peft.apply_peft(model, "lora", layers=[5])
    with pytest.raises(ValueError, match="init_ids"):
        peft.add_kv_prefixes(model, 4, init_ids=torch.arange(3))
    with pytest.raises(ValueError, match="prefix length"):
        peft.add_kv_prefixes(model, 0)
    with pytest.raises(ValueError, match="k_proj_missing"):
        peft.add_lora(model, 2, targets=("k_proj_missing",))
