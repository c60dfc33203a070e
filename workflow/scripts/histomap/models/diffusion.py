"""Gaussian diffusion process for super-resolving ST maps, kept apart from the denoising network.

The process (schedules, forward noising, training loss, samplers) knows nothing about the network
except its calling convention::

    out = model(x_t, t, **cond)          # x_t (B, G, H, W); t (B,) int64 step indices in [0, T)
    pred = out  or  (pred, aux_losses)   # aux_losses: dict of already-weighted scalar losses

``pred`` is the noise estimate (``prediction="eps"``, DDPM and the Diff-ST authors' code) or the
x_0 estimate itself (``prediction="x0"``, guided-diffusion's ``predict_xstart``); the training
loss compares it with the noise or with x_0 accordingly, and the samplers convert either into the
pair (eps, x_0) they need.

``t`` is always an index into the *original* T-step schedule, also for respaced and DDIM sampling
(improved-DDPM convention), so one trained network serves every sampler.

Samplers (all start from x_T ~ N(0, I) and return an estimate of x_0):

- ``"ddpm"``: ancestral sampling over all T steps with the fixed posterior variance
  (``var_type="fixed_small"``, beta-tilde) or beta (``"fixed_large"``).
- ``"respaced"``: ancestral sampling over K evenly spaced steps; the betas of the subsequence are
  recomputed so that its cumulative alpha equals the original one at the kept steps
  (``beta'_i = 1 - abar[s_i] / abar[s_{i-1}]``, Nichol & Dhariwal 2021).
- ``"ddim"``: DDIM over K evenly spaced steps; ``eta=0`` is deterministic, ``eta=1`` matches the
  ancestral variance of the respaced chain.

Data range: maps are whatever the trainer feeds (e.g. scaled to [-1, 1]); ``clip_x0=(lo, hi)``
clips each step's x_0 prediction to that range (None: no clipping).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Schedule = Literal["linear", "cosine"]
Sampler = Literal["ddpm", "respaced", "ddim"]


def beta_schedule(name: Schedule, T: int) -> Tensor:
    """Noise variances beta_1..beta_T (float64, shape (T,)).

    ``linear``: Ho et al. 2020 (1e-4 .. 0.02), rescaled by 1000/T so any T gives the same process.
    ``cosine``: Nichol & Dhariwal 2021, abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), with
    beta <= 0.999.
    """
    if T < 1:
        raise ValueError(f"diffusion needs T >= 1 steps, got {T}")
    if name == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        s = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1.0 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def spaced_timesteps(T: int, steps: int) -> Tensor:
    """``steps`` indices evenly spread over [0, T-1], ascending, always including 0 and T-1."""
    if not 1 <= steps <= T:
        raise ValueError(f"respaced sampling needs 1 <= steps <= T={T}, got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    idx = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    return torch.unique(idx)  # sorted; duplicates impossible when steps <= T


def _schedule_terms(betas: Tensor) -> dict[str, Tensor]:
    """All per-step coefficients of a chain with these betas (float64)."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # post_var[0] is 0; the clipped log uses the next value there (only used for likelihoods)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 \
        else torch.log(betas)
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
    }


