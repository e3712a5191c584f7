"""The one student step: a generator update with its auxiliary updates, for any number of processes.

A single process is world size 1 of the distributed step (no separate single-process code path):
``split_batch(batch, world, rank, accum)`` gives this process its micro-batches of the global
batch; with one process and ``accum`` 1 that is one micro-batch of every row, DDP wrappers are the
networks themselves and ``no_sync`` does nothing.

Randomness (``probe/core/distributed.py``): the global z [batch], the fresh z of earlier aux steps
and the real-batch indices are drawn from the run's generator ``rng`` on every rank, then one
``step_seed``; a method draws its own sigmas and noise from ``micro_generator(seed + phase,
micro)``, phase = aux step i, or ``aux_steps`` for the generator loss, keyed by the GLOBAL
micro-batch index. So K processes x ``accum`` A give the weights of one process with ``accum``
K x A, up to float rounding of the gradient all-reduce (tests/test_distributed.py).

Per step:

- each aux step: per micro-batch a no-grad G(z_m), ``method.aux_loss`` through the DDP-wrapped aux
  net (swapped in as ``method.aux``), weighted backward, ``no_sync`` but on the last micro-batch,
  one guarded optimiser step;
- generator: per micro-batch ``method.generator_loss(ddp_generator(z_m))`` with the raw aux net
  frozen (its wrapper is not called, so DDP expects no aux gradients), same accumulation.

Logged scalars are means over the global batch; ``tally_*`` counts (per-sigma-bucket classifier
accuracy, ``losses.bucket_tallies``) are totals over the global batch instead.

A non-finite loss or gradient skips that optimiser step (``probe.core.nonfinite.guarded_step``);
the step counts as bad for the run's NaN policy when any of its updates was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from probe.core.distributed import (
    Micro,
    all_reduce_mean,
    micro_generator,
    no_sync,
    step_seed,
    swap_attr,
    world_size,
)
from probe.core.nonfinite import guarded_step, is_finite
from train.student.losses import TALLY
from train.student.methods.base import Method


@dataclass
class StepParts:
    """What a student step works on; built once per run."""

    cfg: Any                            # StudentConfig (batch, aux_steps, grad_clip); Any: loop.py imports this
    method: Method                      # the method (losses, .aux)
    generator: nn.Module                # OneStepGenerator (unwrapped)
    ddp_generator: nn.Module            # its DDP wrapper, or the generator itself in one process
    ddp_aux: nn.Module                  # the aux net's DDP wrapper, or the aux net itself
    images: torch.Tensor | None         # real images [N, C, H, W] (None for data-free methods)
    shape: tuple                        # (batch, C, H, W) of the global z
    device: torch.device
    autocast: Any                       # autocast context (bf16 on CUDA, disabled on CPU)
    opt_g: torch.optim.Optimizer
    opt_aux: torch.optim.Optimizer
    micros: list[Micro]                 # this process's micro-batches (split_batch)

    @property
    def gen_params(self) -> list:
        return [p for g in self.opt_g.param_groups for p in g["params"]]

    @property
    def aux_params(self) -> list:
        return [p for g in self.opt_aux.param_groups for p in g["params"]]


def student_step(parts: StepParts, rng: torch.Generator, counts: dict) -> tuple[dict, bool]:
    """One generator step with its aux steps; returns (logged scalars averaged over the global batch,
    every update stepped). ``counts["skipped_g"]`` / ``counts["skipped_aux"]`` grow with skipped updates."""
    cfg, method, device, autocast = parts.cfg, parts.method, parts.device, parts.autocast
    images, micros = parts.images, parts.micros
    b = cfg.batch
    z = torch.randn(parts.shape, generator=rng)
    z_aux = [torch.randn(parts.shape, generator=rng) for _ in range(cfg.aux_steps - 1)] + [z]
    idx = [torch.randint(len(images), (b,), generator=rng) if images is not None else None
           for _ in range(cfg.aux_steps)]
    seed = step_seed(rng)
    last = len(micros) - 1
    sums: dict = {}

    def add(m: Micro, **values) -> None:   # scale-weighted sums: their mean over ranks is the global mean
        for k, v in values.items():        # ... but counts (tally_*) are plain sums
            sums[k] = sums.get(k, 0.0) + (float(v) if k.startswith(TALLY) else m.scale * float(v))

    all_ok = True
    norm_a = 0.0
    for i in range(cfg.aux_steps):
        parts.opt_aux.zero_grad(set_to_none=True)
        finite = True
        for k, m in enumerate(micros):
            with torch.no_grad(), autocast:
                x = parts.generator(z_aux[i][m.rows].to(device))
            rows = idx[i]
            real = images[rows[m.rows].to(images.device)] if images is not None and rows is not None else None
            with no_sync(parts.ddp_aux, enabled=k < last), swap_attr(method, "aux", parts.ddp_aux):
                with autocast:
                    loss_a, stats = method.aux_loss(x, real, micro_generator(seed + i, m))
                m.weight(loss_a).backward()
            finite = finite and is_finite(loss_a.detach())
            if i == cfg.aux_steps - 1:
                add(m, loss_aux=loss_a.detach(), **stats)
        norm_a, ok = guarded_step(parts.opt_aux, parts.aux_params, cfg.grad_clip, finite)
        counts["skipped_aux"] += int(not ok)
        all_ok = all_ok and ok
    method.aux.requires_grad_(False)  # eta frozen for the generator step
    try:
        parts.opt_g.zero_grad(set_to_none=True)
        finite = True
        for k, m in enumerate(micros):
            with no_sync(parts.ddp_generator, enabled=k < last):
                with autocast:
                    fake = parts.ddp_generator(z[m.rows].to(device))
                    loss_g, gen_stats = method.generator_loss(fake, micro_generator(seed + cfg.aux_steps, m))
                m.weight(loss_g).backward()
            finite = finite and is_finite(loss_g.detach())
            add(m, loss_g=loss_g.detach(), **gen_stats)
        norm_g, ok = guarded_step(parts.opt_g, parts.gen_params, cfg.grad_clip, finite)
    finally:
        method.aux.requires_grad_(True)
    counts["skipped_g"] += int(not ok)
    all_ok = all_ok and ok
    comm = device if torch.device(device).type == "cuda" else None
    world = world_size()
    stats = {k: (float(round(v * world)) if k.startswith(TALLY) else v)   # mean of counts x ranks = their total
             for k, v in all_reduce_mean(sums, comm).items()}
    return {**stats, "grad_norm_g": norm_g, "grad_norm_aux": norm_a}, all_ok
