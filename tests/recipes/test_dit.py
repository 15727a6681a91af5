"""``subq train dit`` / ``subq train lit`` (subq/recipes/dit.py, subq/recipes/lit.py) on tiny
generated Fashion-MNIST-like idx files: CLI runs that log the held-out diffusion loss, exact
resume, LiT's weight inheritance (exactly the stated tensors; with attention zeroed the
student computes the teacher's function), the hybrid distillation loss on a hand-computed
example, FID-FMNIST at evaluation, and named errors."""

from __future__ import annotations

import json

import pytest
import torch

from subq.cli import main
from subq.models.dit import DiT, dit_config
from subq.recipes.dit import DiffusionTask, DiffusionTaskConfig, generate
from subq.recipes.gaussian_diffusion import GaussianDiffusion
from subq.recipes.lit import hybrid_distillation, inherit_weights, load_dit
from subq.recipes.sample_dit import image_grid
from subq.recipes.trainer import read_metrics
from subq.tasks.fashion_mnist import to_uint8
from tests.fashion_data import write_tiny_fashion_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fashion"), 16, 8)


def _args(data, out, *extra, recipe="dit"):
    return ["train", recipe, "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--batch", "4", "--warmup", "1", "--log-every", "1", "--eval-batch", "4",
            "--diffusion-steps", "50", "--no-progress", *extra]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(_args(data, out, "--steps", "2")) == 0
    return out


def _without_speed(metrics):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


def test_three_steps_log_losses_and_held_out_terms(data, tmp_path, capsys):
    assert main(_args(data, tmp_path / "run", "--steps", "3")) == 0
    assert "parameters" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if "lr" in m] == [1, 2, 3]
    (test,) = [m for m in metrics if m.get("split") == "test"]
    assert test["step"] == 3 and test["images"] == 8
    assert test["mse"] > 0 and test["vb"] > 0
    assert test["loss"] == pytest.approx(test["mse"] + 1e-3 * 50 * test["vb"])


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    assert main(_args(data, tmp_path / "a", "--steps", "4", "--eval-every", "2")) == 0
    assert main(_args(data, tmp_path / "b", "--steps", "2", "--eval-every", "2")) == 0
    assert main(_args(data, tmp_path / "b", "--steps", "4", "--eval-every", "2",
                      "--resume")) == 0
    assert _without_speed(read_metrics(tmp_path / "a")) == _without_speed(
        read_metrics(tmp_path / "b"))


def test_batches_are_a_function_of_seed_and_step(data):
    task = DiffusionTask(DiffusionTaskConfig(preset="tiny", data=str(data),
                                             diffusion_steps=50), seed=3)
    whole = task.batch(5, 8, 0, 8, torch.device("cpu"))
    halves = [task.batch(5, 8, start, 4, torch.device("cpu")) for start in (0, 4)]
    for full, *parts in zip(whole, *halves, strict=True):
        assert torch.equal(full, torch.cat(parts))
    other = task.batch(6, 8, 0, 8, torch.device("cpu"))
    assert not torch.equal(whole[3], other[3])


def test_inheritance_loads_exactly_the_non_attention_tensors(teacher):
    source = load_dit(teacher)
    torch.manual_seed(1)
    student = DiT(dit_config("tiny", attention="linear", attention_heads=2))
    loaded, fresh = inherit_weights(student, source)
    teacher_params = dict(source.named_parameters())
    for name, param in student.named_parameters():
        if name in loaded:
            assert torch.equal(param, teacher_params[name]), name
        else:
            assert ".attn." in name, name
    assert set(fresh) == {n for n, _ in student.named_parameters() if ".attn." in n}
    assert any(n.endswith("attn.dwc.weight") for n in fresh)
    # With attention zeroed (its output projection) the student computes the teacher's function.
    for model in (source, student):
        for block in model.blocks:
            torch.nn.init.zeros_(block.attn.proj.weight)
            torch.nn.init.zeros_(block.attn.proj.bias)
    student.eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 7, 49]), torch.tensor([2, 5, 9])
    expected = source(x, t, y)
    assert expected.abs().max() > 0
    torch.testing.assert_close(student(x, t, y), expected, rtol=1e-6, atol=1e-6)


def test_inheritance_refuses_a_teacher_of_another_shape(teacher):
    student = DiT(dit_config("tiny", attention="linear", hidden=64))
    with pytest.raises(ValueError, match="hidden"):
        inherit_weights(student, load_dit(teacher))


