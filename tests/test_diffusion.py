"""Gaussian diffusion process: schedules, forward moments, loss, and samplers on an oracle."""
from __future__ import annotations

import math

import pytest
import torch

from histomap.models.diffusion import GaussianDiffusion, beta_schedule, spaced_timesteps


class Oracle:
    """Denoiser that knows x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Records calls."""

    def __init__(self, diffusion: GaussianDiffusion, x0: torch.Tensor) -> None:
        self.diffusion, self.x0, self.calls = diffusion, x0, []

    def __call__(self, x_t, t, **cond):
        abar = self.diffusion.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        self.calls.append((int(t[0]), x_t.clone(), cond))
        return (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()

    def residual(self, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """Standardised noise of a recorded state: ~N(0, 1) when x_t ~ q(x_t | x0)."""
        abar = self.diffusion.alphas_cumprod[t].to(x_t.dtype)
        return (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()


def _x0(shape=(2, 3, 8, 8), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_monotone_and_bounded(name):
    betas = beta_schedule(name, 1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    assert (betas[1:] >= betas[:-1] - 1e-12).all()            # noise never decreases
    d = GaussianDiffusion(T=1000, schedule=name)
    abar = d.alphas_cumprod
    assert (abar[1:] < abar[:-1]).all() and abar[0] < 1 and abar[-1] < 1e-3
    assert torch.allclose(d.posterior_mean_coef1[0], torch.tensor(1.0, dtype=torch.float64))


def test_linear_schedule_endpoints_and_rescaling():
    betas = beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert beta_schedule("linear", 500)[-1].item() == pytest.approx(0.04)
    with pytest.raises(ValueError, match="schedule"):
        beta_schedule("quadratic", 10)


@pytest.mark.parametrize("step", [0, 100, 500, 999])
def test_q_sample_moments(step):
    d = GaussianDiffusion(T=1000)
    x0 = torch.tensor([-0.9, -0.2, 0.4, 1.0]).view(1, 4, 1, 1)
    n = 40000
    g = torch.Generator().manual_seed(step)
    noise = torch.randn((n, 4, 1, 1), generator=g)
    x_t = d.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), step), noise)
    abar = d.alphas_cumprod[step].item()
    mean, var = x_t.mean(0).flatten(), x_t.var(0).flatten()
    se = math.sqrt((1 - abar) / n)
    assert torch.allclose(mean, math.sqrt(abar) * x0.flatten(), atol=5 * se + 1e-6)
    assert torch.allclose(var, torch.full((4,), 1 - abar), rtol=0.05, atol=1e-7)


def test_respaced_betas_keep_alphas_cumprod():
    d = GaussianDiffusion(T=1000, schedule="cosine")
    ts = spaced_timesteps(1000, 20)
    assert len(ts) == 20 and ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all()
    betas = d.respaced_betas(ts)
    assert (betas > 0).all() and (betas < 1).all()
    assert torch.allclose(torch.cumprod(1 - betas, 0), d.alphas_cumprod[ts], rtol=1e-10)
    # the full sequence reproduces the original betas
    assert torch.allclose(d.respaced_betas(torch.arange(1000)), d.betas, rtol=1e-8)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 0)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("respaced", 20, 0.0),
                                               ("ddim", 20, 1.0)])
