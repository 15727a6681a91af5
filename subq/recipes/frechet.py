"""FID-FMNIST: an offline image-quality score of Fashion-MNIST samples (e.g. a diffusion
model's), the Fréchet distance between Gaussian fits of the penultimate features of this
project's own small CNN classifier (:class:`subq.models.cnn.FeatureCNN`, trained with
``subq train vision --backbone cnn --preset micro``).

With ``(mu1, S1)`` the mean and covariance of the samples' features and ``(mu2, S2)`` those of
the real test images' features,

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)),

the squared Fréchet (2-Wasserstein) distance between the two Gaussians. This is the formula of
FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) applied to this project's CNN features, NOT FID: there is no
Inception network, the features are 128-wide (``micro``), and the values are not comparable
with the FIDs reported on ImageNet-trained Inception features, nor between differently trained
classifiers. Like FID it is biased by the sample count (the covariance estimates' noise adds
to it, more with fewer samples): compare scores only at equal sample counts (and the same
reference set and classifier checkpoint).

The matrix square roots are those of symmetric positive semi-definite matrices, computed in
float64 by ``torch.linalg.eigh`` (eigenvalues below zero from round-off clipped to 0); no
scipy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..models.cnn import FeatureCNN

TRAIN_HINT = "train one with `subq train vision --backbone cnn --preset micro`"

Statistics = tuple[torch.Tensor, torch.Tensor]
"""``(mu (D,), sigma (D, D))``, float64."""


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD square root of symmetric ``matrix`` (negative eigenvalues -> 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The squared Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^(1/2) S2
    S1^(1/2))^(1/2))`` between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (tensors or arrays:
    means ``(D,)``, covariances ``(D, D)``), in float64 on ``sigma1``'s device (the covariances
    symmetrised, negative eigenvalues from round-off clipped to 0; a result below zero from
    round-off is returned as 0). ``ValueError`` on mismatched shapes or non-finite values."""
    device = sigma1.device if isinstance(sigma1, torch.Tensor) else None
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64, device=device)
                                for t in (mu1, sigma1, mu2, sigma2))
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"the means must be vectors of one length, got {tuple(mu1.shape)} and "
                         f"{tuple(mu2.shape)}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} has shape {tuple(sigma.shape)}, expected ({dim}, {dim}) "
                             "to match the means")
    if not all(torch.isfinite(t).all() for t in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the statistics hold non-finite values")
    sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
    root1 = _psd_sqrt(sigma1)
    inner = _symmetric(root1 @ sigma2 @ root1)
    cross = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(float(d2), 0.0)


def _device(module: torch.nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device(torch.get_default_device())


def feature_statistics(classifier: FeatureCNN, images: torch.Tensor, batch: int = 500
                       ) -> Statistics:
    """``(mu (D,), sigma (D, D))``: the mean and unbiased covariance (float64, on the CPU) of
    ``classifier.features`` over ``images`` (float ``(N, 1, 28, 28)`` in ``[-1, 1]``; uint8
    pixels ``0..255`` are scaled to that range), run in eval mode under ``no_grad`` in batches
    of ``batch`` on the classifier's device (its train/eval mode is restored after)."""
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"need an image batch (N, C, H, W) of N >= 2 images, got "
                         f"{tuple(images.shape)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device, training = _device(classifier), classifier.training
    classifier.eval()
    parts = []
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch):
                x = images[i:i + batch].to(device)
                x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
                parts.append(classifier.features(x).to("cpu", torch.float64))
    finally:
        classifier.train(training)
    features = torch.cat(parts)
    return features.mean(dim=0), torch.cov(features.T, correction=1)


def reference_statistics(classifier: FeatureCNN, data: str | os.PathLike | None = None,
                         count: int = 0, batch: int = 500) -> Statistics:
    """:func:`feature_statistics` of the first ``count`` (0: all 10,000) Fashion-MNIST test
    images (from ``data``, a folder of the idx files, else the Debian package; see
    :func:`subq.tasks.fashion_mnist.load_fashion_mnist`): FID-FMNIST's reference."""
    from ..tasks.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist(None if data is None else str(data)).as_tensors("test")
    return feature_statistics(classifier, images[:count or images.shape[0]], batch)


def load_feature_classifier(checkpoint_path: str | os.PathLike,
                            device: torch.device | str | None = None) -> FeatureCNN:
    """The ``cnn`` backbone of a ``subq train vision`` checkpoint (``OUT/checkpoint.pt``, or
    the run folder ``OUT``) with its trained weights, in eval mode on ``device`` (default:
    torch's default device).

    ``FileNotFoundError`` when there is no such file, ``ValueError`` when it is not a vision
    checkpoint or its backbone is not ``cnn``; both say how to train one.
    """
    from .vision import load_vision_model

    target = torch.device(torch.get_default_device() if device is None else device)
    return load_vision_model(checkpoint_path, target, backbone="cnn", hint=TRAIN_HINT)


def fid_fmnist(classifier: FeatureCNN, images: torch.Tensor,
               reference: Statistics | Callable[[FeatureCNN], Statistics]) -> float:
    """FID-FMNIST of ``images`` (float ``(N, 1, 28, 28)`` in ``[-1, 1]``, or uint8 pixels):
    :func:`frechet_distance` between :func:`feature_statistics` of ``images`` and
    ``reference``, the ``(mu, sigma)`` of the real test set's features under the same
    classifier, or a function of the classifier that computes them (e.g.
    :func:`reference_statistics`). Compare values only at equal ``N``."""
    mu, sigma = feature_statistics(classifier, images)
    ref_mu, ref_sigma = reference(classifier) if callable(reference) else reference
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)
