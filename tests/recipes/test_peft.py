"""``subq train peft`` on the one trainer, with a tiny random Llama and a word-level tokenizer
standing in for SmolLM2 (the recipe's model loader is replaced): the evaluation before the
first step is the stock model's for NTK and LoRA, counts, exact resume, the domain task."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")

from subq.integrations import peft  # noqa: E402
from subq.recipes import peft as recipe  # noqa: E402
from subq.recipes.trainer import Trainer, TrainerConfig, read_metrics  # noqa: E402
from subq.tasks.text import tokenize_split  # noqa: E402

from ..helpers import WordTokenizer  # noqa: E402
from ..integrations.llama import tiny_llama  # noqa: E402

VOCAB = 512


@pytest.fixture
def tiny_pretrained(monkeypatch):
    """Every load returns the same tiny model weights and the same tokenizer."""
    tokenizer = WordTokenizer()
    torch.manual_seed(11)
    weights = tiny_llama(layers=2, vocab=VOCAB).state_dict()

    def load(name):
        model = tiny_llama(layers=2, vocab=VOCAB)
        model.load_state_dict(weights)
        return model

    monkeypatch.setattr(recipe, "pretrained_model", load)
    monkeypatch.setattr(recipe, "pretrained_tokenizer", lambda name: tokenizer)
    return load


def _trainer(out, steps=3, **kw) -> TrainerConfig:
    return TrainerConfig(out=str(out), steps=steps, batch=4, lr=1e-2, warmup=1,
                         eval_every=0, checkpoint_every=2, log_every=1, eval_first=True,
                         progress=False, **kw)


@pytest.mark.parametrize("method", peft.METHODS)
def test_lookup_run_starts_where_the_stock_model_is_and_trains(method, tiny_pretrained,
                                                               tmp_path):
    cfg = recipe.PeftTaskConfig(method=method, task="lookup", pairs=4, eval_examples=32,
                                rank=2, prefix_length=5)
    result = recipe.train(cfg, _trainer(tmp_path / method))
    evals = [m for m in read_metrics(tmp_path / method) if "split" in m]
    assert [e["step"] for e in evals] == [0, 3]
    stock = tiny_pretrained("")
    task = recipe.PeftTask(cfg, seed=0)
    base = recipe.lookup_scores(stock, task.held_out, 16, torch.device("cpu"))
    if method in ("ntk", "lora"):
        assert evals[0]["nll"] == pytest.approx(base["nll"], rel=1e-5)
    assert evals[-1]["nll"] != pytest.approx(evals[0]["nll"], rel=1e-5)
    counts = {"ntk": peft.ntk_count(stock), "lora": peft.lora_count(stock, 2),
              "prefix": peft.prefix_count(stock, 5),
              "full": sum(p.numel() for p in stock.parameters())}
    assert result["trainable"] == counts[method]


def test_a_killed_lora_run_resumes_exactly(tiny_pretrained, tmp_path):
    cfg = recipe.PeftTaskConfig(method="lora", task="lookup", pairs=4, eval_examples=16,
                                rank=2)
    recipe.train(cfg, _trainer(tmp_path / "whole", steps=4))
    Trainer(recipe.PeftTask(cfg, seed=0), _trainer(tmp_path / "cut", steps=4)).fit(until=2)
    recipe.train(cfg, _trainer(tmp_path / "cut", steps=4, resume=True))
    whole, cut = (read_metrics(tmp_path / name) for name in ("whole", "cut"))
    drop = ("tokens_per_s",)
    assert ([{k: v for k, v in m.items() if k not in drop} for m in whole]
            == [{k: v for k, v in m.items() if k not in drop} for m in cut])


def test_domain_task_scores_held_out_perplexity(tiny_pretrained, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    words = ["def", "class", "return", "import", "the", "value", "list", "of", "a", "self"]
    for i in range(24):
        picks = torch.randint(len(words), (300,), generator=generator).tolist()
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in picks) + ".\n")
    cfg = recipe.PeftTaskConfig(method="ntk", task="domain", text=str(folder), seq_len=32,
                                eval_tokens=256)
    recipe.train(cfg, _trainer(tmp_path / "run"))
    evals = [m for m in read_metrics(tmp_path / "run") if "split" in m]
    assert [e["step"] for e in evals] == [0, 3]
    for e in evals:
        assert e["perplexity"] == pytest.approx(torch.tensor(e["nll"]).exp().item())
        assert e["tokens"] == 256
    assert evals[-1]["perplexity"] < evals[0]["perplexity"]
    saved = json.loads(json.dumps(torch.load(tmp_path / "run" / "checkpoint.pt",
                                             weights_only=False)["config"]["task"]))
    assert saved["corpus"] == str(folder) and saved["train_tokens"] > 0


def test_tokenized_split_puts_the_end_of_sequence_between_documents():
    tokenizer = WordTokenizer()
    data = torch.frombuffer(bytearray(b"one two\x00three\x00four five six"), dtype=torch.uint8)
    ids = tokenize_split(data, tokenizer)
    assert ids.dtype == torch.int32
    assert tokenizer.decode(ids.tolist()) == "one two<eos>three<eos>four five six"


def test_layers_flag_and_bad_names():
    assert recipe._layers("3-5,7") == (3, 4, 5, 7)
    with pytest.raises(ValueError, match="method"):
        recipe.PeftTask(recipe.PeftTaskConfig(method="adapter"), seed=0)
    with pytest.raises(ValueError, match="task"):
        recipe.PeftTask(recipe.PeftTaskConfig(task="glue"), seed=0)
