"""LiT's recipe around the linear DiT (Wang et al. 2025, arXiv 2501.12976, spec ``lit.md``
sections 1.4-1.5): weight inheritance from a trained softmax DiT and hybrid distillation.

**Inheritance.** The student loads every parameter of the teacher outside self attention
(patch embedding, timestep and label embedders, every adaLN modulation, MLP and the final
layer), exactly; the attention tensors (``blocks.*.attn.*``: ``qkv``, ``proj``, and LiT's new
``dwc``) keep their fresh initialisation, as LiT's best ablation ("exclude attention") does.
The two models must agree on everything but the attention (:func:`check_inheritable`).

**Hybrid distillation.** With the frozen teacher on the same ``(x_t, t, y)``::

    L = L_DiT(student) + lambda_1 |eps_T - eps_S|^2 + lambda_2 |Sigma_T - Sigma_S|^2,
        lambda_1 = 0.5, lambda_2 = 0.05,

each squared norm a mean over dimensions per sample (as L_DiT's MSE). ``Sigma`` is the raw
variance output ``v`` of the model (``variance_target="raw"``, the spec's default: LiT's text
does not say whether the term is on ``v`` or on ``log Sigma``) or the log variance it
interpolates (``"log"``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from typing import Any, NamedTuple

import torch

from ..models.dit import DiT, DiTConfig, shared_parameter_names
from .checkpoint import evaluated_weights, read_run
from .gaussian_diffusion import GaussianDiffusion, mean_flat

DISTILL_NOISE = 0.5
"""LiT's lambda_1 (the weight of the noise term)."""
DISTILL_VARIANCE = 0.05
"""LiT's lambda_2 (the weight of the variance term)."""
VARIANCE_TARGETS = ("raw", "log")

_ATTENTION_FIELDS = {"attention", "attention_heads", "attention_options"}


class Inheritance(NamedTuple):
    """What :func:`inherit_weights` did: ``loaded`` (names copied from the teacher) and
    ``fresh`` (the student's names left at their initialisation)."""

    loaded: list[str]
    fresh: list[str]


def load_dit_run(checkpoint: str | os.PathLike, device: torch.device | str | None = None
                 ) -> tuple[DiT, dict[str, Any]]:
    """The trained DiT of a ``subq train dit`` run (``OUT/checkpoint.pt`` or ``OUT``), in eval
    mode, on ``device`` (default: the CPU), and the run's task settings."""
    path, saved = read_run(checkpoint, "train a teacher with `subq train dit --attention "
                                       "softmax --out DIR`")
    task = saved.get("config", {}).get("task", {})
    if not isinstance(task.get("model"), dict):
        raise ValueError(f"{path} is not a `subq train dit` checkpoint (no task.model config)")
    model = DiT(DiTConfig(**task["model"]))
    model.load_state_dict(evaluated_weights(saved))
    return model.to(device or "cpu").eval(), task


def load_dit(checkpoint: str | os.PathLike, device: torch.device | str | None = None
             ) -> DiT:
    """The trained DiT of a ``subq train dit`` run (see :func:`load_dit_run`)."""
    return load_dit_run(checkpoint, device)[0]


def check_inheritable(teacher: DiTConfig, student: DiTConfig) -> None:
    """``ValueError`` naming the fields, unless the configs differ in attention alone."""
    differ = [f.name for f in fields(DiTConfig) if f.name not in _ATTENTION_FIELDS
              and getattr(teacher, f.name) != getattr(student, f.name)]
    if differ:
        a, b = asdict(teacher), asdict(student)
        details = ", ".join(f"{name}: teacher {a[name]!r}, student {b[name]!r}" for name in differ)
        raise ValueError(f"the student must equal the teacher outside attention to inherit its "
                         f"weights; they differ in {details}")


def inherit_weights(student: DiT, teacher: DiT) -> Inheritance:
    """Copy every parameter of ``teacher`` outside attention into ``student`` (in place);
    returns the names loaded and the names left fresh."""
    check_inheritable(teacher.cfg, student.cfg)
    split = shared_parameter_names(teacher.cfg, student.cfg)
    if split.mismatched:
        raise ValueError(f"parameters of different shapes outside attention: {split.mismatched}")
    source = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name in split.shared:
                param.copy_(source[name])
    return Inheritance(loaded=list(split.shared),
                       fresh=[n for n, _ in student.named_parameters() if n not in split.shared])


def hybrid_distillation(diffusion: GaussianDiffusion, student_output: torch.Tensor,
                        teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                        noise_weight: float = DISTILL_NOISE,
                        variance_weight: float = DISTILL_VARIANCE,
                        variance_target: str = "raw") -> torch.Tensor:
    """Per sample ``lambda_1 mean|eps_T - eps_S|^2 + lambda_2 mean|Sigma_T - Sigma_S|^2``
    (the variance term only when the models learn it); the teacher's outputs are targets
    (no gradient)."""
    if variance_target not in VARIANCE_TARGETS:
        raise ValueError(f"variance_target must be one of {', '.join(VARIANCE_TARGETS)}; got "
                         f"{variance_target!r}")
    eps_s, v_s = diffusion.split_output(student_output.float(), x_t)
    eps_t, v_t = diffusion.split_output(teacher_output.detach().float(), x_t)
    loss = noise_weight * mean_flat((eps_t - eps_s) ** 2)
    if v_s is None or variance_weight == 0:
        return loss
    if variance_target == "log":
        v_s, v_t = diffusion.log_variance(v_s, t, x_t), diffusion.log_variance(v_t, t, x_t)
    return loss + variance_weight * mean_flat((v_t - v_s) ** 2)


__all__ = ["DISTILL_NOISE", "DISTILL_VARIANCE", "VARIANCE_TARGETS", "Inheritance",
           "check_inheritable", "hybrid_distillation", "inherit_weights", "load_dit",
           "load_dit_run"]
