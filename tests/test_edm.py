"""EDM preconditioning, the DDPM-to-EDM conversion, the Heun sampler and model loading."""

import json

import pytest
import torch
from torch import nn

from probe.core.edm import DDPMDenoiser, EDMDenoiser, edm_precond, heun_sample, karras_sigmas, sample_edm_sigmas
from probe.core.errors import UserError
from probe.core.models import build_unet, load_model, save_model


class _Out:
    def __init__(self, sample):
        self.sample = sample


class GaussianEpsUNet(nn.Module):
    """Exact eps-prediction for data ~ N(0, s^2): eps_hat(x_t, t) given a DDPM state x_t."""

    def __init__(self, alphas_cumprod, s):
        super().__init__()
        self.a, self.s = torch.as_tensor(alphas_cumprod, dtype=torch.float64), s

    def forward(self, x_t, t):
        # fractional timesteps interpolate log sigma, as DDPMDenoiser documents
        log_s = 0.5 * ((1 - self.a) / self.a).log()
        lo, hi, w = t.floor().long(), t.ceil().long(), (t - t.floor()).double()
        sigma_t = torch.exp(log_s[lo] + w * (log_s[hi] - log_s[lo]))
        a_t = (1 / (1 + sigma_t ** 2)).float().view(-1, 1, 1, 1)
        var = a_t * self.s ** 2 + (1 - a_t)  # Var(x_t)
        return _Out(x_t * (1 - a_t).sqrt() / var)  # E[eps | x_t] for Gaussian data


def test_precond_matches_formulas():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, 0.5)
    assert torch.allclose(c_skip, 0.25 / (sigma ** 2 + 0.25))
    assert torch.allclose(c_out, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt())
    assert torch.allclose(c_in * (sigma ** 2 + 0.25).sqrt(), torch.ones(3))
    assert torch.allclose(c_noise, sigma.log() / 4)


def test_heun_sampler_on_analytic_gaussian_denoiser():
    s = 0.7  # data ~ N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2) exactly

    def denoiser(x, sigma):
        return x * s ** 2 / (s ** 2 + float(sigma) ** 2)

    latents = torch.randn(100, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # the ODE's exact solution maps sigma_max * latent to s * latent (to 1e-4): Heun converges to it
    errors = [((heun_sample(denoiser, latents, n) / latents).mean().item() - s) / s for n in (18, 60, 200)]
    assert abs(errors[2]) < 0.01 and abs(errors[1]) < abs(errors[0]) < 0.08
    assert len(karras_sigmas(18)) == 19 and karras_sigmas(18)[-1] == 0


def test_stochastic_heun_reaches_the_gaussian_data_and_keeps_churn_zero_deterministic():
    s = 0.7  # data ~ N(0, s^2), exact denoiser as above

    def denoiser(x, sigma):
        return x * s ** 2 / (s ** 2 + float(sigma) ** 2)

    latents = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    base = heun_sample(denoiser, latents, 18)
    # churn 0 draws no noise and takes the deterministic path, whatever the generator
    assert torch.equal(heun_sample(denoiser, latents, 18, churn=0.0, generator=torch.Generator().manual_seed(5)), base)
    # with churn the sampler forgets part of the latent but still lands on the data's variance (EDM Alg. 2)
    out = heun_sample(denoiser, latents, 60, churn=20.0, generator=torch.Generator().manual_seed(2))
    assert abs(out.std().item() - s) / s < 0.03
    corr = [torch.corrcoef(torch.stack([latents.flatten(), x.flatten()]))[0, 1].item() for x in (base, out)]
    corr_det, corr_sto = corr
    assert corr_det > 0.999 and corr_sto < 0.95
    # the noise comes from the generator: same seed, same images; another seed, other images
    again = heun_sample(denoiser, latents, 60, churn=20.0, generator=torch.Generator().manual_seed(2))
    other = heun_sample(denoiser, latents, 60, churn=20.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # outside [churn_tmin, churn_tmax] nothing is added: a window above sigma_max is the deterministic sampler
    assert torch.equal(heun_sample(denoiser, latents, 18, churn=20.0, churn_tmin=100.0, churn_tmax=200.0,
                                   generator=torch.Generator().manual_seed(2)), base)


def test_ddpm_denoiser_recovers_gaussian_posterior_mean():
    from diffusers import DDPMScheduler  # heavy (about 2 s): imported by the tests that build one

    a = DDPMScheduler().alphas_cumprod
    s = 0.6
    den = DDPMDenoiser(GaussianEpsUNet(a, s), a)
    x = torch.randn(16, 1, 2, 2)
    for sigma in (0.05, 0.5, 3.0, 20.0):  # between the schedule's grid points too
        expected = x * s ** 2 / (s ** 2 + sigma ** 2)
        assert torch.allclose(den(x, sigma), expected, rtol=2e-3, atol=2e-3)


def test_sigma_to_t_hits_grid_points():
    from diffusers import DDPMScheduler  # heavy (about 2 s): imported by the tests that build one

    a = DDPMScheduler().alphas_cumprod
    den = DDPMDenoiser(nn.Identity(), a)
    sig = ((1 - a) / a).sqrt()
    t = den.sigma_to_t(sig[[0, 10, 500, 999]].float())
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 500.0, 999.0]), atol=1e-2)


def test_truncated_sigma_band():
    s = sample_edm_sigmas(5000, torch.Generator().manual_seed(0), sigma_range=(2.0, 3.0))
    assert s.min() >= 2.0 - 1e-5 and s.max() <= 3.0 + 1e-5


def test_diffusers_ddpm_pipeline_loads_as_teacher(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler  # heavy (about 2 s): imported only here

    torch.manual_seed(0)
    unet = build_unet(8, 1, "test")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    m = load_model(tmp_path / "pipe")
    assert m.kind == "diffusers" and isinstance(m.denoiser, DDPMDenoiser)
    x, t = torch.randn(3, 1, 8, 8), 400
    a = DDPMScheduler().alphas_cumprod[t]
    sigma = ((1 - a) / a).sqrt().item()
    with torch.no_grad():
        eps = unet(x / (1 + sigma ** 2) ** 0.5, torch.full((3,), float(t))).sample
        assert torch.allclose(m.denoiser(x, sigma), x - sigma * eps, atol=1e-4)
    # the bare UNet directory loads too, with the scheduler beside it
    assert load_model(tmp_path / "pipe" / "unet").kind == "diffusers"


def test_toolkit_model_roundtrip(tmp_path):
    den = EDMDenoiser(build_unet(8, 1, "test"))
    save_model(tmp_path / "run", den, "generator", "digits", sigma_init=2.5)
    m = load_model(tmp_path / "run")
    assert m.kind == "generator" and m.generator.sigma_init == 2.5
    assert m.sha256() == load_model(tmp_path / "run").sha256()
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(m.generator(z), den(2.5 * z, 2.5), atol=1e-6)


def test_bad_model_directories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="neither"):
        load_model(tmp_path / "foreign")
    with pytest.raises(UserError, match="not divisible"):
        build_unet(10, 1, "tiny")
