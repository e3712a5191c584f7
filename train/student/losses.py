"""Loss pieces shared by the one-step methods: noise levels, weightings, the logistic loss, h(l).

Everything here is a small pure function of tensors (and a ``torch.Generator`` for random draws),
so the methods in ``train/student/methods/`` stay a few lines each and the unit tests can check each piece
against its closed form.

Conventions (docs/method.md §3):

- noise levels are EDM sigmas; a noised sample is ``x_s = x + sigma * eps``;
- a ratio classifier's logit ``l(x, sigma)`` estimates ``log p_theta,sigma(x) / p_data,sigma(x)``:
  generator samples carry label 1, real images label 0;
- ``h(l)`` picks the f-divergence of the DiffRatio family, ``w(sigma)`` weights noise levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from probe.core.edm import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, sample_edm_sigmas
from probe.core.errors import UserError

SIGMA_DISTS = ("lognormal", "karras")
WEIGHTINGS = ("none", "sigma2", "snr", "edm")
H_NAMES = ("kl", "js", "fkl")
N_SIGMA_BUCKETS = 4       # log-spaced sigma buckets of the classifier's accuracy in metrics.jsonl
TALLY = "tally_"          # prefix of logged counts: summed over micro-batches, ranks and steps, never averaged


# ----------------------------------------------------------------------------- noise levels
def karras_sigma_from_u(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Map u in [0, 1] onto EDM's rho-schedule: u = 0 -> sigma_max, u = 1 -> sigma_min."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def sample_student_sigmas(n: int, generator: torch.Generator,
                          dist: str = "lognormal",         # "lognormal" | "karras"
                          p_mean: float = -1.2,            # lognormal: mean of ln sigma
                          p_std: float = 1.2,              # lognormal: std of ln sigma
                          sigma_min: float = SIGMA_MIN,    # smallest sigma (EDM units), 0.002
                          sigma_max: float = SIGMA_MAX,    # largest sigma (EDM units), 80
                          ) -> torch.Tensor:
    """Noise levels for the auxiliary and generator losses, shape [n], float32 on the CPU.

    ``lognormal``: EDM's training distribution, ln sigma ~ N(p_mean, p_std^2), truncated to
    [sigma_min, sigma_max]. ``karras``: continuous positions on EDM's sampling grid (rho = 7)
    between sigma_min and sigma_max, uniform in grid position (SiD's choice, with its ``tmax``
    expressed as ``sigma_max``).
    """
    if dist == "lognormal":
        return sample_edm_sigmas(n, generator, p_mean, p_std, (sigma_min, sigma_max))
    if dist == "karras":
        return karras_sigma_from_u(torch.rand(n, generator=generator), sigma_min, sigma_max)
    raise UserError(f"unknown sigma distribution {dist!r}; choose one of {', '.join(SIGMA_DISTS)}")


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit Gaussian noise of ``x``'s shape drawn on the CPU generator, moved to ``x``'s device.

    Drawing on the CPU keeps runs reproducible across devices and makes the RNG state one
    ``torch.Generator`` that the checkpoint saves.
    """
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


# ------------------------------------------------------------------------------- weightings
def sigma_weight(sigma: torch.Tensor,
                 weighting: str = "none",           # "none" | "sigma2" | "snr" | "edm"
                 sigma_data: float = SIGMA_DATA,    # EDM's data standard deviation, 0.5
                 ) -> torch.Tensor:
    """w(sigma) for a [B] tensor of sigmas.

    - ``none``:   1
    - ``sigma2``: sigma^2 / sigma_data^2, turns a score-unit gradient into denoiser units
                  (score difference = denoiser difference / sigma^2)
    - ``snr``:    sigma_data^2 / sigma^2, the signal-to-noise ratio (favours low noise)
    - ``edm``:    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, EDM's denoising-loss weight
    """
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma2":
        return sigma ** 2 / sigma_data ** 2
    if weighting == "snr":
        return sigma_data ** 2 / sigma ** 2
    if weighting == "edm":
        return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    raise UserError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


