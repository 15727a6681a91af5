"""FeatureCNN (subq/models/cnn.py): feature and logit shapes, the logits as the head of the
features, seeded determinism, device-agnostic construction, and the parameter counts that the
module docstring states."""

from __future__ import annotations

import pytest
import torch

from subq.models import cnn
from subq.models.cnn import CNN_PRESETS, FeatureCNN, cnn_backbone
from subq.models.counting import count_on_meta, num_parameters
from subq.models.vit import PRESETS, build_backbone

#: The counts written in subq/models/cnn.py's docstring.
DOCUMENTED = {"tiny": 29_650, "micro": 468_010}


def _images(batch, seed=1):
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_counts_are_the_documented_ones(preset):
    count = count_on_meta(lambda: cnn_backbone(preset))
    assert count == DOCUMENTED[preset]
    assert f"{count:,} parameters" in cnn.__doc__
    assert num_parameters(build_backbone("cnn", preset)) == count  # meta count == real count


@pytest.mark.parametrize("preset", PRESETS)
def test_features_and_logits_shapes(preset):
    torch.manual_seed(0)
    model = cnn_backbone(preset).eval()
    x = _images(3)
    with torch.no_grad():
        features, logits = model.features(x), model(x)
    dim = CNN_PRESETS[preset]["feature_dim"]
    assert features.shape == (3, dim) and logits.shape == (3, 10)
    assert (features >= 0).all() and (features > 0).any()  # after the ReLU, not all dead
    assert torch.allclose(logits, model.head(features), atol=1e-6)
    assert not torch.allclose(features[0], features[1])  # the features depend on the image


def test_seeded_construction_is_deterministic():
    x = _images(4, seed=2)
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(cnn_backbone("tiny").eval().features(x))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])


def test_train_mode_batch_norm_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = cnn_backbone("tiny").train()
    model(_images(4)).logsumexp(dim=-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(m.num_batches_tracked == 1 for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_builds_and_runs_on_another_device():
    """No hard-coded device: the model builds and runs on the meta device."""
    with torch.device("meta"):
        model = cnn_backbone("micro")
        features = model.features(torch.empty(2, 1, 28, 28))
    assert features.device.type == "meta" and features.shape == (2, 128)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="preset must be one of"):
        cnn_backbone("huge")
    with pytest.raises(ValueError, match="preset must be one of"):
        build_backbone("cnn", "huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        FeatureCNN(image=30)
    with pytest.raises(ValueError, match="image batch"):
        cnn_backbone("tiny").features(torch.randn(1, 28, 28))
