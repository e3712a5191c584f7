"""EDM denoisers around diffusers UNets, the EDM training loss, the Heun sampler.

Every model in the toolkit is seen through one interface, a *denoiser* ``D(x; sigma)`` that
returns the predicted clean image for a noisy input in EDM's variance-exploding convention
(``x = y + sigma * n``). Two wrappers provide it:

- ``EDMDenoiser``: Karras et al. 2022 preconditioning around a ``UNet2DModel`` (our teachers);
- ``DDPMDenoiser``: an epsilon-prediction DDPM UNet (any diffusers DDPM model), with sigma mapped
  to a (fractional) timestep through the schedule's ``alphas_cumprod``.

Both keep the UNet as ``.unet`` so hooks address the same module paths for either kind.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # diffusers is imported where a UNet is built, not by every user of the denoisers
    from diffusers.models.unets.unet_2d import UNet2DModel  # the package root resolves to a dummy for mypy

SIGMA_DATA = 0.5     # EDM's data standard deviation
SIGMA_MIN = 0.002    # smallest sigma the sampler visits; also the conditioning floor for sigma = 0
SIGMA_MAX = 80.0     # largest sigma of the sampler and of pure-noise inputs
CHURN_TMIN = 0.05    # lowest sigma the stochastic sampler adds noise at (EDM's S_tmin)
CHURN_TMAX = 50.0    # highest sigma the stochastic sampler adds noise at (EDM's S_tmax)
SIGMA_INIT = 2.5     # G(z) = D(sigma_init z; sigma_init) evaluates here: SiD's value (docs/method.md §2)


def as_sigma(sigma, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or tensor of noise levels to shape [batch] on ``like``'s device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    return s.reshape(-1).expand(batch) if s.numel() == 1 else s.reshape(batch)


def edm_precond(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM's c_skip, c_out, c_in, c_noise for a [B] tensor of sigmas (docs/method.md §1)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with F a diffusers UNet2DModel."""

    parameterisation = "edm"
    unet: UNet2DModel

    def __init__(self, unet: UNet2DModel, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = as_sigma(sigma, x.shape[0], x).clamp(min=SIGMA_MIN)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_precond(sigma, self.sigma_data))
        f = self.unet(c_in * x, c_noise.flatten()).sample
        return c_skip * x + c_out * f


class DDPMDenoiser(nn.Module):
    """An epsilon-prediction DDPM UNet as an EDM denoiser (docs/method.md §1).

    A DDPM state ``x_t = sqrt(a) y + sqrt(1 - a) eps`` is ``sqrt(a) (y + sigma eps)`` with
    ``sigma = sqrt((1 - a) / a)``, so ``D(x; sigma) = x - sigma * eps_hat(x / sqrt(1 + sigma^2), t)``.
    Sigmas between the schedule's grid points get a fractional timestep, interpolated in log sigma
    (diffusers' sinusoidal timestep embedding accepts real-valued timesteps).
    """

    parameterisation = "ddpm"
    unet: UNet2DModel
    log_sigmas: torch.Tensor  # buffer [T]: log sigma of each timestep of the schedule

    def __init__(self, unet: UNet2DModel, alphas_cumprod):
        super().__init__()
        self.unet = unet
        a = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
        self.register_buffer("log_sigmas", (((1 - a) / a).sqrt()).log().float(), persistent=False)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for each sigma, clamped to the schedule's range."""
        log_s = sigma.clamp(min=1e-12).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_s).clamp(1, len(self.log_sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        frac = ((log_s - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        return (hi - 1).float() + frac

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = as_sigma(sigma, x.shape[0], x)
        t = self.sigma_to_t(sigma)
        s = sigma.view(-1, 1, 1, 1)
        eps = self.unet(x / (1 + s ** 2).sqrt(), t).sample
        return x - s * eps


Denoiser = EDMDenoiser | DDPMDenoiser  # either wrapper: D(x; sigma) with its UNet as ``.unet``


class OneStepGenerator(nn.Module):
    """G(z) = D(sigma_init * z; sigma_init): a denoiser used at one fixed noise level."""

    denoiser: Denoiser

    def __init__(self, denoiser: Denoiser, sigma_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    @property
    def unet(self) -> UNet2DModel:
        return self.denoiser.unet

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denoiser(self.sigma_init * z, self.sigma_init)


# ------------------------------------------------------------------------------ training
def sample_edm_sigmas(n: int, generator: torch.Generator, p_mean: float = -1.2, p_std: float = 1.2,
                      sigma_range: tuple[float, float] | None = None) -> torch.Tensor:
    """ln sigma ~ N(p_mean, p_std^2); with ``sigma_range`` it is truncated to [lo, hi] (inverse CDF)."""
    if sigma_range is None:
        return (torch.randn(n, generator=generator) * p_std + p_mean).exp()
    lo, hi = (math.log(max(s, 1e-12)) for s in sigma_range)
    normal = torch.distributions.Normal(p_mean, p_std)
    u_lo, u_hi = normal.cdf(torch.tensor(lo)), normal.cdf(torch.tensor(hi))
    u = u_lo + (u_hi - u_lo) * torch.rand(n, generator=generator)
    # When the band is far in a tail the CDF is flat: fall back to log-uniform in the band.
    if float(u_hi - u_lo) < 1e-6:
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator))
    return normal.icdf(u.clamp(1e-7, 1 - 1e-7)).clamp(lo, hi).exp()


def edm_loss(denoiser: nn.Module, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's weighted denoising loss, mean over the batch (weight (s^2+sd^2)/(s sd)^2)."""
    s = sigma.view(-1, 1, 1, 1)
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    d = denoiser(y + s * noise, sigma)
    return (weight * (d - y) ** 2).mean()


# ------------------------------------------------------------------------------- sampling
def karras_sigmas(num_steps: int = 18, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = 7.0) -> torch.Tensor:
    """EDM's time steps, decreasing from sigma_max to sigma_min, with a final 0 appended."""
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser: nn.Module, latents: torch.Tensor, num_steps: int = 18,
                sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0,
                churn: float = 0.0, churn_tmin: float = CHURN_TMIN, churn_tmax: float = CHURN_TMAX,
                churn_noise: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's 2nd-order Heun sampler: 2 * steps - 1 evaluations.

    ``latents`` are unit Gaussian; they are scaled by sigma_max here. With ``churn`` = 0 (the default)
    it is EDM's deterministic Algorithm 1. With ``churn`` > 0 it is Algorithm 2, the stochastic
    sampler: before each step whose sigma lies in [``churn_tmin``, ``churn_tmax``] fresh noise
    (scaled by ``churn_noise``) raises sigma by the factor 1 + gamma, gamma = min(churn / steps,
    sqrt 2 - 1), and the step starts from there. The noise is drawn from ``generator`` on the CPU,
    so a seeded generator gives the same images on every device.
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = latents.to(torch.float64) * sigmas[0]
    gamma_max = min(churn / num_steps, math.sqrt(2) - 1)
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = gamma_max if churn_tmin <= float(s_cur) <= churn_tmax else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:  # "add noise": move x from s_cur up to s_hat
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
            x = x + (s_hat ** 2 - s_cur ** 2).sqrt() * churn_noise * eps
        d_cur = (x - denoiser(x.float(), float(s_hat)).double()) / s_hat
        x_next = x + (s_next - s_hat) * d_cur
        if s_next > 0:  # Heun correction everywhere but the last step
            d_next = (x_next - denoiser(x_next.float(), float(s_next)).double()) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()
