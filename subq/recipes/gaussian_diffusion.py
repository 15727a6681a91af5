"""The Gaussian diffusion DiT and LiT train with: DDPM's forward process (Ho et al. 2020) and
the learned-variance objective of Improved DDPM (Nichol & Dhariwal 2021, "IDDPM"), written from
the papers.

Forward process over ``T`` steps with betas ``beta_t`` (``t = 0 .. T-1``), ``alpha_t = 1 -
beta_t``, ``abar_t = prod_{s <= t} alpha_s`` (``abar_{-1} = 1``)::

    q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)
        mu~_t   = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0
                  + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
        beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

The model predicts the noise ``eps`` and, with ``learn_sigma``, a second output ``v`` that
interpolates the log variance between its two natural bounds (IDDPM eq. 15)::

    log Sigma_t = f log beta_t + (1 - f) log beta~_t,   f = (v + 1) / 2
    x0_hat      = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (clipped to [-1, 1] to sample)
    p(x_{t-1} | x_t) = N(mu~_t(x0_hat, x_t), Sigma_t)

(``beta~_0 = 0``, so its log is taken from ``beta~_1``, as IDDPM does.) Without ``learn_sigma``
the variance is fixed to ``beta_t`` (DDPM's "large" choice, DiT's default; ``beta~_1`` at ``t =
0``).

The loss (IDDPM's L_hybrid = L_simple + lambda L_vlb, DiT's ``training_losses``) per sample::

    L_simple = mean over dimensions of (eps - eps_hat)^2
    L_t      = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / (D ln 2)        t > 0  (bits/dim)
             = -log p(x_0 | x_1) discretised to 256 bins / (D ln 2)              t = 0
    loss     = L_simple + lambda T L_t,          lambda = 0.001

``L_t`` sees ``eps_hat`` through a stop-gradient, so the VLB trains only the variance (IDDPM
section 3.1). ``lambda T L_t`` with ``t`` uniform is lambda times an unbiased estimate of the
whole ``L_vlb = sum_t L_t``; at ``T = 1000`` its weight is 1, DiT's. The decoder's bin
probabilities use the exact normal CDF (IDDPM's code uses a tanh approximation of it).

The betas are IDDPM's "linear" schedule (DDPM's ``1e-4 .. 0.02`` over 1000 steps, rescaled by
``1000 / T`` for other ``T``). :meth:`GaussianDiffusion.respaced` gives the process on a subset
of the timesteps (IDDPM section 4: ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}``) for fast
sampling; its model is still called with the original timesteps (:attr:`timestep_map`).
All tables are float64; values are cast to the input's dtype when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t, t) -> (B, C or 2C, ...)``: the noise (and variance values) for the batch."""

VLB_LAMBDA = 1e-3
"""IDDPM's weight of L_vlb in L_hybrid."""


