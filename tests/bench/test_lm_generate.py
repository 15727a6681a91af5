"""``subq eval generate``'s measurement on the tiny random Llama: teacher-forced decoding
through the cache scores the continuation as one forward pass over prompt and continuation
does, for dense and for HiP."""

import math

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from subq.bench.lm_generate import decode_row, markdown_table, prompts  # noqa: E402
from subq.integrations import transformers as hf  # noqa: E402

from ..integrations.llama import SPARSE_OPTIONS, tiny_llama  # noqa: E402


def test_prompts_are_consecutive_windows_and_short_texts_are_refused():
    ids = torch.arange(100)
    prompt, continuation = prompts(ids, context=20, batch=3, decode=5)
    assert prompt.shape == (3, 20) and continuation.shape == (3, 5)
    assert torch.equal(prompt[1], torch.arange(25, 45))
    assert torch.equal(continuation[2], torch.arange(70, 75))
    with pytest.raises(ValueError, match="fewer than 5 prompts"):
        prompts(ids, context=20, batch=5, decode=5)


@pytest.mark.parametrize("method", ["dense", "hip"])
def test_decoded_perplexity_equals_one_forward_pass(method):
    model = tiny_llama()
    hf.patch(model, method, layers=[1, 2], **SPARSE_OPTIONS.get(method, {}))
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    prompt, continuation = ids[:, :22], ids[:, 22:]
    with torch.no_grad():
        row = decode_row(model, prompt, continuation)
        logits = model(ids).logits[:, 21:29]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 22:30].reshape(-1))
    assert math.isclose(row["ppl"], math.exp(float(nll)), rel_tol=1e-5)
    assert row["steps"] == 6 and row["prefill_s"] > 0 and row["step_ms"] > 0
    table = markdown_table([{**row, "method": method, "context": 22, "batch": 2}])
    assert f"`{method}`" in table and f"{row['ppl']:.3f}" in table
