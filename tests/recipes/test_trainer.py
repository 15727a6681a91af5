"""The one trainer (subq/recipes/trainer.py): schedule, exact resume, accumulation, metrics,
checkpoints and refusals, on a float64 toy task with dropout (so the RNG matters)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from subq.recipes.trainer import (
    CHECKPOINT,
    METRICS,
    Trainer,
    TrainerConfig,
    lr_factor,
    read_metrics,
)


class ToyTask:
    """Regression of a fixed random linear map; batch of step s drawn from (seed, s)."""

    def __init__(self, seed: int = 0, width: int = 6) -> None:
        self.seed, self.width = seed, width
        self.target = torch.randn(width, 1, generator=torch.Generator().manual_seed(99),
                                  dtype=torch.float64)

    def config(self) -> dict:
        return {"width": self.width}

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.width, 16), nn.GELU(), nn.Dropout(0.1),
                             nn.Linear(16, 1)).double()

    def batch(self, step, size, start, count, device):
        g = torch.Generator().manual_seed(self.seed * 10**6 + step)
        x = torch.randn(size, self.width, generator=g, dtype=torch.float64)[start:start + count]
        return x.to(device), (x @ self.target).to(device)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), x.shape[0]

    def evaluate(self, model):
        x, y = self.batch(-1, 32, 0, 32, torch.device("cpu"))
        return [{"split": "valid", "mse": ((model(x) - y) ** 2).mean().item()}]


def _cfg(tmp_path, **kw) -> TrainerConfig:
    base = dict(out=str(tmp_path), steps=8, batch=4, lr=1e-2, warmup=2, log_every=1,
                eval_every=4, checkpoint_every=3, progress=False)
    return TrainerConfig(**{**base, **kw})


def _losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainerConfig(steps=110, warmup=10, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, replace(cfg, min_lr_ratio=1.0)) == 1.0


def test_metrics_and_checkpoint_of_a_run(tmp_path):
    result = Trainer(ToyTask(), _cfg(tmp_path)).fit()
    metrics = read_metrics(tmp_path)
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, 9))
    assert all(set(m) == {"step", "loss", "lr", "tokens_per_s"} for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if m.get("split") == "valid"] == [4, 8]
    assert metrics[0]["lr"] == pytest.approx(0.5e-2)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert saved["step"] == 8 and result["finished"] and result["step"] == 8
    assert not list(tmp_path.glob(".*.tmp")), "a temporary checkpoint was left behind"


def test_training_reduces_the_loss(tmp_path):
    Trainer(ToyTask(), _cfg(tmp_path, steps=40, batch=16, warmup=5)).fit()
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_resume_continues_exactly(tmp_path):
    Trainer(ToyTask(), _cfg(tmp_path / "straight")).fit()
    first = Trainer(ToyTask(), _cfg(tmp_path / "resumed")).fit(until=5)
    assert first["step"] == 5 and not first["finished"]
    # a killed process may have logged past its last checkpoint (step 5): those lines go
    with (tmp_path / "resumed" / METRICS).open("a") as f:
        f.write(json.dumps({"step": 6, "loss": 123.0, "lr": 0.0, "tokens_per_s": 0.0}) + "\n")
    Trainer(ToyTask(), _cfg(tmp_path / "resumed", resume=True)).fit()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    drop = {"tokens_per_s"}
    assert ([{k: v for k, v in m.items() if k not in drop} for m in straight]
            == [{k: v for k, v in m.items() if k not in drop} for m in resumed])


def test_resume_with_more_steps_follows_the_longer_schedule(tmp_path):
    """A run extended at resume (``steps`` may change) takes every step after the resume at
    the longer schedule's learning rate, the first one included."""
    Trainer(ToyTask(), _cfg(tmp_path, steps=4)).fit()
    Trainer(ToyTask(), _cfg(tmp_path, steps=8, resume=True)).fit()
    logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path) if "lr" in m}
    cfg = _cfg(tmp_path, steps=8)
    for step in range(5, 9):  # an entry logs the lr its step (0-based step - 1) used
        assert logged[step] == pytest.approx(cfg.lr * lr_factor(step - 1, cfg), rel=1e-12)


