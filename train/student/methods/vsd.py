"""Variational score distillation (Diff-Instruct / VSD / DMD's distribution-matching term).

Two score networks (docs/method.md §3.2): the frozen **teacher** for the data score and an online
**fake-score** denoiser (a full copy of the teacher, teacher-initialised) trained by EDM's
denoising score matching on detached generator samples. In denoiser units the score difference
is ``s_fake - s_teacher = (D_fake - D_teacher) / sigma^2``, and the generator follows

    grad_x = w(sigma) * (D_fake(x_s) - D_teacher(x_s)) / mean|x - D_teacher(x_s)|

computed without gradients and pushed through the generator with the surrogate
``0.5 ||x - sg(x - grad_x)||^2``. The division by the per-sample mean absolute error of the teacher
is DMD's normalisation (Yin et al. 2024): it keeps the step size comparable across noise levels.

``FakeScoreMethod`` is what VSD shares with SiD (``sid.py``): the fake-score net and its loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probe.core.edm import Denoiser, edm_loss
from probe.core.models import save_model
from train.student.losses import noise_like, per_sample, sigma_weight, surrogate_loss
from train.student.methods.base import Method
from train.student.ratio_net import clone_denoiser

NORM_FLOOR = 1e-5   # floor of the per-sample normaliser (as SiD's and DMD's code)


class FakeScoreMethod(Method):
    """A method with a fake-score denoiser trained on generator samples; evaluates the teacher."""

    uses_teacher = True
    uses_data = False
    aux_dir = "fake"
    aux: Denoiser

    def build_aux(self, teacher: Denoiser) -> Denoiser:
        return clone_denoiser(teacher)

    def aux_loss(self, fake: torch.Tensor, real, rng: torch.Generator):
        sigma = self.sigmas(fake.shape[0], rng, fake.device)
        loss = edm_loss(self.aux, fake.detach(), sigma, noise_like(fake, rng))
        return loss, {}

    def noised(self, fake: torch.Tensor, rng: torch.Generator):
        sigma = self.sigmas(fake.shape[0], rng, fake.device)
        return fake + sigma.view(-1, 1, 1, 1) * noise_like(fake, rng), sigma

    def save_aux(self, run_dir: Path, dataset: str | None) -> None:
        save_model(Path(run_dir) / self.aux_dir, self.aux, "fake-score", dataset)


class VSD(FakeScoreMethod):
    name = "vsd"

    def generator_loss(self, fake: torch.Tensor, rng: torch.Generator):
        assert self.teacher is not None  # uses_teacher: the base class keeps it
        with torch.no_grad():
            x_s, sigma = self.noised(fake.detach(), rng)
            d_teacher, d_fake = self.teacher(x_s, sigma), self.aux(x_s, sigma)
            norm = per_sample((fake.detach() - d_teacher).abs()).clamp(min=NORM_FLOOR)
            scale = (sigma_weight(sigma, self.cfg.weighting) / norm).view(-1, 1, 1, 1)
            grad = scale * (d_fake - d_teacher).float()
        return surrogate_loss(fake, grad), {"score_gap": float(per_sample((d_fake - d_teacher) ** 2).mean())}