def test_hybrid_distillation_on_a_hand_computed_example():
    diffusion = GaussianDiffusion.linear(50)
    x_t, t = torch.zeros(1, 1, 1, 2), torch.tensor([3])
    student = torch.tensor([[[[1.0, 2.0]], [[0.5, -0.5]]]])
    teacher = torch.tensor([[[[0.0, 4.0]], [[0.5, 0.5]]]])
    # noise: mean((1, -2)^2) = 2.5; variance: mean((0, -1)^2) = 0.5
    loss = hybrid_distillation(diffusion, student, teacher, x_t, t)
    torch.testing.assert_close(loss, torch.tensor([0.5 * 2.5 + 0.05 * 0.5]))
    assert float(hybrid_distillation(diffusion, teacher, teacher, x_t, t)) == 0.0
    log = hybrid_distillation(diffusion, student, teacher, x_t, t, variance_target="log")
    bounds = diffusion.posterior_log_variance_clipped[3], diffusion.betas[3].log()
    gap = float(bounds[1] - bounds[0]) / 2  # v moves log Sigma by (upper - lower) / 2 per unit
    assert float(log) == pytest.approx(0.5 * 2.5 + 0.05 * 0.5 * gap ** 2, rel=1e-5)


def test_lit_inherits_distils_and_scores_fid(data, teacher, tmp_path, capsys):
    classifier = tmp_path / "cnn"
    assert main(["train", "vision", "--backbone", "cnn", "--preset", "tiny", "--data", str(data),
                 "--out", str(classifier), "--steps", "1", "--batch", "4", "--warmup", "1",
                 "--eval-batch", "8", "--no-progress"]) == 0
    out = tmp_path / "lit"
    assert main(_args(data, out, "--steps", "2", "--teacher", str(teacher),
                      "--fid-classifier", str(classifier), "--fid-samples", "6",
                      "--sample-steps", "2", recipe="lit")) == 0
    printed = capsys.readouterr().out
    assert "inherited from" in printed and "attn.dwc.weight" in printed
    (test,) = [m for m in read_metrics(out) if m.get("split") == "test"]
    assert test["fid_fmnist"] > 0 and test["fid_samples"] == 6
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["config"]["task"]["model"]["attention"] == "linear"
    assert saved["config"]["task"]["inheritance"]["fresh"]


def test_missing_teacher_and_bad_choices_are_named(data):
    with pytest.raises(ValueError, match="teacher"):
        DiffusionTask(DiffusionTaskConfig(data=str(data), init="inherit"), seed=0)
    with pytest.raises(ValueError, match="attention"):
        DiffusionTask(DiffusionTaskConfig(data=str(data), attention="dense"), seed=0)
    with pytest.raises(ValueError, match="fid_classifier"):
        DiffusionTask(DiffusionTaskConfig(data=str(data), fid_samples=10), seed=0)
    with pytest.raises(FileNotFoundError, match="subq train dit"):
        load_dit("/nonexistent/run")


def test_sample_dit_writes_a_grid_by_class_and_its_record(teacher, data, tmp_path):
    import numpy
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", "dit", "--checkpoint", str(teacher), "--out", str(out),
                 "--per-class", "2", "--steps", "3", "--seed", "5"]) == 0
    grid = torch.from_numpy(numpy.array(Image.open(out))).long()
    assert grid.shape == (10 * 30, 2 * 30)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["samples"] == 20 and record["steps"] == 3 and record["seconds_per_step"] > 0
    model = load_dit(teacher)
    diffusion = GaussianDiffusion.linear(50)
    images = generate(model, diffusion, 20, steps=3, seed=5)
    # sample i has label i % 10: row c of the grid holds samples c and c + 10
    row, col = 3, 1
    tile = grid[row * 30 + 1:row * 30 + 29, col * 30 + 1:col * 30 + 29]
    assert torch.equal(tile, to_uint8(images[col * 10 + row, 0]).long())


def test_image_grid_tiles_rows_first():
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    grid = image_grid(images, rows=2)
    assert grid.shape == (2 * 6, 3 * 6) and grid.dtype == torch.uint8
    assert torch.equal(grid[7:11, 13:17], to_uint8(images[5, 0]))
    with pytest.raises(ValueError, match="rows"):
        image_grid(images, rows=4)
