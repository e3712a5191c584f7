"""Score identity Distillation (SiD, Zhou et al. 2024), with its default alpha = 1.2.

Same fake-score network and fake-score loss as VSD (``vsd.py``). The generator loss is SiD's:
with ``x_s = G(z) + sigma eps``, ``D_t = D_teacher(x_s)``, ``D_f = D_fake(x_s)`` and gradients
flowing through ``x_s`` into both (frozen) networks and through the explicit ``G(z)``,

    L_G = w(sigma) / n * [ (1 - alpha) ||D_t - D_f||^2 + (D_t - D_f)^T (D_f - G(z)) ]
        = w(sigma) / n * (D_t - D_f)^T [ (D_t - G(z)) - alpha (D_t - D_f) ]

where ``n = sg(mean|G(z) - D_t|)`` per sample is SiD's normaliser (``weight_factor`` in the
authors' code) and the inner products are means over pixels. alpha = 1 would be the plain
score-identity loss; SiD found alpha = 1.2 works best.
"""

from __future__ import annotations

import torch

from train.student.losses import per_sample, sigma_weight
from train.student.methods.vsd import NORM_FLOOR, FakeScoreMethod


def sid_loss_per_sample(d_teacher: torch.Tensor, d_fake: torch.Tensor, x: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """(1 - alpha) |D_t - D_f|^2 + (D_t - D_f)^T (D_f - x), means over pixels: [B]."""
    diff = d_teacher - d_fake
    return per_sample(diff * ((d_teacher - x) - alpha * diff))


class SiD(FakeScoreMethod):
    name = "sid"

    def generator_loss(self, fake: torch.Tensor, rng: torch.Generator):
        assert self.teacher is not None  # uses_teacher: the base class keeps it
        x_s, sigma = self.noised(fake, rng)
        d_teacher, d_fake = self.teacher(x_s, sigma).float(), self.aux(x_s, sigma).float()
        with torch.no_grad():
            norm = per_sample((fake - d_teacher).abs()).clamp(min=NORM_FLOOR)
        per = sid_loss_per_sample(d_teacher, d_fake, fake.float(), self.cfg.sid_alpha)
        loss = (sigma_weight(sigma, self.cfg.weighting) * per / norm).mean()
        return loss, {"score_gap": float(per_sample((d_fake - d_teacher).detach() ** 2).mean())}