def linear_betas(steps: int) -> torch.Tensor:
    """IDDPM's linear schedule: ``linspace(1e-4 s, 0.02 s, steps)`` with ``s = 1000 / steps``
    (float64), for ``steps > 20``."""
    if steps <= 20:
        raise ValueError(f"the linear schedule needs steps > 20 (its last beta, 20 / steps, "
                         f"must stay below 1), got {steps}")
    scale = 1000.0 / steps
    return torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """``log P(x)`` elementwise for 8-bit data scaled to ``[-1, 1]`` under ``N(mean,
    e^(2 log_scale))`` discretised to 256 bins of width ``2 / 255`` centred on the data values,
    the outer bins extended to infinity (DDPM's decoder)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centred + 1.0 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (centred - 1.0 / 255))
    tiny = torch.finfo(torch.float32).tiny
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_survival = torch.log((1.0 - cdf_minus).clamp(min=tiny))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=tiny))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_survival, log_bin))


@dataclass
class Prediction:
    """``p(x_{t-1} | x_t)`` of one model call: its mean, variance, log variance, the model's
    noise ``eps`` and its estimate of ``x_0``."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    eps: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """The forward process, the reverse step and IDDPM's loss (see the module docstring).

    ``betas`` (``T``,): the schedule; ``learn_sigma``: the model outputs ``[eps, v]`` (2C
    channels) rather than ``eps``; ``timestep_map``: the timestep the model is told for each
    of this process's steps (the identity, or the kept steps of :meth:`respaced`).
    """

    def __init__(self, betas: torch.Tensor, *, learn_sigma: bool = True,
                 timestep_map: torch.Tensor | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas, self.learn_sigma = betas, learn_sigma
        self.num_timesteps = betas.numel()
        self.timestep_map = (torch.arange(self.num_timesteps) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long))
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        floor = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([floor.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = (betas * self.alphas_cumprod_prev.sqrt()
                                     / (1 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1 - self.alphas_cumprod_prev) * alphas.sqrt()
                                     / (1 - self.alphas_cumprod))
        self.fixed_log_variance = torch.log(torch.cat([floor.reshape(1), betas[1:]]))

    @classmethod
    def linear(cls, steps: int = 1000, *, learn_sigma: bool = True) -> GaussianDiffusion:
        """The process on IDDPM's linear schedule of ``steps`` steps."""
        return cls(linear_betas(steps), learn_sigma=learn_sigma)

    def respaced(self, count: int) -> GaussianDiffusion:
        """The process on ``count`` of this one's timesteps, evenly spaced from ``0`` to
        ``T - 1`` (IDDPM section 4): ``beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}``; the same
        ``abar`` at every kept step."""
        if not 1 <= count <= self.num_timesteps:
            raise ValueError(f"count must be in [1, {self.num_timesteps}], got {count}")
        kept = torch.linspace(0, self.num_timesteps - 1, count, dtype=torch.float64).round()
        kept = kept.long().unique()
        abar = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1 - abar / previous, learn_sigma=self.learn_sigma,
                                 timestep_map=self.timestep_map[kept])

    # -- tables ----------------------------------------------------------------------------

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped ``(B, 1, ..., 1)`` to broadcast over ``like``, in its dtype."""
        values = table.to(t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be (B,) = ({batch},), got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must lie in [0, {self.num_timesteps}), got "
                             f"[{int(t.min())}, {int(t.max())}]")

    # -- the forward process ---------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
        self._check_t(t, x0.shape[0])
        return (self._at(self.alphas_cumprod.sqrt(), t, x0) * x0
                + self._at((1 - self.alphas_cumprod).sqrt(), t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mu~_t, beta~_t, log beta~_t (clipped at t = 0))`` of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x0
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._at(self.posterior_variance, t, x_t),
                self._at(self.posterior_log_variance_clipped, t, x_t))

    # -- the reverse process ---------------------------------------------------------------

    def split_output(self, output: torch.Tensor, x_t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(eps, v)`` of a model output (``v`` None without ``learn_sigma``)."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[0] != x_t.shape[0] or output.shape[1] != expected \
                or output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"the model output must be (B, {expected}, ...) like x_t "
                             f"{tuple(x_t.shape)} (learn_sigma={self.learn_sigma}), got "
                             f"{tuple(output.shape)}")
        if not self.learn_sigma:
            return output, None
        return output[:, :channels], output[:, channels:]

    def log_variance(self, v: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor
                     ) -> torch.Tensor:
        """``log Sigma_t``: IDDPM's interpolation by ``v``, or the fixed ``log beta_t``."""
        if v is None:
            return self._at(self.fixed_log_variance, t, like).expand_as(like)
        lower = self._at(self.posterior_log_variance_clipped, t, like)
        upper = self._at(torch.log(self.betas), t, like)
        fraction = (v + 1) / 2
        return fraction * upper + (1 - fraction) * lower

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return (self._at((1 / self.alphas_cumprod).sqrt(), t, x_t) * x_t
                - self._at((1 / self.alphas_cumprod - 1).sqrt(), t, x_t) * eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` (the inverse of :meth:`predict_x0`)."""
        return ((self._at((1 / self.alphas_cumprod).sqrt(), t, x_t) * x_t - x0)
                / self._at((1 / self.alphas_cumprod - 1).sqrt(), t, x_t))

    def p_mean_variance(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                        clip: bool = True) -> Prediction:
        """``p(x_{t-1} | x_t)`` from the model's ``output`` at ``(x_t, t)``; ``clip`` clamps
        ``x0_hat`` to ``[-1, 1]`` (sampling) before it forms the mean."""
        eps, v = self.split_output(output, x_t)
        log_variance = self.log_variance(v, t, x_t)
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return Prediction(mean, torch.exp(log_variance), log_variance, eps, pred_x0)

    # -- the loss --------------------------------------------------------------------------

    def vlb_terms(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
        """``L_t`` per sample in bits per dimension (KL for ``t > 0``, the discretised
        decoder's NLL at ``t = 0``) for the model's ``output`` taken as given."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        pred = self.p_mean_variance(output, x_t, t, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, pred.mean,
                                                             0.5 * pred.log_variance))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor, *, vlb_lambda: float = VLB_LAMBDA
                        ) -> dict[str, torch.Tensor]:
        """Per-sample ``{"mse", "vb", "loss", "output", "x_t"}``: ``loss = mse + lambda T vb``
        (``vb`` is 0 without ``learn_sigma``); ``output`` is the model's raw output, for
        distillation."""
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, self.timestep_map.to(t.device)[t])
        eps, v = self.split_output(output, x_t)
        mse = mean_flat((noise - eps.float()) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1).float()
            vb = self.vlb_terms(frozen, x0.float(), x_t.float(), t)
        loss = mse + vlb_lambda * self.num_timesteps * vb
        return {"mse": mse, "vb": vb, "loss": loss, "output": output, "x_t": x_t}


__all__ = ["VLB_LAMBDA", "GaussianDiffusion", "ModelFn", "Prediction",
           "discretized_gaussian_log_likelihood", "linear_betas", "mean_flat", "normal_kl"]
