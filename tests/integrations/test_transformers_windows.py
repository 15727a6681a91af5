"""Sliding-window layers and Gemma 2's soft-capping through subq (issue 26): ``dense`` runs a
layer with ``sliding_window = w`` as ``local(window=w - 1)`` and soft-capped logits exactly
(the families' equality with stock is in test_transformers_families.py); the other mechanisms
are refused by name where the window binds or the logits are capped; layers not patched keep
the model's own attention."""

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from transformers.masking_utils import chunked_causal_mask_function  # noqa: E402

from subq.integrations import transformers as hf  # noqa: E402
from subq.integrations.softcap import softcapped_attention  # noqa: E402

from .families import WINDOW, tiny_family  # noqa: E402
from .llama import rel  # noqa: E402


def _padded_batch(length=17, generator_seed=1):
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(generator_seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def test_window_convention_dense_on_a_window_is_local_with_one_key_less():
    """transformers' sliding_window = w (keys q - w < j <= q) is subq's local(window=w - 1):
    stock Mistral with a window equals the same weights without one, patched with that local."""
    ids, mask = _padded_batch()
    windowed = tiny_family("mistral")
    plain = tiny_family("mistral", sliding_window=None)
    hf.patch(plain, "local", window=WINDOW - 1)
    with torch.no_grad():
        stock = windowed(ids, attention_mask=mask).logits
        local = plain(ids, attention_mask=mask).logits
    real = mask.bool()[:, :, None]
    assert rel(local * real, stock * real) < 1e-5


def test_local_keeps_the_smaller_of_its_window_and_the_layers():
    ids, _ = _padded_batch()
    windowed, plain = tiny_family("mistral"), tiny_family("mistral", sliding_window=None)
    hf.patch(windowed, "local", window=2)  # narrower than the layer's w - 1 = 4
    hf.patch(plain, "local", window=2)
    with torch.no_grad():
        assert torch.equal(windowed(ids).logits, plain(ids).logits)


def test_other_mechanisms_are_refused_where_the_window_binds_only():
    model = tiny_family("mistral")
    hf.patch(model, "linear")
    with pytest.raises(NotImplementedError, match="sliding window of 5 keys.*layer"):
        model(torch.randint(1, 97, (1, 12)))
    with torch.no_grad():  # the window covers the whole text: linear runs as it is
        model(torch.randint(1, 97, (1, WINDOW)))


def test_gemma3_full_layers_take_any_mechanism_beside_dense_windows():
    """Gemma 3 alternates sliding (0, 2) and full (1, 3) layers: linear on the full ones, the
    windows left to subq's dense (local with the layer's window)."""
    model = tiny_family("gemma3")
    assert model.config.layer_types[1] == "full_attention"
    hf.patch(model, "linear", layers=[1, 3])
    ids, mask = _padded_batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
    hf.patch(model, "linear", layers=[0])
    with pytest.raises(NotImplementedError, match="layer 0 attends within a sliding window"):
        model(ids)


def test_softcapping_is_refused_by_name_outside_dense_and_local():
    model = tiny_family("gemma2")
    hf.patch(model, "linear", layers=[1])
    with pytest.raises(NotImplementedError, match="layer 1: .*attn_logit_softcapping=50.0"):
        model(torch.randint(1, 97, (1, 12)))


def test_softcapped_attention_against_its_formula():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64) * 3
    k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[1, :3] = True
    out = softcapped_attention(q, k, v, softcap=2.0, scale=0.5, causal=True, window=4,
                               key_padding_mask=padding)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = 2.0 * torch.tanh(q @ kk.transpose(-1, -2) * 0.5 / 2.0)
    i = torch.arange(9)[:, None] + 4  # the queries are the last 9 of 13 positions
    j = torch.arange(13)[None, :]
    allowed = (j <= i) & (j > i - 4) & ~padding[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vv
    assert rel(out, expected) < 1e-12


def test_chunked_attention_is_refused_naming_it():
    chunks = chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="chunked attention"):
        hf.padding_mask(1, 10, 10, mask_function=chunks, local_size=3)


def test_layers_not_named_keep_the_models_own_attention(monkeypatch):
    """patch(layers=[1]) leaves the other layers on the model's implementation (SDPA here,
    with the mask transformers builds for it); unpatch returns the named ones to it too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .llama import tiny_llama

    stock_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return stock_sdpa(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    model = tiny_llama(layers=3)
    ids, mask = _padded_batch()
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        calls.clear()
        hf.patch(model, "dense", layers=[1])
        ours = model(ids, attention_mask=mask).logits
        assert calls == [0, 2]
        hf.unpatch(model)
        calls.clear()
        model(ids, attention_mask=mask)
        assert calls == [0, 1, 2]
    real = mask.bool()[:, :, None]
    assert rel(ours * real, stock * real) < 1e-5


def test_gemma2_layers_not_named_keep_its_eager_soft_capped_attention():
    model = tiny_family("gemma2")
    ids, mask = _padded_batch()
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        hf.patch(model, "local", layers=[1], window=3)
        local = model(ids, attention_mask=mask).logits
        hf.patch(model, "dense", layers=[1])
        dense = model(ids, attention_mask=mask).logits
    assert model.config.subq_stock_attention == "eager"
    real = mask.bool()[:, :, None]
    assert rel(dense * real, stock * real) < 1e-6
    assert rel(local * real, stock * real) > 1e-4


def test_training_a_windowed_model_with_dropout_equals_stock_sdpa():
    """A sliding-window layer in training with attention dropout: dense runs it as local, and
    local applies the dropout as one SDPA call with the window as its mask, so a seeded step
    draws what stock SDPA draws (left padding included)."""
    ids, mask = _padded_batch()
    model = tiny_family("mistral", attention_dropout=0.3).train()
    torch.manual_seed(7)
    stock = model(ids, attention_mask=mask).logits
    hf.patch(model, "dense")
    torch.manual_seed(7)
    ours = model(ids, attention_mask=mask).logits
    real = mask.bool()[:, :, None]
    assert rel(ours * real, stock * real) < 1e-5
    torch.manual_seed(8)
    assert rel(model(ids, attention_mask=mask).logits * real, stock * real) > 1e-3  # it drops
