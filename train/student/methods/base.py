"""The interface every one-step method implements, so that one training loop serves them all.

A method owns its auxiliary network (a ratio classifier, or a fake-score denoiser) and says what
the two losses are; the loop in ``train/student/loop.py`` owns everything else (data, optimisers, EMA,
guards, checkpoints, logging). Per training step the loop calls

    aux_loss(fake.detach(), real, rng)   -> (loss, stats)   # then an optimiser step on .aux
    generator_loss(fake, rng)            -> (loss, stats)   # .aux frozen; a step on the generator

``fake`` is a batch of generator outputs G(z) [B, C, H, W]; ``real`` a batch of real images (or
None when ``uses_data`` is False). Every random draw inside a loss comes from ``rng``, the loop's
one CPU ``torch.Generator``, which is what makes resumed runs exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from probe.core.edm import Denoiser
from train.student.losses import sample_student_sigmas


class Method:
    """Base class: stores the config, the teacher and the generator; subclasses build ``self.aux``."""

    name: str = "base"
    uses_teacher: bool = False   # is the teacher evaluated during training? False: the loop frees it after set-up
    uses_data: bool = True       # does the method need real images?
    aux_dir: str = "aux"         # sub-folder of the run directory the auxiliary network is saved in

    def __init__(self, cfg, teacher: Denoiser, generator: nn.Module):
        self.cfg = cfg
        self.teacher: Denoiser | None = teacher if self.uses_teacher else None  # not even kept when it is not used
        self.generator = generator
        self.aux: nn.Module = self.build_aux(teacher)

    # -- to implement -------------------------------------------------------------------
    def build_aux(self, teacher: Denoiser) -> nn.Module:
        raise NotImplementedError

    def aux_loss(self, fake: torch.Tensor, real: torch.Tensor | None, rng: torch.Generator):
        raise NotImplementedError

    def generator_loss(self, fake: torch.Tensor, rng: torch.Generator):
        raise NotImplementedError

    def save_aux(self, run_dir: Path, dataset: str | None) -> None:
        raise NotImplementedError

    # -- shared helpers -----------------------------------------------------------------
    def sigmas(self, n: int, rng: torch.Generator, device) -> torch.Tensor:
        """Noise levels from the configured student distribution, on ``device``."""
        c = self.cfg
        s = sample_student_sigmas(n, rng, c.sigma_dist, c.p_mean, c.p_std, c.sigma_min, c.sigma_max)
        return s.to(device)

    def describe(self) -> dict:
        """Facts about the method recorded in the run (parameter counts, what it evaluates)."""
        return {"method": self.name, "uses_teacher": self.uses_teacher, "uses_data": self.uses_data,
                "aux_parameters": sum(p.numel() for p in self.aux.parameters()), "aux_dir": self.aux_dir}
