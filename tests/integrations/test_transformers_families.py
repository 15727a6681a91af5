"""subq's ``dense`` through transformers equals each family's stock attention (SDPA, or eager
for Gemma 2) on tiny random models: logits with padding (left for causal LMs, right for BERT),
greedy and beam-search tokens with the cache, and a seeded training step with the config's
default attention dropout (issue 26, the families of docs/integrations/transformers.md)."""

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from subq.integrations import transformers as hf  # noqa: E402

from .families import CAUSAL_LMS, FAMILIES, tiny_family  # noqa: E402
from .llama import rel  # noqa: E402


def _inputs(family: str, padded: bool = True):
    """Model inputs with padding where the family takes it (and ``padded``), and the mask of
    real outputs."""
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16,
                                            generator=torch.Generator().manual_seed(1))}, None
    ids = torch.randint(1, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded and family == "bert":
        mask[1, -4:] = 0
    elif padded:
        mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()[:, :, None]


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equals_stock_with_and_without_padding(family, padded):
    model = tiny_family(family)
    inputs, real = _inputs(family, padded)
    with torch.no_grad():
        stock = _output(model, inputs)
        hf.patch(model, "dense")
        ours = _output(model, inputs)
    real = torch.ones_like(stock, dtype=torch.bool) if real is None else real
    assert rel(ours * real, stock * real) < 1e-5


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_dense_generates_the_stock_tokens_greedy_and_beam(family):
    model = tiny_family(family)
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(2))

    def generate(beams):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, num_beams=beams, pad_token_id=0)

    stock = [generate(1), generate(3)]
    hf.patch(model, "dense")
    assert torch.equal(generate(1), stock[0])
    assert torch.equal(generate(3), stock[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_with_the_default_dropout_equals_stock(family):
    """The same seed draws the same attention dropout through subq as through stock SDPA
    (GPT-2 and BERT default to 0.1; the others to 0); the gradients agree too (padded query
    rows, which see no key, left out)."""
    inputs, real = _inputs(family)
    outputs = []
    for patched in (False, True):
        model = tiny_family(family).train()
        if patched:
            hf.patch(model, "dense")
        torch.manual_seed(4)
        out = _output(model, inputs)
        out = out if real is None else out * real
        out.square().mean().backward()
        weight = next(hf.attention_modules(model)[0].parameters())
        outputs.append((out.detach(), weight.grad.clone()))
    assert rel(outputs[1][0], outputs[0][0]) < 1e-5
    assert rel(outputs[1][1], outputs[0][1]) < 1e-4
