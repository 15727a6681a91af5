"""Sampling a :class:`~subq.recipes.gaussian_diffusion.GaussianDiffusion`: ancestral DDPM
(Ho et al. 2020) with the learned variance, deterministic or stochastic DDIM (Song et al.
2021), and classifier-free guidance (Ho & Salimans 2022) for a class-conditional DiT.

DDPM, for ``i = T' - 1 .. 0`` (``T'`` steps of the possibly respaced process)::

    x_{i-1} = mu(x_i, i) + [i > 0] exp(log Sigma_i / 2) z,      z ~ N(0, I)

DDIM with ``eta`` (0: deterministic), ``x0_hat`` clipped to ``[-1, 1]`` and ``eps`` recomputed
from it::

    sigma_i = eta sqrt((1 - abar_{i-1}) / (1 - abar_i)) sqrt(1 - abar_i / abar_{i-1})
    x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma_i^2) eps + [i > 0] sigma_i z

Classifier-free guidance at scale ``w``: ``eps = eps(x, null) + w (eps(x, y) - eps(x, null))``
(DiT's :meth:`~subq.models.dit.DiT.forward_with_cfg`; ``w = 1`` is the conditional model).

Every random draw (the start ``x_T`` and each step's ``z``) comes from a CPU generator seeded
by ``seed``, then moves to the device, so a seed gives the same samples on any device up to
its arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from .gaussian_diffusion import GaussianDiffusion, ModelFn

SAMPLERS = ("ddpm", "ddim")


def guided(model: nn.Module, labels: torch.Tensor, cfg_scale: float = 1.0,
           **inputs: torch.Tensor) -> ModelFn:
    """``model_fn(x, t)`` of a class-conditional DiT for ``labels`` (and extra keyword
    ``inputs``, e.g. Scale-DiT's guide ``lo``): the conditional model at ``cfg_scale == 1``,
    classifier-free guidance otherwise (labels never dropped at random)."""
    if cfg_scale == 1.0:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        return lambda x, t: model(x, t, labels, force_drop=keep, **inputs)
    return lambda x, t: model.forward_with_cfg(x, t, labels, cfg_scale, **inputs)


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape: tuple[int, ...], *,
           seed: int, device: torch.device | str | None = None, sampler: str = "ddpm",
           eta: float = 0.0, dtype: torch.dtype = torch.float32,
           init: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
    """Samples ``shape`` (``(B, C, H, W)``) from ``diffusion`` (respace it first for fewer
    steps) with ``sampler`` ``"ddpm"`` or ``"ddim"``, in ``[-1, 1]`` up to the last step's
    noise.

    ``init`` (SDEdit, Meng et al. 2022; Scale-DiT's ``interpolation_init``): start from
    ``init`` noised to step ``steps - 1``, ``x = q(x_{steps-1} | init)``, and run only the
    last ``steps`` steps; without it, all steps from pure noise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    count = diffusion.num_timesteps if steps is None else steps
    if not 1 <= count <= diffusion.num_timesteps:
        raise ValueError(f"steps must be in [1, {diffusion.num_timesteps}], got {steps}")
    if steps is not None and init is None:
        raise ValueError("steps (the last steps to run) needs init, the image to start from")
    if init is not None and tuple(init.shape) != tuple(shape):
        raise ValueError(f"init must have the sample shape {tuple(shape)}, got "
                         f"{tuple(init.shape)}")
    generator = torch.Generator().manual_seed(seed)

    def normal() -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype)

    x = normal()
    if init is not None:
        first = torch.full((shape[0],), count - 1, dtype=torch.long, device=x.device)
        x = diffusion.q_sample(init.to(x.device, dtype), first, x)
    step = ddpm_step if sampler == "ddpm" else ddim_step
    for i in reversed(range(count)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
        output = model_fn(x, diffusion.timestep_map.to(x.device)[t])
        x = step(diffusion, output, x, t, normal() if i > 0 else None, eta)
    return x


def ddpm_step(diffusion: GaussianDiffusion, output: torch.Tensor, x: torch.Tensor,
              t: torch.Tensor, noise: torch.Tensor | None, eta: float = 0.0) -> torch.Tensor:
    """One ancestral step: ``mu + exp(log Sigma / 2) noise`` (``noise`` None at ``t = 0``)."""
    pred = diffusion.p_mean_variance(output, x, t, clip=True)
    if noise is None:
        return pred.mean
    return pred.mean + torch.exp(0.5 * pred.log_variance) * noise


def ddim_step(diffusion: GaussianDiffusion, output: torch.Tensor, x: torch.Tensor,
              t: torch.Tensor, noise: torch.Tensor | None, eta: float = 0.0) -> torch.Tensor:
    """One DDIM step with ``eta`` (the module docstring's update)."""
    pred = diffusion.p_mean_variance(output, x, t, clip=True)
    eps = diffusion.eps_from_x0(x, t, pred.pred_x0)
    abar = diffusion._at(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion._at(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    out = abar_prev.sqrt() * pred.pred_x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return out if noise is None else out + sigma * noise


__all__ = ["SAMPLERS", "ddim_step", "ddpm_step", "guided", "sample"]
