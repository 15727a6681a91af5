"""Scale-DiT's recipe (subq/recipes/scale_dit.py, ``subq sample dit --resolution``) on tiny
generated idx files: SDEdit's start in the sampler, the LoRA bridge trained on the one
trainer with the base frozen, the high-resolution pipeline's low-resolution pass equal to
``subq sample dit``'s samples, determinism per seed, and the grid and record it writes."""

from __future__ import annotations

import json

import pytest
import torch

from subq.cli import main
from subq.models.scale_dit import ScaleDiT, ScaleDiTConfig
from subq.recipes.checkpoint import read_run
from subq.recipes.diffusion_sampling import sample
from subq.recipes.dit import generate
from subq.recipes.gaussian_diffusion import GaussianDiffusion
from subq.recipes.lit import load_dit
from subq.recipes.scale_dit import generate_high_res, load_bridge, upsample
from subq.recipes.trainer import read_metrics
from tests.fashion_data import write_tiny_fashion_mnist
from tests.helpers import diffusion_oracle

F64 = torch.float64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fashion"), 16, 8)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "dit", "--preset", "tiny", "--data", str(data), "--out", str(out),
                 "--batch", "4", "--steps", "2", "--warmup", "1", "--eval-batch", "4",
                 "--diffusion-steps", "50", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def bridge(data, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge") / "run"
    assert main(["train", "scale-dit", "--base", str(base), "--resolution", "56", "--data",
                 str(data), "--out", str(out), "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--lr", "0.01", "--eval-images", "4", "--eval-batch", "2", "--log-every", "1",
                 "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sdedit_start_runs_the_last_steps_to_the_model_s_x0(sampler):
    process = GaussianDiffusion.linear(50).respaced(10)
    init = torch.rand(2, 1, 4, 4, dtype=F64) * 1.8 - 0.9
    target = torch.rand(2, 1, 4, 4, dtype=F64) * 1.8 - 0.9
    out = sample(process, diffusion_oracle(process, target), (2, 1, 4, 4), seed=2, sampler=sampler,
                 dtype=F64, init=init, steps=4)
    torch.testing.assert_close(out, target, rtol=1e-8, atol=1e-8)
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    sample(process, counting, (2, 1, 4, 4), seed=2, sampler=sampler, dtype=F64, init=init,
           steps=4)
    assert calls == [int(s) for s in process.timestep_map[:4].flip(0)]
    with pytest.raises(ValueError, match="needs init"):
        sample(process, counting, (2, 1, 4, 4), seed=2, steps=4)


def test_the_bridge_trains_only_lora_on_the_one_trainer(base, bridge):
    metrics = read_metrics(bridge)
    assert [m["step"] for m in metrics if "loss" in m and "split" not in m] == [1, 2]
    test = [m for m in metrics if m.get("split") == "test"]
    assert test and test[-1]["resolution"] == 56 and test[-1]["mse"] > 0
    saved = read_run(bridge, "")[1]
    teacher = load_dit(base)
    model = load_bridge(bridge, teacher)
    reference = ScaleDiT.from_dit(teacher, ScaleDiTConfig(resolution=56))
    for (name, trained), (_, start) in zip(model.state_dict().items(),
                                           reference.state_dict().items(), strict=True):
        if "lora_" not in name:
            assert torch.equal(trained, start), name  # the base stays frozen
    # B starts at zero; it moved wherever the guide's tokens reach the output (the last
    # block's low-res outputs are never read, so its proj and MLP bridges get no gradient)
    for block in model.blocks:
        assert block.qkv.lora_b.abs().max() > 0 and block.modulation.lora_b.abs().max() > 0
    assert model.patch_lora_b.abs().max() > 0
    assert model.blocks[0].proj.lora_b.abs().max() > 0
    assert model.blocks[-1].proj.lora_b.abs().max() == 0
    assert saved["config"]["task"]["scale"]["resolution"] == 56


def test_high_res_pipeline_guides_with_the_low_res_samples(base, bridge):
    teacher = load_dit(base)
    model = load_bridge(bridge, teacher)
    diffusion = GaussianDiffusion.linear(50)
    low, high = generate_high_res(teacher, model, diffusion, 3, steps=4, seed=7)
    assert torch.equal(low, generate(teacher, diffusion, 3, steps=4, seed=7))
    assert high.shape == (3, 1, 56, 56) and high.abs().max() <= 1
    again = generate_high_res(teacher, model, diffusion, 3, steps=4, seed=7)[1]
    other = generate_high_res(teacher, model, diffusion, 3, steps=4, seed=8)[1]
    assert torch.equal(high, again) and not torch.equal(high, other)
    unguided_low, unguided = generate_high_res(teacher, model, diffusion, 3, steps=4, seed=7,
                                               guidance=False)
    assert unguided_low is None and unguided.shape == high.shape
    with pytest.raises(ValueError, match="refine_steps"):
        generate_high_res(teacher, model, diffusion, 3, steps=4, refine_steps=5)
    assert upsample(low, 56).shape == (3, 1, 56, 56)


def test_sample_dit_at_twice_the_size_writes_grid_and_record(base, bridge, tmp_path):
    import numpy
    from PIL import Image

    out = tmp_path / "grid56.png"
    assert main(["sample", "dit", "--checkpoint", str(base), "--resolution", "56",
                 "--bridge", str(bridge), "--attention", "softmax", "--out", str(out),
                 "--per-class", "1", "--steps", "4", "--refine-steps", "2"]) == 0
    grid = numpy.array(Image.open(out))
    assert grid.shape == (10 * 58, 58)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["scale"]["attention"] == "softmax" and record["scale"]["resolution"] == 56
    assert record["high_res_steps"] == 2 and record["samples"] == 10
    assert record["seconds"] > 0 and record["peak_memory_mib"] >= 0