def test_accumulation_gives_the_same_steps(tmp_path):
    Trainer(ToyTask(), _cfg(tmp_path / "one")).fit()
    Trainer(ToyTask(), _cfg(tmp_path / "two", accumulate=2)).fit()
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-12)


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    result = Trainer(ToyTask(), _cfg(tmp_path, time_limit=1e-9)).fit()
    assert result["step"] == 1 and not result["finished"]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 1


def test_refusals(tmp_path):
    Trainer(ToyTask(), _cfg(tmp_path)).fit(until=3)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(ToyTask(), _cfg(tmp_path)).fit()
    with pytest.raises(ValueError, match=r"trainer\.lr"):
        Trainer(ToyTask(), _cfg(tmp_path, resume=True, lr=0.5)).fit()
    with pytest.raises(ValueError, match=r"task\.width"):
        Trainer(ToyTask(width=5), _cfg(tmp_path, resume=True)).fit()
    with pytest.raises(ValueError, match="below the step"):
        Trainer(ToyTask(), _cfg(tmp_path, resume=True, steps=2)).fit()
    with pytest.raises(ValueError, match="batch"):
        Trainer(ToyTask(), _cfg(tmp_path, batch=3, accumulate=2))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        Trainer(ToyTask(), _cfg(tmp_path, min_lr_ratio=2.0))


def test_bf16_autocast_trains(tmp_path):
    class Float32Toy(ToyTask):
        def build_model(self):
            return super().build_model().float()

        def batch(self, *args):
            return tuple(t.float() for t in super().batch(*args))

    Trainer(Float32Toy(), _cfg(tmp_path, bf16=True)).fit()
    assert all(math.isfinite(x) for x in _losses(tmp_path))


def test_ema_averages_the_weights_and_is_what_evaluations_score(tmp_path):
    decay = 0.6
    trainer = Trainer(ToyTask(), _cfg(tmp_path, ema=decay))
    expected = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(3):
        trainer.train_step()
        for name, param in trainer.model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * param.detach()
    for name, average in trainer.ema_model.named_parameters():
        torch.testing.assert_close(average, expected[name], rtol=1e-12, atol=1e-12)
    assert not torch.equal(trainer.ema_model[0].weight, trainer.model[0].weight)
    (entry,) = trainer.evaluate()
    x, y = ToyTask().batch(-1, 32, 0, 32, torch.device("cpu"))
    with torch.no_grad():
        assert entry["mse"] == pytest.approx(((trainer.ema_model(x) - y) ** 2).mean().item())


def test_ema_resumes_exactly(tmp_path):
    Trainer(ToyTask(), _cfg(tmp_path / "straight", ema=0.9)).fit()
    Trainer(ToyTask(), _cfg(tmp_path / "resumed", ema=0.9)).fit(until=5)
    Trainer(ToyTask(), _cfg(tmp_path / "resumed", ema=0.9, resume=True)).fit()
    drop = {"tokens_per_s"}
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert ([{k: v for k, v in m.items() if k not in drop} for m in straight]
            == [{k: v for k, v in m.items() if k not in drop} for m in resumed])
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert set(saved["ema"]) == set(saved["model"])
    with pytest.raises(ValueError, match=r"trainer\.ema"):
        Trainer(ToyTask(), _cfg(tmp_path / "resumed", ema=0.5, resume=True, steps=9)).fit()
    with pytest.raises(ValueError, match="ema"):
        Trainer(ToyTask(), _cfg(tmp_path / "bad", ema=1.0))


def test_a_checkpoint_from_before_a_new_setting_resumes_at_its_default(tmp_path):
    """Checkpoints written before ``ema`` existed lack it; they resume as ``ema=0``."""
    Trainer(ToyTask(), _cfg(tmp_path)).fit(until=3)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    del saved["config"]["trainer"]["ema"]
    torch.save(saved, tmp_path / CHECKPOINT)
    assert Trainer(ToyTask(), _cfg(tmp_path, resume=True)).fit()["finished"]
