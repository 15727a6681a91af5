"""``subq train vision`` (subq/recipes/vision.py) on generated Fashion-MNIST-like idx files (16
training and 8 test images; never the network): 3-step CLI runs of a ViT and of GroupMamba
that log a test accuracy, exact resume (4 steps == 2 + resume 2), and the seeded
augmentation."""

from __future__ import annotations

import pytest
import torch

from subq.cli import main
from subq.recipes.summary import summarise
from subq.recipes.trainer import Trainer, TrainerConfig, read_metrics
from subq.recipes.vision import (
    PAD,
    VisionTask,
    VisionTaskConfig,
    augment,
    hard_distillation_loss,
    load_vision_model,
)
from tests.fashion_data import write_tiny_fashion_mnist

N_TRAIN, N_TEST = 16, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The four idx files of a tiny data set whose class sets the brightness of a block."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fashion"), N_TRAIN, N_TEST)


def _args(data, out, backbone, *extra):
    return ["train", "vision", "--backbone", backbone, "--preset", "tiny", "--data", str(data),
            "--out", str(out), "--batch", "4", "--warmup", "1", "--log-every", "1",
            "--eval-batch", "8", "--no-progress", *extra]


def _without_speed(metrics):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


@pytest.mark.parametrize("backbone", ["vit-dense", "groupmamba"])
def test_three_steps_log_losses_and_test_accuracy(data, tmp_path, capsys, backbone):
    assert main(_args(data, tmp_path / "run", backbone, "--steps", "3")) == 0
    assert "parameters" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "run")
    losses = [m for m in metrics if "loss" in m and "split" not in m]
    assert [m["step"] for m in losses] == [1, 2, 3]
    assert all(0 < m["loss"] < 10 for m in losses)
    (test,) = [m for m in metrics if m.get("split") == "test"]
    assert test["step"] == 3 and test["images"] == N_TEST
    assert 0.0 <= test["accuracy"] <= 1.0 and test["loss"] > 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    summary = summarise(tmp_path / "run")  # evaluation entries (with a loss) are not training
    assert [step for step, _ in summary["loss"]] == [1, 2, 3]
    assert summary["latest"] == [test] and summary["median_tokens_per_s"] > 0


def test_resume_gives_the_losses_of_an_uninterrupted_run(data, tmp_path):
    """A 4-step run stopped after 2 steps (checkpoint) and resumed by a fresh trainer logs
    the losses and the evaluation of a 4-step run never stopped (cosine schedule included)."""
    cfg = VisionTaskConfig(backbone="vit-dense", preset="tiny", data=str(data), eval_images=4)

    def trainer(out, resume=False):
        settings = TrainerConfig(out=str(out), steps=4, batch=4, warmup=1, log_every=1,
                                 checkpoint_every=0, resume=resume, progress=False, seed=5)
        return Trainer(VisionTask(cfg, settings.seed), settings)

    assert trainer(tmp_path / "straight").fit()["finished"]
    stopped = trainer(tmp_path / "split").fit(until=2)
    assert stopped["step"] == 2 and not stopped["finished"]
    assert trainer(tmp_path / "split", resume=True).fit()["finished"]
    straight = _without_speed(read_metrics(tmp_path / "straight"))
    resumed = _without_speed(read_metrics(tmp_path / "split"))
    assert [m["step"] for m in straight if "split" not in m] == [1, 2, 3, 4]
    assert [sorted(m) for m in resumed] == [sorted(m) for m in straight]
    for a, b in zip(straight, resumed, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a, b)


def test_augmentation_is_a_seeded_padded_crop_and_flip():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    a = augment(images, seed=3, step=5)
    assert a.shape == images.shape
    assert torch.equal(a, augment(images, seed=3, step=5))
    assert not all(torch.equal(augment(images, seed=3, step=s), a) for s in range(6, 10))
    for i in range(2):  # each output is a window of the padded (maybe flipped) image
        padded = torch.nn.functional.pad(images[i, 0], (PAD,) * 4, value=-1.0)
        windows = [padded[y:y + 28, x:x + 28] for y in range(2 * PAD + 1)
                   for x in range(2 * PAD + 1)]
        assert any(torch.equal(a[i, 0], w) or torch.equal(a[i, 0], w.flip(-1))
                   for w in windows)


def test_unknown_backbone_is_refused(data, tmp_path):
    with pytest.raises(SystemExit):
        main(_args(data, tmp_path / "x", "vit-nope", "--steps", "1"))


def test_hard_distillation_loss_on_a_hand_computed_example():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    dist = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    labels, teacher = torch.tensor([0, 0]), torch.tensor([1, 0])

    def ce(row, k):  # -log softmax(row)[k]
        return float(torch.logsumexp(row, 0) - row[k])

    expected = (0.7 * (ce(logits[0], 0) + ce(logits[1], 0)) / 2
                + 0.3 * (ce(dist[0], 1) + ce(dist[1], 0)) / 2)
    loss = hard_distillation_loss(logits, dist, labels, teacher, alpha=0.3)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_groupmamba_distils_a_teacher_on_its_second_head(data, tmp_path):
    teacher = tmp_path / "cnn"
    assert main(_args(data, teacher, "cnn", "--steps", "2")) == 0
    out = tmp_path / "student"
    assert main(_args(data, out, "groupmamba", "--steps", "2", "--teacher", str(teacher))) == 0
    (test,) = [m for m in read_metrics(out) if m.get("split") == "test"]
    assert 0.0 <= test["accuracy"] <= 1.0
    model = load_vision_model(out)
    assert model.dist_head is not None
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    features = model.forward_features(images)
    mean = (model.head(features) + model.dist_head(features)) / 2
    torch.testing.assert_close(model(images), mean)  # inference: the mean of the heads
    # The loss the trainer optimised: CE on the labels and on the teacher's argmax.
    task = VisionTask(VisionTaskConfig(backbone="groupmamba", data=str(data),
                                       teacher=str(teacher)), seed=0)
    batch = task.batch(0, 4, 0, 4, torch.device("cpu"))
    model.train()
    torch.manual_seed(0)
    loss, _ = task.loss(model, batch)
    torch.manual_seed(0)
    head, dist = model(batch[0])
    targets = load_vision_model(teacher)(batch[0]).argmax(-1)
    torch.testing.assert_close(loss, hard_distillation_loss(head, dist, batch[1], targets))


def test_distillation_needs_groupmamba_and_a_vision_checkpoint(data, tmp_path):
    with pytest.raises(ValueError, match="groupmamba"):
        VisionTask(VisionTaskConfig(backbone="vit-dense", data=str(data),
                                    teacher=str(tmp_path)), seed=0)
    with pytest.raises(FileNotFoundError, match="subq train vision"):
        VisionTask(VisionTaskConfig(backbone="groupmamba", data=str(data),
                                    teacher=str(tmp_path / "none")), seed=0)
