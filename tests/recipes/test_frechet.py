"""FID-FMNIST (subq/recipes/frechet.py): the Fréchet distance against its closed form for
diagonal covariances and against scipy's matrix square root for full ones, its zero and
symmetry, PSD round-off, the feature statistics, and the classifier loaded from a
``subq train vision --backbone cnn`` checkpoint (generated idx files; never the network)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from subq.cli import main
from subq.models.vit import build_backbone
from subq.recipes.frechet import (
    feature_statistics,
    fid_fmnist,
    frechet_distance,
    load_feature_classifier,
    reference_statistics,
)
from subq.tasks.fashion_mnist import load_fashion_mnist
from tests.fashion_data import write_tiny_fashion_mnist

N_TRAIN, N_TEST = 16, 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _covariance(dim, rank, seed):
    a = torch.randn(dim, rank, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / rank


def _scipy_distance(mu1, s1, mu2, s2):
    """FID's reference implementation: scipy's sqrtm of the product ``S1 S2``."""
    mu1, s1, mu2, s2 = (np.asarray(t, dtype=np.float64) for t in (mu1, s1, mu2, s2))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", range(4))
def test_diagonal_covariances_match_the_closed_form(seed):
    g = _gen(seed)
    dim = 12
    a, b = torch.rand(dim, generator=g) * 3 + 0.01, torch.rand(dim, generator=g) * 3 + 0.01
    mu1, mu2 = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_full_covariances_match_scipy_sqrtm(seed):
    dim = 16
    s1, s2 = _covariance(dim, 2 * dim, 10 + seed), _covariance(dim, 3 * dim, 20 + seed)
    mu1 = torch.randn(dim, generator=_gen(30 + seed), dtype=torch.float64)
    mu2 = torch.randn(dim, generator=_gen(40 + seed), dtype=torch.float64)
    expected = _scipy_distance(mu1, s1, mu2, s2)
    assert expected > 0.1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    # numpy arrays and float32 tensors are accepted (computed in float64)
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == (
        pytest.approx(expected, rel=1e-7))
    assert frechet_distance(mu1.float(), s1.float(), mu2.float(), s2.float()) == (
        pytest.approx(expected, rel=1e-4))


def test_identical_statistics_give_zero_and_the_distance_is_symmetric():
    dim = 20
    s1, s2 = _covariance(dim, 40, 1), _covariance(dim, 25, 2)
    mu1 = torch.randn(dim, generator=_gen(3), dtype=torch.float64)
    mu2 = mu1 + 0.3 * torch.randn(dim, generator=_gen(4), dtype=torch.float64)
    assert frechet_distance(mu1, s1, mu1.clone(), s1.clone()) == pytest.approx(
        0.0, abs=1e-9 * float(s1.trace()))
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert forward > 0.1
    assert backward == pytest.approx(forward, rel=1e-9)
    shifted = frechet_distance(mu1 + 1.0, s1, mu1, s1)  # same covariance: |dmu|^2 alone
    assert shifted == pytest.approx(dim, rel=1e-7)


def test_singular_covariances_stay_finite():
    """Rank-deficient covariances (fewer samples than features) have eigenvalues that
    round-off makes slightly negative: they are clipped, the result is finite and >= 0."""
    dim = 24
    s1, s2 = _covariance(dim, 5, 5), _covariance(dim, 7, 6)
    mu = torch.randn(dim, generator=_gen(7), dtype=torch.float64)
    assert torch.linalg.eigvalsh(s1).min() < 0  # round-off below zero, as in practice
    same = frechet_distance(mu, s1, mu, s1)
    assert 0.0 <= same < 1e-6 * float(s1.trace())
    other = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(other) and other == pytest.approx(_scipy_distance(mu, s1, mu, s2),
                                                         rel=1e-4, abs=1e-6)


def test_mismatched_shapes_are_refused():
    mu, sigma = torch.randn(4), torch.eye(4)
    with pytest.raises(ValueError, match="means"):
        frechet_distance(mu, sigma, torch.randn(5), torch.eye(5))
    with pytest.raises(ValueError, match="sigma2 has shape"):
        frechet_distance(mu, sigma, mu, torch.eye(3))
    with pytest.raises(ValueError, match="sigma1 has shape"):
        frechet_distance(mu, torch.randn(4), mu, sigma)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, sigma, mu + float("nan"), sigma)


def test_feature_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    classifier = build_backbone("cnn", "tiny").train()
    images = torch.rand(23, 1, 28, 28, generator=_gen(1)) * 2 - 1
    mu, sigma = feature_statistics(classifier, images, batch=7)  # 7 does not divide 23
    assert classifier.training  # its mode is restored
    classifier.eval()
    with torch.no_grad():
        features = classifier.features(images).double()
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (32,) and sigma.shape == (32, 32)
    torch.testing.assert_close(mu, features.mean(dim=0))
    torch.testing.assert_close(sigma, torch.cov(features.T))
    assert float(sigma.trace()) > 0
    # uint8 pixels are read as p / 127.5 - 1
    pixels = torch.randint(0, 256, (9, 1, 28, 28), generator=_gen(2), dtype=torch.uint8)
    mu_u8, sigma_u8 = feature_statistics(classifier, pixels)
    mu_f, sigma_f = feature_statistics(classifier, pixels.float() / 127.5 - 1)
    torch.testing.assert_close(mu_u8, mu_f)
    torch.testing.assert_close(sigma_u8, sigma_f)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fashion"), N_TRAIN, N_TEST)


def _train(data, out, backbone, steps):
    assert main(["train", "vision", "--backbone", backbone, "--preset", "tiny", "--data",
                 str(data), "--out", str(out), "--batch", "4", "--warmup", "1",
                 "--log-every", "1", "--eval-batch", "8", "--no-progress",
                 "--steps", str(steps)]) == 0
    return out / "checkpoint.pt"


def test_cnn_checkpoint_loads_with_its_trained_weights(data, tmp_path):
    path = _train(data, tmp_path / "cnn", "cnn", 3)
    classifier = load_feature_classifier(path)
    assert not classifier.training
    saved = torch.load(path, map_location="cpu", weights_only=False)
    torch.manual_seed(123)
    trained = build_backbone("cnn", "tiny")
    fresh = build_backbone("cnn", "tiny").eval()
    trained.load_state_dict(saved["model"])
    trained.eval()
    x = torch.rand(5, 1, 28, 28, generator=_gen(3)) * 2 - 1
    with torch.no_grad():
        logits = classifier(x)
        torch.testing.assert_close(logits, trained(x), rtol=0, atol=0)
        assert not torch.allclose(logits, fresh(x))  # the weights were loaded, not re-drawn
    assert torch.equal(load_feature_classifier(tmp_path / "cnn")(x), logits)  # run folder
    # FID-FMNIST of the test images against their own statistics is 0, of other images not
    real, _ = load_fashion_mnist(data).as_tensors("test")
    reference = lambda c: reference_statistics(c, data)  # noqa: E731
    assert fid_fmnist(classifier, real, reference) == pytest.approx(0.0, abs=1e-6)
    noise = torch.rand(N_TEST, 1, 28, 28, generator=_gen(4)) * 2 - 1
    score = fid_fmnist(classifier, noise, reference_statistics(classifier, data))
    assert score > 1e-3
    assert fid_fmnist(classifier, noise, reference) == pytest.approx(score, rel=1e-12)


def test_other_backbones_and_missing_files_are_refused(data, tmp_path):
    path = _train(data, tmp_path / "vit", "vit-dense", 1)
    with pytest.raises(ValueError, match=r"'vit-dense'.*'cnn'.*--backbone cnn --preset micro"):
        load_feature_classifier(path)
    with pytest.raises(FileNotFoundError, match="subq train vision --backbone cnn"):
        load_feature_classifier(tmp_path / "nowhere" / "checkpoint.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a `subq train vision` checkpoint"):
        load_feature_classifier(tmp_path / "other.pt")