# --------------------------------------------------------------------------- ratio losses
def logistic_ratio_loss(logit_fake: torch.Tensor, logit_real: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with generator samples labelled 1 and real images labelled 0.

    Its minimiser over functions is l = log p_fake / p_real (the log density ratio), because the
    Bayes-optimal probability of label 1 is p_fake / (p_fake + p_real) with equal class sizes.
    """
    return 0.5 * (F.softplus(-logit_fake).mean() + F.softplus(logit_real).mean())


def classifier_accuracy(logit_fake: torch.Tensor, logit_real: torch.Tensor) -> tuple[float, float]:
    """(accuracy on real, accuracy on fake) of the decision l > 0 -> "generated"."""
    return float((logit_real < 0).float().mean()), float((logit_fake > 0).float().mean())


def sigma_bucket_edges(sigma_min: float, sigma_max: float, n: int = N_SIGMA_BUCKETS) -> list[float]:
    """``n + 1`` log-spaced edges from sigma_min to sigma_max; bucket k is [edge k, edge k+1)
    (the last one includes sigma_max). With EDM's range [0.002, 80]: 0.002, 0.028, 0.4, 5.66, 80."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(lo + (hi - lo) * k / n) for k in range(n + 1)]


def _right(margin: torch.Tensor) -> torch.Tensor:
    """1 where the signed logit is > 0, 0.5 at a tie (the zero-initialised head's first step), else 0."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def bucket_tallies(sigma: torch.Tensor, logit_fake: torch.Tensor, logit_real: torch.Tensor,
                   edges: list[float]) -> dict:
    """Counts per sigma bucket of one classifier batch whose real and fake rows share the sigmas ``sigma``
    [B]: ``tally_n_b{k}`` rows of each class, ``tally_real_b{k}`` / ``tally_fake_b{k}`` rows called right
    (l < 0 real, l > 0 fake; a tie l = 0, as the zero-initialised head gives at first, counts half).

    Counts, not accuracies: a logging interval's accuracy is total right / total rows, which stays
    correct when a bucket is empty in some steps (``bucket_accuracies``)."""
    inner = torch.tensor(edges[1:-1], dtype=sigma.dtype, device=sigma.device)
    k = torch.bucketize(sigma.detach(), inner, right=True)   # edges[k] <= sigma < edges[k + 1]
    n = len(edges) - 1
    right_real = torch.bincount(k, weights=_right(-logit_real.detach()).to(sigma.dtype), minlength=n)
    right_fake = torch.bincount(k, weights=_right(logit_fake.detach()).to(sigma.dtype), minlength=n)
    counts = torch.bincount(k, minlength=n)
    out = {}
    for i, (c, r, f) in enumerate(zip(counts.tolist(), right_real.tolist(), right_fake.tolist(), strict=True)):
        out.update({f"{TALLY}n_b{i}": float(c), f"{TALLY}real_b{i}": float(r), f"{TALLY}fake_b{i}": float(f)})
    return out


def bucket_accuracies(tallies: dict) -> dict:
    """Logged figures from summed tallies (keys without the ``tally_`` prefix): per bucket k ``n_b{k}``
    (rows of each class), and where n > 0 ``acc_real_b{k}``, ``acc_fake_b{k}`` and the balanced
    ``acc_b{k}`` = their mean (0.5 = chance whatever the classifier's bias)."""
    out: dict = {}
    buckets = sorted(int(k[len("n_b"):]) for k in tallies if k.startswith("n_b"))
    for b in buckets:
        n = tallies[f"n_b{b}"]
        out[f"n_b{b}"] = int(round(n))
        if n > 0:
            real, fake = tallies[f"real_b{b}"] / n, tallies[f"fake_b{b}"] / n
            out.update({f"acc_real_b{b}": real, f"acc_fake_b{b}": fake, f"acc_b{b}": (real + fake) / 2})
    return out


def h_weight(logit: torch.Tensor,
             kind: str = "js",          # "kl" | "js" | "fkl"
             fkl_clip: float = 10.0,    # fkl: upper clip of exp(-l)
             ) -> torch.Tensor:
    """h(l) of docs/method.md §3.1 (u = p_data / p_theta = exp(-l)); always used under stop-gradient.

    - ``kl``  (reverse KL):  1
    - ``js``  (Jensen-Shannon): sigmoid(-l), the classifier's probability that x is real
    - ``fkl`` (forward KL):  exp(-l), clipped at ``fkl_clip`` where the classifier is confident
    """
    logit = logit.detach()
    if kind == "kl":
        return torch.ones_like(logit)
    if kind == "js":
        return torch.sigmoid(-logit)
    if kind == "fkl":
        # exp(-l) overflows for confident classifiers; clip in log space first
        return torch.exp((-logit).clamp(max=math.log(max(fkl_clip, 1e-12))))
    raise UserError(f"unknown divergence {kind!r}; choose one of {', '.join(H_NAMES)}")


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x - sg(x - grad)||^2 averaged over elements: its gradient w.r.t. x is grad / x.numel().

    The standard way (DMD, Diff-Instruct) to push a hand-made gradient through the generator.
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).mean()
