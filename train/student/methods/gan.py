"""Diffusion-GAN baseline: the same noised inputs and classifier as DiffRatio, a GAN generator loss.

The discriminator is DiffRatio's classifier trained with the same logistic loss (generated = 1),
so ``D(x) = P(real | x) = sigmoid(-l)``. The generator minimises the non-saturating loss
``-log D(G(z) + sigma eps) = softplus(l)`` weighted by ``w(sigma)`` (Goodfellow et al. 2014;
Diffusion-GAN, Wang et al. 2023, noises both inputs the same way). Its gradient is
``sigmoid(l) * grad l``: DiffRatio-KL with h = sigmoid(l) instead of 1, which is why it is the
natural GAN control for the score-free family. No teacher evaluations either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.student.losses import sigma_weight
from train.student.methods.diffratio import ClassifierMethod


class DiffusionGAN(ClassifierMethod):
    name = "gan"

    def generator_loss(self, fake: torch.Tensor, rng: torch.Generator):
        logit, sigma = self.fake_logits(fake, rng)
        loss = (sigma_weight(sigma, self.cfg.weighting) * F.softplus(logit)).mean()
        return loss, {"d_fake": float(torch.sigmoid(-logit.detach()).mean())}
