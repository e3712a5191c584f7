"""DiffRatio: score-free one-step training with a sigma-conditioned density-ratio classifier.

docs/method.md §3.1. A classifier ``l_eta(x, sigma)`` is trained with the logistic loss on noised
generator samples (label 1, generator output detached) against noised real images (label 0), so
that at its optimum ``l = log p_theta,sigma / p_data,sigma``. The generator then minimises

    L_G = E_{sigma, z, eps} [ w(sigma) * sg(h(l)) * l_eta(G(z) + sigma eps, sigma) ]

with eta frozen; ``grad_x l`` stands in for the score difference s_theta - s_data, so **the teacher
is never evaluated** (it only provides initial weights). ``h`` picks the divergence: reverse KL
(``diffratio-kl``, h = 1), Jensen-Shannon (``diffratio-js``, h = sigmoid(-l), the default) or
forward KL (``diffratio-fkl``, h = exp(-l) clipped at ``fkl_clip``).

``ClassifierMethod`` holds what DiffRatio shares with the diffusion-GAN baseline (``gan.py``): the
classifier, its loss and its accuracy statistics; subclasses only differ in the generator loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probe.core.edm import Denoiser
from train.student.losses import (
    bucket_tallies,
    classifier_accuracy,
    h_weight,
    logistic_ratio_loss,
    noise_like,
    sigma_bucket_edges,
    sigma_weight,
)
from train.student.methods.base import Method
from train.student.ratio_net import RatioNet, build_ratio_net, save_ratio_net


class ClassifierMethod(Method):
    """A method whose auxiliary network is a sigma-conditioned real-vs-generated classifier."""

    uses_teacher = False
    uses_data = True
    aux_dir = "ratio"
    aux: RatioNet

    def build_aux(self, teacher: Denoiser) -> RatioNet:
        return build_ratio_net(self.cfg.ratio_net, teacher, self.cfg.cnn_width).train()

    def aux_loss(self, fake: torch.Tensor, real: torch.Tensor | None, rng: torch.Generator):
        """Logistic loss on one batch of each class; both see the same noise levels.

        ``null_signal = "shuffle"``: the 2B real/fake labels (B of each) are permuted at random so that
        each class holds half of each label (drawn after the noise, so the inputs are those of "off"):
        the labels say nothing about which rows are data, so the classifier cannot learn to tell data
        from samples. (A plain permutation leaves a random excess of one label per class in each
        batch, which on clearly separable inputs walks the classifier to an arbitrary side.) The
        logged accuracies always score the TRUE labels."""
        assert real is not None  # uses_data: the loop passes a batch of real images
        b = fake.shape[0]
        sigma = self.sigmas(b, rng, fake.device).repeat(2)
        x = torch.cat([fake.detach(), real[:b]])
        logits = self.aux(x + sigma.view(-1, 1, 1, 1) * noise_like(x, rng), sigma)
        l_fake, l_real = logits[:b], logits[b:]
        acc_real, acc_fake = classifier_accuracy(l_fake.detach(), l_real.detach())
        if self.null_signal == "shuffle":
            # half of each class's rows carry each label: no information about the class, not even by chance
            is_fake = torch.cat([torch.randperm(b, generator=rng) < b // 2,
                                 torch.randperm(b, generator=rng) < b - b // 2]).to(logits.device)
            loss = logistic_ratio_loss(logits[is_fake], logits[~is_fake])
        else:
            loss = logistic_ratio_loss(l_fake, l_real)
        return loss, {"acc_real": acc_real, "acc_fake": acc_fake,
                      "logit_fake": float(l_fake.detach().mean()), "logit_real": float(l_real.detach().mean()),
                      **bucket_tallies(sigma[:b], l_fake, l_real, self.bucket_edges)}

    @property
    def null_signal(self) -> str:
        return getattr(self.cfg, "null_signal", "off")   # a bare namespace config (unit tests) means "off"

    @property
    def bucket_edges(self) -> list[float]:
        """Edges of the logged accuracy buckets (``losses.sigma_bucket_edges`` of the sigma range)."""
        return sigma_bucket_edges(self.cfg.sigma_min, self.cfg.sigma_max)

    def describe(self) -> dict:
        return {**super().describe(), "null_signal": self.null_signal, "accuracy_sigma_buckets": self.bucket_edges}

    def fake_logits(self, fake: torch.Tensor, rng: torch.Generator):
        """(l(G(z) + sigma eps, sigma), sigma), differentiable w.r.t. the generator output."""
        sigma = self.sigmas(fake.shape[0], rng, fake.device)
        return self.aux(fake + sigma.view(-1, 1, 1, 1) * noise_like(fake, rng), sigma), sigma

    def save_aux(self, run_dir: Path, dataset: str | None) -> None:
        save_ratio_net(self.aux, Path(run_dir) / self.aux_dir)


class DiffRatio(ClassifierMethod):
    """The DiffRatio family; ``divergence`` selects h."""

    divergence = "js"

    def generator_loss(self, fake: torch.Tensor, rng: torch.Generator):
        logit, sigma = self.fake_logits(fake, rng)
        h = h_weight(logit, self.divergence, self.cfg.fkl_clip)
        w = sigma_weight(sigma, self.cfg.weighting)
        loss = (w * h * logit).mean()
        return loss, {"h_mean": float(h.mean())}


class DiffRatioKL(DiffRatio):
    name, divergence = "diffratio-kl", "kl"


class DiffRatioJS(DiffRatio):
    name, divergence = "diffratio-js", "js"


class DiffRatioFKL(DiffRatio):
    name, divergence = "diffratio-fkl", "fkl"
