"""Data: seeded, offline generators of synthetic tasks (``joint_recall``, ``mqar``)."""

from .joint_recall import RecallBatch, joint_recall, per_sample_accuracy
from .mqar import mqar

__all__ = ["RecallBatch", "joint_recall", "mqar", "per_sample_accuracy"]