def test_stochastic_samplers_recover_x0_and_follow_the_forward_marginals(sampler, steps, eta):
    d = GaussianDiffusion(T=1000)
    x0 = _x0((8, 2, 32, 32))
    oracle = Oracle(d, x0)
    g = torch.Generator().manual_seed(1)
    out = d.sample_one(oracle, x0.shape, {"tag": 1}, sampler=sampler, steps=steps, eta=eta,
                       generator=g)
    assert torch.allclose(out, x0, atol=1e-4)
    n_calls = 1000 if sampler == "ddpm" else 20
    assert len(oracle.calls) == n_calls and oracle.calls[0][2] == {"tag": 1}
    assert oracle.calls[0][0] == 999 and oracle.calls[-1][0] == 0  # original step indices
    # an exact denoiser makes every visited state a draw from q(x_t | x0): residuals ~ N(0, 1)
    for t, x_t, _ in oracle.calls[len(oracle.calls) // 4 :: max(1, len(oracle.calls) // 4)]:
        r = oracle.residual(t, x_t)
        assert abs(r.mean().item()) < 0.04, (t, r.mean())
        assert abs(r.var().item() - 1) < 0.05, (t, r.var())


def test_ddim_eta0_is_deterministic_and_exact():
    d = GaussianDiffusion(T=1000)
    x0 = _x0()
    oracle = Oracle(d, x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    out = d.sample_one(oracle, x0.shape, sampler="ddim", steps=10, eta=0.0, noise=noise)
    assert torch.allclose(out, x0, atol=1e-5)
    # eta = 0 keeps the initial noise direction along the whole chain
    first = oracle.residual(*oracle.calls[0][:2])
    for t, x_t, _ in oracle.calls[1:]:
        assert torch.allclose(oracle.residual(t, x_t), first, atol=1e-3)
    again = d.sample_one(Oracle(d, x0), x0.shape, sampler="ddim", steps=10, noise=noise)
    assert torch.equal(out, again)


def test_sample_mean_and_std_over_chains():
    d = GaussianDiffusion(T=200)
    x0 = _x0((2, 3, 4, 4))
    stats = d.sample(Oracle(d, x0), x0.shape, sampler="respaced", steps=10, n_samples=3,
                     generator=torch.Generator().manual_seed(0))
    assert stats.mean.shape == x0.shape and stats.std.shape == x0.shape and stats.n == 3
    assert torch.allclose(stats.mean, x0, atol=1e-4) and stats.std.max() < 1e-4

    def blind(x_t, t):  # predicts no noise: samples depend on the starting noise
        return torch.zeros_like(x_t)

    stats = d.sample(blind, x0.shape, sampler="ddim", steps=5, n_samples=3,
                     generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([d.sample_one(blind, x0.shape, sampler="ddim", steps=5, generator=g)
                         for _ in range(3)])
    assert torch.allclose(stats.mean, draws.mean(0), atol=1e-5)
    assert torch.allclose(stats.std, draws.std(0, unbiased=False), atol=1e-5)
    assert stats.std.min() > 0


def test_clip_x0_limits_samples_to_the_data_range():
    d = GaussianDiffusion(T=100, clip_x0=(-1.0, 1.0))
    x0 = torch.full((1, 1, 4, 4), 1.7)
    out = d.sample_one(Oracle(d, x0), x0.shape, sampler="ddim", steps=10,
                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)
    free = d.sample_one(Oracle(d, x0), x0.shape, sampler="ddim", steps=10, clip=False,
                        generator=torch.Generator().manual_seed(0))
    assert torch.allclose(free, x0, atol=1e-4)


def test_p_losses_epsilon_mse_aux_and_mask():
    d = GaussianDiffusion(T=1000)
    x0 = _x0()
    t = torch.tensor([5, 700])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    exact = d.p_losses(Oracle(d, x0), x0, t=t, noise=noise)
    assert exact["loss"].item() < 1e-8

    def zero_with_aux(x_t, t, scale):
        return torch.zeros_like(x_t) * scale, {"dis": torch.tensor(0.25)}

    out = d.p_losses(zero_with_aux, x0, {"scale": 2.0}, t=t, noise=noise)
    assert out["denoise"].item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["denoise"].item() + 0.25, rel=1e-6)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    masked = d.p_losses(zero_with_aux, x0, {"scale": 1.0}, t=t, noise=noise, mask=mask)
    assert masked["denoise"].item() == pytest.approx(noise[:, :, :4].pow(2).mean().item(),
                                                     rel=1e-6)
    # random steps come from the generator: same seed, same loss
    a = d.p_losses(zero_with_aux, x0, {"scale": 1.0}, generator=torch.Generator().manual_seed(9))
    b = d.p_losses(zero_with_aux, x0, {"scale": 1.0}, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a["loss"], b["loss"])


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("respaced", 20), ("ddim", 10)])
def test_x0_prediction_samplers_and_loss(sampler, steps):
    """prediction="x0": the network outputs x_0; an exact one is recovered by every sampler and
    has zero loss, and the loss is measured against x_0, not against the noise."""
    d = GaussianDiffusion(T=1000, prediction="x0")
    x0 = _x0((4, 2, 16, 16))
    calls = []

    def exact(x_t, t):
        calls.append(int(t[0]))
        return x0.clone()

    out = d.sample_one(exact, x0.shape, sampler=sampler, steps=steps,
                       generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out, x0, atol=1e-4)
    assert calls[0] == 999 and calls[-1] == 0
    t = torch.tensor([3, 3, 600, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert d.p_losses(exact, x0, t=t, noise=noise)["loss"].item() < 1e-12
    zero = d.p_losses(lambda x_t, t: torch.zeros_like(x_t), x0, t=t, noise=noise)
    assert zero["denoise"].item() == pytest.approx(x0.pow(2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(T=10, prediction="v")