def _at(coef: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """coef[idx] shaped (B, 1, 1, ...) to broadcast against ``like``, in like's dtype/device."""
    out = coef.to(like.device)[idx.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def _model_device(model: Any, fallback: Tensor) -> torch.device:
    """Device of the model's first parameter, else of ``fallback``."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return fallback.device


def _randn(shape: Sequence[int], like_device: torch.device, dtype: torch.dtype,
           generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """N(0, 1) draws on ``like_device``; a generator on another device draws there and the values
    are moved, so a CPU generator gives the same numbers for CPU and GPU runs. A sequence of n
    generators (batched chains, :meth:`GaussianDiffusion.chain_generators`) splits the batch into
    n equal parts, part k drawn from generator k."""
    if isinstance(generator, (list, tuple)):
        n = len(generator)
        if n < 1 or shape[0] % n:
            raise ValueError(f"a batch of {shape[0]} cannot be split among {n} generators")
        part = (shape[0] // n, *tuple(shape)[1:])
        return torch.cat([_randn(part, like_device, dtype, g) for g in generator])
    if generator is not None and generator.device != torch.device(like_device):
        return torch.randn(tuple(shape), generator=generator, device=generator.device,
                           dtype=dtype).to(like_device)
    return torch.randn(tuple(shape), generator=generator, device=like_device, dtype=dtype)


def split_model_output(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """(eps, aux_losses) from a model output that is a tensor or an (eps, dict) tuple."""
    if isinstance(out, (tuple, list)):
        eps, aux = out[0], (out[1] if len(out) > 1 and out[1] is not None else {})
        return eps, dict(aux)
    return out, {}


class SampleStats(NamedTuple):
    """Per-pixel mean and standard deviation (ddof=0) over ``n`` independent reverse chains."""

    mean: Tensor
    std: Tensor
    n: int


class GaussianDiffusion(nn.Module):
    """Forward process, epsilon-prediction loss and DDPM / respaced / DDIM samplers.

    Parameters
    ----------
    T : number of diffusion steps (the paper: 1000).
    schedule : ``"linear"`` or ``"cosine"`` beta schedule.
    clip_x0 : (lo, hi) range the x_0 prediction is clipped to while sampling; None disables.
    var_type : reverse-step variance, ``"fixed_small"`` (posterior beta-tilde) or ``"fixed_large"``
        (beta). The authors' code learns the variance; this implementation keeps it fixed.
    loss : ``"mse"`` (the paper) or ``"charbonnier"`` (sqrt(d^2 + 1e-6), the authors' code).
    prediction : what the network outputs and the loss targets: ``"eps"`` (the paper) or ``"x0"``.
    """

    def __init__(self, T: int = 1000, schedule: Schedule = "linear",
                 clip_x0: tuple[float, float] | None = None,
                 var_type: Literal["fixed_small", "fixed_large"] = "fixed_small",
                 loss: Literal["mse", "charbonnier"] = "mse",
                 prediction: Literal["eps", "x0"] = "eps") -> None:
        super().__init__()
        if prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
        if var_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"var_type must be 'fixed_small' or 'fixed_large', got {var_type!r}")
        if loss not in ("mse", "charbonnier"):
            raise ValueError(f"loss must be 'mse' or 'charbonnier', got {loss!r}")
        self.T = int(T)
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.var_type = var_type
        self.loss_type = loss
        self.prediction = prediction
        for name, value in _schedule_terms(beta_schedule(schedule, self.T)).items():
            self.register_buffer(name, value, persistent=False)

    # ----------------------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (_at(self.sqrt_alphas_cumprod, t, x0) * x0
                + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor,
                   terms: dict[str, Tensor] | None = None) -> Tensor:
        """x_0 implied by a noise estimate: (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        c = terms or self._terms()
        return (_at(c["sqrt_recip_alphas_cumprod"], t, x_t) * x_t
                - _at(c["sqrt_recipm1_alphas_cumprod"], t, x_t) * eps)

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor,
                    terms: dict[str, Tensor] | None = None) -> Tensor:
        """Noise implied by an x_0 estimate (inverse of :meth:`predict_x0`)."""
        c = terms or self._terms()
        return ((_at(c["sqrt_recip_alphas_cumprod"], t, x_t) * x_t - x0)
                / _at(c["sqrt_recipm1_alphas_cumprod"], t, x_t))

    # ------------------------------------------------------------------------------------ training
    def p_losses(self, model: Callable[..., Any], x0: Tensor, cond: dict[str, Any] | None = None,
                 t: Tensor | None = None, noise: Tensor | None = None,
                 mask: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Denoising loss at random (or given) steps: the network's output against the noise
        (``prediction="eps"``) or against x_0 (``"x0"``).

        Returns a dict of scalars: ``"loss"`` (denoising loss + every auxiliary loss the model
        returned, which the model has already weighted), ``"denoise"`` and each auxiliary term.
        ``mask`` (B, 1 or G, H, W), 1 = pixel counts, restricts the denoising loss to tissue.
        """
        cond = cond or {}
        b = x0.shape[0]
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.T, (b,), device=gen_device, generator=generator)
        t = t.to(device=x0.device, dtype=torch.long)
        if noise is None:
            noise = _randn(x0.shape, x0.device, x0.dtype, generator)
        x_t = self.q_sample(x0, t, noise)
        pred, aux = split_model_output(model(x_t, t, **cond))
        if pred.shape != noise.shape:
            raise ValueError(f"model returned {self.prediction} of shape {tuple(pred.shape)}, "
                             f"expected {tuple(noise.shape)}")
        diff = pred - (noise if self.prediction == "eps" else x0)
        per_px = diff.pow(2) if self.loss_type == "mse" else (diff.pow(2) + 1e-6).sqrt()
        if mask is None:
            denoise = per_px.mean()
        else:
            w = mask.to(per_px.dtype).expand_as(per_px)
            denoise = (per_px * w).sum() / w.sum().clamp_min(1.0)
        total = denoise
        for value in aux.values():
            total = total + value
        return {"loss": total, "denoise": denoise, **aux}

    # ------------------------------------------------------------------------------------ sampling
    def _terms(self, timesteps: Tensor | None = None) -> dict[str, Tensor]:
        """Coefficients of the full chain, or of the chain respaced to ``timesteps`` (ascending)."""
        if timesteps is None or len(timesteps) == self.T:
            return {k: v for k, v in self._buffers.items() if v is not None}
        return _schedule_terms(self.respaced_betas(timesteps))

    def respaced_betas(self, timesteps: Tensor) -> Tensor:
        """Betas of the chain that visits only ``timesteps`` (ascending original indices)."""
        ts = torch.as_tensor(timesteps, dtype=torch.long, device=self.alphas_cumprod.device)
        if ts.numel() == 0 or bool((ts[1:] <= ts[:-1]).any()):
            raise ValueError("respaced timesteps must be non-empty and strictly ascending")
        abar = self.alphas_cumprod[ts]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return 1.0 - abar / abar_prev

    def _eps_x0(self, model: Callable[..., Any], x: Tensor, t_model: Tensor, t_chain: Tensor,
                cond: dict[str, Any], terms: dict[str, Tensor],
                clip: bool) -> tuple[Tensor, Tensor]:
        pred, _ = split_model_output(model(x, t_model, **cond))
        x0 = self.predict_x0(x, t_chain, pred, terms) if self.prediction == "eps" else pred
        clipped = clip and self.clip_x0 is not None
        if clipped:
            x0 = x0.clamp(*self.clip_x0)
        if self.prediction == "eps" and not clipped:
            return pred, x0
        return self.predict_eps(x, t_chain, x0, terms), x0

    def _ancestral(self, model: Callable[..., Any], x: Tensor, cond: dict[str, Any],
                   timesteps: Tensor, clip: bool, generator: torch.Generator | None) -> Tensor:
        """Ancestral sampling along ``timesteps`` (ascending original indices)."""
        terms = self._terms(timesteps)
        var = terms["posterior_variance"] if self.var_type == "fixed_small" else \
            torch.cat([terms["posterior_variance"][1:2], terms["betas"][1:]])
        b = x.shape[0]
        for i in reversed(range(len(timesteps))):
            t_chain = torch.full((b,), i, device=x.device, dtype=torch.long)
            t_model = torch.full((b,), int(timesteps[i]), device=x.device, dtype=torch.long)
            _, x0 = self._eps_x0(model, x, t_model, t_chain, cond, terms, clip)
            mean = (_at(terms["posterior_mean_coef1"], t_chain, x) * x0
                    + _at(terms["posterior_mean_coef2"], t_chain, x) * x)
            if i > 0:
                z = _randn(x.shape, x.device, x.dtype, generator)
                x = mean + _at(var, t_chain, x).sqrt() * z
            else:
                x = mean
        return x

    def _ddim(self, model: Callable[..., Any], x: Tensor, cond: dict[str, Any], timesteps: Tensor,
              eta: float, clip: bool, generator: torch.Generator | None) -> Tensor:
        """DDIM (Song et al. 2021) along ``timesteps`` (ascending original indices)."""
        abar_all = self.alphas_cumprod
        b = x.shape[0]
        for i in reversed(range(len(timesteps))):
            t = torch.full((b,), int(timesteps[i]), device=x.device, dtype=torch.long)
            eps, x0 = self._eps_x0(model, x, t, t, cond, self._terms(), clip)
            abar = abar_all[int(timesteps[i])]
            abar_prev = abar_all[int(timesteps[i - 1])] if i > 0 else abar.new_tensor(1.0)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            dir_coef = (1 - abar_prev - sigma ** 2).clamp_min(0).sqrt()
            x = abar_prev.sqrt().to(x.dtype) * x0 + dir_coef.to(x.dtype) * eps
            if i > 0 and eta > 0:
                z = _randn(x.shape, x.device, x.dtype, generator)
                x = x + sigma.to(x.dtype) * z
        return x

    def noise_draws(self, sampler: Sampler = "ddpm", steps: int | None = None,
                    eta: float = 0.0) -> int:
        """How many N(0, I) tensors of the chain's shape :meth:`sample_one` draws (x_T included)."""
        if sampler == "ddpm":
            return self.T
        n = len(spaced_timesteps(self.T, steps if steps is not None else min(self.T, 50)))
        if sampler == "respaced":
            return n
        if sampler == "ddim":
            return n if eta > 0 else 1
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm', 'respaced' or 'ddim'")

    def chain_generators(self, generator: torch.Generator, n_chains: int,
                         shape: Sequence[int], sampler: Sampler = "ddpm",
                         steps: int | None = None, eta: float = 0.0) -> list[torch.Generator]:
        """Generators for ``n_chains`` chains of ``shape`` run as one batch: generator k starts
        where ``generator`` would stand before chain k if the chains ran one after another, and
        ``generator`` is left where it would stand after the last one. Sampling the batch
        (n_chains x B, ...) with the list (chain k = rows k B to (k + 1) B) draws exactly the
        numbers of the sequential chains."""
        draws = self.noise_draws(sampler, steps, eta)
        gens = []
        for _ in range(int(n_chains)):
            g = torch.Generator(device=generator.device)
            g.set_state(generator.get_state())
            gens.append(g)
            for _ in range(draws):  # replay the chain's draws to reach the next chain's start
                torch.randn(tuple(shape), generator=generator, device=generator.device,
                            dtype=torch.float32)
        return gens

    @torch.no_grad()
    def sample_one(self, model: Callable[..., Any], shape: tuple[int, ...],
                   cond: dict[str, Any] | None = None, sampler: Sampler = "ddpm",
                   steps: int | None = None, eta: float = 0.0, clip: bool = True,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   device: torch.device | str | None = None,
                   noise: Tensor | None = None) -> Tensor:
        """One reverse chain from x_T (``noise`` or fresh N(0, I)) to an x_0 estimate (a list of
        generators: several chains batched, see :meth:`chain_generators`)."""
        cond = cond or {}
        device = torch.device(device) if device is not None else _model_device(model, self.betas)
        x = noise.to(device) if noise is not None else \
            _randn(shape, device, torch.float32, generator)
        if sampler == "ddpm":
            return self._ancestral(model, x, cond, torch.arange(self.T), clip, generator)
        n = steps if steps is not None else min(self.T, 50)
        timesteps = spaced_timesteps(self.T, n)
        if sampler == "respaced":
            return self._ancestral(model, x, cond, timesteps, clip, generator)
        if sampler == "ddim":
            return self._ddim(model, x, cond, timesteps, eta, clip, generator)
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm', 'respaced' or 'ddim'")

    @torch.no_grad()
    def sample(self, model: Callable[..., Any], shape: tuple[int, ...],
               cond: dict[str, Any] | None = None, sampler: Sampler = "ddpm",
               steps: int | None = None, n_samples: int = 1, eta: float = 0.0, clip: bool = True,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> SampleStats:
        """Mean map and per-pixel std over ``n_samples`` independent reverse chains.

        ``steps``: number of steps for ``"respaced"`` / ``"ddim"`` (default 50; ignored by
        ``"ddpm"``, which always takes all T). The caller puts the model in eval mode. A model
        with ``encode_condition(hr_shape=(H, W), **cond)`` has its conditioning encoded once and
        passed as ``condition=`` at every step instead of being re-encoded.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        cond = dict(cond or {})
        encode = getattr(model, "encode_condition", None)
        if callable(encode) and cond and "condition" not in cond:
            cond = {"condition": encode(hr_shape=tuple(shape[-2:]), **cond)}
        mean = m2 = None
        for k in range(1, n_samples + 1):
            x = self.sample_one(model, shape, cond, sampler, steps, eta, clip, generator, device)
            x = x.double()
            if mean is None:
                mean, m2 = x.clone(), torch.zeros_like(x)
            else:  # Welford's running mean and sum of squared deviations
                delta = x - mean
                mean += delta / k
                m2 += delta * (x - mean)
        assert mean is not None and m2 is not None
        std = (m2 / n_samples).sqrt()
        return SampleStats(mean.float(), std.float(), n_samples)


__all__ = ["GaussianDiffusion", "SampleStats", "beta_schedule", "spaced_timesteps",
           "split_model_output"]
