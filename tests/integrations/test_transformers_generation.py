"""transformers' own generation checks, as they apply to an attention implementation, on the
tiny random Llama (offline) for every mechanism that decodes (issue 23 item 2): greedy and
seeded sampling give the same tokens with the KV cache and without it, several samples per
prompt expand the batch, generation continues from the returned cache as in one call, and
a batch of mixed lengths generates each prompt as alone (``test_transformers.py``)."""

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from subq.integrations import transformers as hf  # noqa: E402

from .llama import DECODERS, SPARSE_OPTIONS, tiny_llama  # noqa: E402


def _model(method: str | None):
    model = tiny_llama()
    if method is not None:
        hf.patch(model, method, layers=[1, 2], **SPARSE_OPTIONS.get(method, {}))
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 13 and 8 tokens, left-padded into one batch, and their mask."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 97, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def _sample(model, ids, mask, cache: bool, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True,
                          temperature=1.5, top_k=0, top_p=1.0, use_cache=cache,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("method", DECODERS)
def test_greedy_and_sampling_with_and_without_the_cache(method):
    """Greedy tokens and seeded samples of a padded batch: with the cache == without it;
    another seed draws other tokens (the sampling is drawn, not fixed)."""
    model = _model(method)
    ids, mask = _prompts()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=8,
                                              do_sample=False, pad_token_id=0, use_cache=False))
    sampled = _sample(model, ids, mask, cache=True)
    assert torch.equal(sampled, _sample(model, ids, mask, cache=False))
    assert not torch.equal(sampled, _sample(model, ids, mask, cache=True, seed=1))


def test_dense_samples_the_stock_tokens():
    """The same seed draws the same tokens through subq's dense attention as through stock
    SDPA, padded batch included."""
    ids, mask = _prompts()
    model = _model(None)
    stock = _sample(model, ids, mask, cache=True)
    hf.patch(model, "dense")
    assert torch.equal(_sample(model, ids, mask, cache=True), stock)


@pytest.mark.parametrize("method", DECODERS)
def test_several_samples_per_prompt_expand_the_batch(method):
    """``num_return_sequences=3`` repeats each row of the padded batch three times; every
    sample equals the one drawn with the cache off."""
    model = _model(method)
    ids, mask = _prompts()
    cached = _sample(model, ids, mask, cache=True, num_return_sequences=3)
    assert cached.shape == (6, 13 + 8)
    assert torch.equal(cached, _sample(model, ids, mask, cache=False, num_return_sequences=3))


@pytest.mark.parametrize("method", DECODERS)
def test_generation_continues_from_the_returned_cache(method):
    """Generating 4 tokens, then 5 more from the returned ``past_key_values``, gives the 9
    tokens of one call (transformers' continue-from-past-key-values check)."""
    model = _model(method)
    ids, mask = _prompts()
    settings = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=9, **settings).sequences
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, **settings)
    grown = torch.cat([mask, torch.ones_like(mask[:, :4])], dim=1)
    then = model.generate(first.sequences, attention_mask=grown, max_new_tokens=5,
                          past_key_values=first.past_key_values, **settings).sequences
    assert torch.equal(then, whole)
