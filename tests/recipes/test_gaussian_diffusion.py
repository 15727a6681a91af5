"""The Gaussian diffusion (subq/recipes/gaussian_diffusion.py) and its samplers
(subq/recipes/diffusion_sampling.py) against closed forms computed independently here:
q(x_t | x_0) from the product of the alphas, the posterior by completing the square of the
two Gaussians, KL against torch.distributions, the discretised decoder summing to one over
the 256 bins, IDDPM's stop-gradient, respacing, oracle sampling (a model that knows x_0
recovers it exactly) and determinism per seed."""

from __future__ import annotations

import math

import pytest
import torch

from subq.recipes.diffusion_sampling import guided, sample
from subq.recipes.gaussian_diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
)
from tests.helpers import diffusion_oracle

T = 50
F64 = torch.float64


@pytest.fixture
def diffusion():
    return GaussianDiffusion.linear(T)


def _abar(betas: torch.Tensor, t: int) -> float:
    return math.prod(1.0 - float(b) for b in betas[: t + 1])


def test_linear_schedule_is_ddpm_rescaled():
    assert torch.allclose(linear_betas(1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=F64))
    assert torch.allclose(linear_betas(100)[[0, -1]], torch.tensor([1e-3, 0.2], dtype=F64))


def test_q_sample_matches_the_product_of_alphas(diffusion):
    x0, noise = torch.randn(6, 1, 4, 4, dtype=F64), torch.randn(6, 1, 4, 4, dtype=F64)
    t = torch.tensor([0, 1, 7, 20, 33, T - 1])
    out = diffusion.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):
        abar = _abar(diffusion.betas, step)
        expected = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i]
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


def test_posterior_is_the_product_of_the_two_gaussians(diffusion):
    """q(x_{t-1} | x_t, x_0) is proportional to N(x_t; sqrt(a_t) x_{t-1}, b_t)
    N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}): precision and mean by completing the
    square."""
    x0, xt = torch.randn(5, 1, 3, 3, dtype=F64), torch.randn(5, 1, 3, 3, dtype=F64)
    t = torch.tensor([1, 2, 10, 30, T - 1])
    mean, var, log_var = diffusion.q_posterior(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        beta = float(diffusion.betas[step])
        abar_prev = _abar(diffusion.betas, step - 1)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        expected = (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev)
                    + math.sqrt(1 - beta) * xt[i] / beta) / precision
        torch.testing.assert_close(mean[i], expected, rtol=1e-10, atol=1e-10)
        assert float(var[i]) == pytest.approx(1 / precision, rel=1e-10)
        assert float(log_var[i]) == pytest.approx(math.log(1 / precision), rel=1e-10)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(20, dtype=F64), torch.randn(20, dtype=F64)
    l1, l2 = torch.randn(20, dtype=F64), torch.randn(20, dtype=F64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()),
        torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), expected)


def test_discretized_decoder_is_a_distribution_over_the_256_values():
    values = torch.arange(256, dtype=F64) / 127.5 - 1
    mean = torch.full_like(values, 0.3 * torch.randn(1, dtype=F64).item())
    log_scale = torch.full_like(values, -2.0 + torch.rand(1, dtype=F64).item())
    probs = discretized_gaussian_log_likelihood(values, mean, log_scale).exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    interior_peak = int(probs[1:-1].argmax()) + 1  # the outer bins hold whole tails
    assert interior_peak == int((values - mean).abs().argmin())


def test_learned_variance_interpolates_between_the_bounds(diffusion):
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([1, 10, T - 1])
    lower = diffusion.posterior_log_variance_clipped[t].float()[:, None, None, None]
    upper = diffusion.betas.log()[t].float()[:, None, None, None]
    for v, bound in ((-1.0, lower), (1.0, upper)):
        torch.testing.assert_close(diffusion.log_variance(torch.full_like(x, v), t, x),
                                   bound.expand_as(x))


def test_vlb_trains_only_the_variance(diffusion):
    """The VLB sees eps through a stop-gradient: its gradient reaches v alone, the MSE's
    reaches eps alone (IDDPM section 3.1)."""
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 3, 17, T - 1])
    output = torch.randn(4, 2, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, s: output, x0, t, noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_vb[:, :1].abs().max() == 0 and grad_vb[:, 1:].abs().max() > 0
    assert grad_mse[:, 1:].abs().max() == 0 and grad_mse[:, :1].abs().max() > 0
    weight = 1e-3 * T
    torch.testing.assert_close(terms["loss"], terms["mse"] + weight * terms["vb"])


def test_vlb_is_zero_for_the_true_posterior(diffusion):
    """With the true noise and v chosen so Sigma_t = beta~_t (v = -1), the KL terms vanish."""
    x0 = torch.rand(3, 1, 4, 4, dtype=F64) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([2, 9, T - 1])
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.cat([noise, -torch.ones_like(x0)], dim=1)
    assert diffusion.vlb_terms(output, x0, x_t, t).abs().max() < 1e-10


def test_respacing_keeps_abar_and_maps_timesteps(diffusion):
    full = diffusion.respaced(T)
    torch.testing.assert_close(full.betas, diffusion.betas)
    spaced = diffusion.respaced(10)
    assert spaced.num_timesteps == 10
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == T - 1
    torch.testing.assert_close(spaced.alphas_cumprod,
                               diffusion.alphas_cumprod[spaced.timestep_map])
    with pytest.raises(ValueError, match="count"):
        diffusion.respaced(T + 1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [T, 7])
def test_an_oracle_model_samples_its_x0(diffusion, sampler, steps):
    x0 = (torch.rand(3, 1, 4, 4, dtype=F64) * 1.8 - 0.9)
    process = diffusion.respaced(steps)
    out = sample(process, diffusion_oracle(process, x0), tuple(x0.shape), seed=1, sampler=sampler,
                 dtype=F64)
    torch.testing.assert_close(out, x0, rtol=1e-8, atol=1e-8)


def test_sampling_is_deterministic_per_seed(diffusion):
    def model_fn(x, t):
        return torch.cat([0.5 * x, torch.tanh(x)], dim=1)

    process = diffusion.respaced(8)
    shape = (2, 1, 4, 4)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)):
        a = sample(process, model_fn, shape, seed=3, sampler=sampler, eta=eta)
        b = sample(process, model_fn, shape, seed=3, sampler=sampler, eta=eta)
        c = sample(process, model_fn, shape, seed=4, sampler=sampler, eta=eta)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_are_named(diffusion):
    x0 = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="t must lie"):
        diffusion.q_sample(x0, torch.tensor([0, T]), x0)
    with pytest.raises(ValueError, match="model output"):
        diffusion.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]), x0)
    with pytest.raises(ValueError, match="sampler"):
        sample(diffusion, lambda x, t: x, (1, 1, 2, 2), seed=0, sampler="euler")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="steps > 20"):
        linear_betas(20)


def test_guidance_scale_one_is_the_conditional_model():
    from subq.models.dit import DiT, dit_config

    torch.manual_seed(0)
    model = DiT(dit_config("tiny")).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([5, 50, 500])
    y = torch.tensor([1, 4, 9])
    cond = guided(model, y, 1.0)(x, t)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(guided(model, y, 3.0)(x, t), cond, atol=1e-4)
