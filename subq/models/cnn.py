"""A small convolutional classifier of 28 x 28 single-channel images (Fashion-MNIST) in 10
classes, whose penultimate activations are the feature space of FID-FMNIST
(:mod:`subq.recipes.frechet`); registered as the vision backbone ``cnn``
(:func:`subq.models.vit.build_backbone`) and meant as the teacher of GroupMamba's distillation,
so it stays a plain classifier.

:class:`FeatureCNN` on ``(B, 1, 28, 28)`` images in ``[-1, 1]``, widths ``c1, c2`` and feature
width ``F`` (3 x 3 convolutions, padding 1, no bias: the batch norm after each has one)::

    Conv3x3(1 -> c1)-BN-ReLU, Conv3x3(c1 -> c1)-BN-ReLU, MaxPool2x2      28 -> 14
    Conv3x3(c1 -> c2)-BN-ReLU, Conv3x3(c2 -> c2)-BN-ReLU, MaxPool2x2     14 -> 7
    flatten (c2 * 7 * 7), Linear(c2 * 7 * 7 -> F), ReLU                  features (B, F)
    Linear(F -> 10)                                                      logits (B, 10)

Presets (:data:`CNN_PRESETS`), parameter counts measured with
:func:`~subq.models.counting.count_on_meta` (batch-norm running statistics are buffers, not
counted):

* ``tiny``: ``c1, c2, F = 8, 16, 32``: 29,650 parameters (for tests);
* ``micro``: ``c1, c2, F = 32, 64, 128``: 468,010 parameters.

Unlike the ViTs, this backbone is not sized to GroupMamba's parameter count (``micro`` has
about 0.39 times GroupMamba micro's 1.21 M).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMAGE_SIZE = 28
IN_CHANS = 1
NUM_CLASSES = 10

CNN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(widths=(8, 16), feature_dim=32),
    "micro": dict(widths=(32, 64), feature_dim=128),
}
"""FeatureCNN sizes, keyed like :data:`subq.models.vit.PRESETS`."""


def conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    """``Conv3x3(in -> out, padding 1, no bias)``, ``BatchNorm2d(out)``, ``ReLU``."""
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_chans), nn.ReLU())


class FeatureCNN(nn.Module):
    """The classifier ``(B, in_chans, image, image) -> logits (B, num_classes)``; see the
    module docstring for its layers. :meth:`features` gives the penultimate activations
    ``(B, feature_dim)`` (after the ReLU), :meth:`forward` the logits."""

    def __init__(self, widths: tuple[int, int] = (32, 64), feature_dim: int = 128, *,
                 in_chans: int = IN_CHANS, image: int = IMAGE_SIZE,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if len(widths) != 2 or min(widths) < 1 or feature_dim < 1:
            raise ValueError(f"need two positive widths and feature_dim >= 1, got {widths} "
                             f"and {feature_dim}")
        if image % 4:
            raise ValueError(f"the image side ({image}) must be a multiple of 4 (two 2 x 2 "
                             "poolings)")
        c1, c2 = widths
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            conv_bn_relu(in_chans, c1), conv_bn_relu(c1, c1), nn.MaxPool2d(2),
            conv_bn_relu(c1, c2), conv_bn_relu(c2, c2), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(c2 * (image // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> penultimate activations ``(B, feature_dim)`` (>= 0)."""
        if x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape)}")
        return torch.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn_backbone(preset: str) -> FeatureCNN:
    """:class:`FeatureCNN` at ``preset`` (:data:`CNN_PRESETS`) for one-channel 28 x 28 images,
    10 classes."""
    if preset not in CNN_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(CNN_PRESETS)}; got {preset!r}")
    return FeatureCNN(**CNN_PRESETS[preset])
