"""Train a one-step generator G(z) = D_theta(sigma_init z; sigma_init): one loop for every method.

``train_student(StudentConfig(...))`` is what ``probe train student`` calls. The generator is a
copy of the teacher's denoiser (``EDMDenoiser`` or ``DDPMDenoiser``) with an init spec applied
(``train/init.py``); the method (``train/student/methods/``) brings its auxiliary network and its two
losses. Per step:

1. draw z, compute ``fake = G(z)`` once (with gradients);
2. ``aux_steps`` auxiliary updates; the last one uses ``fake.detach()``, earlier ones fresh samples;
3. one generator update on ``method.generator_loss(fake)`` with the auxiliary network frozen;
4. EMA of the generator by half-life in images (optionally with EDM's ramp-up).

Gradients that are NaN/inf skip that optimiser step (counted in ``metrics.jsonl``) so Adam's
moments are never poisoned. Every random draw (z, real-batch indices, sigmas, noise) comes from
one CPU ``torch.Generator`` saved in ``state.pt`` with weights, optimisers, EMA, counters and log
accumulators, so a killed run resumed with ``resume=True`` ends bit-identical to an uninterrupted
one. bf16 autocast is used on CUDA only.

Run directory: ``config.json``, ``metrics.jsonl``, ``state.pt``, the EMA generator as
``model.json`` + ``unet/`` (``load_model(run).generator`` works), the auxiliary network in
``ratio/`` (ratio/gan methods, ``train.ratio_net.load_ratio_net``) or ``fake/`` (vsd/sid, a
toolkit model directory), sample grids from a fixed z in ``samples/`` and ``samples.png``, and
``eval.json`` (final sample quality) when ``eval_every > 0``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.core.errors import UserError
from probe.core.progress import progress_bar
from probe.core.data import load_dataset
from probe.core.distributed import (autocast_for, barrier, cuda_speedups, distributed_session, guarded_step, is_main,
                               on_main, split_batch, student_step_parallel, world_size, wrap_ddp)
from probe.core.edm import SIGMA_MAX, SIGMA_MIN, OneStepGenerator
from probe.core.ema import EMA
from probe.core.images import save_grid
from train.init import initialise_generator
from train.student.losses import SIGMA_DISTS, WEIGHTINGS
from train.student.methods import DEFAULT_METHOD, get_method
from probe.core.models import load_model, save_model
from train.student.ratio_net import RATIO_NETS
from probe.core.runs import MetricsLog, load_state, prepare_run_dir, save_state, write_json


@dataclass
class StudentConfig:
    """Options of ``probe train student``. Defaults were checked on digits with a 1.1M-parameter "tiny"
    teacher: diffratio-js reaches the teacher's 18-step Heun FD in about 400 steps (lr 2e-4 and an EMA
    ramp-up were tried and were not better)."""

    out: str                                   # run directory
    teacher: str                               # teacher: toolkit run dir or diffusers UNet/DDPM directory
    method: str = DEFAULT_METHOD               # diffratio-js | diffratio-kl | diffratio-fkl | vsd | sid | gan
    init: str = "teacher"                      # generator init spec (train/init.py)
    data: str | None = None                    # real data set; None = the teacher's data set
    sigma_init: float = 2.5                    # G(z) = D(sigma_init z; sigma_init), EDM sigma
    steps: int = 2000                          # generator steps in total
    batch: int = 64                            # generated images per step (and real ones for ratio/gan); global
    accum: int = 1                             # micro-batches per process and step (gradient accumulation)
    lr_g: float = 1e-4                         # generator Adam learning rate
    lr_aux: float = 1e-4                       # auxiliary-network (classifier / fake score) Adam learning rate
    betas: tuple = (0.0, 0.99)                 # Adam betas for both optimisers
    aux_steps: int = 1                         # auxiliary updates per generator update
    ratio_net: str = "encoder"                 # ratio/gan classifier: encoder | encoder-random | cnn
    cnn_width: int = 32                        # channels of the first stage of the "cnn" classifier
    sigma_dist: str = "lognormal"              # noise levels of both losses: lognormal | karras
    p_mean: float = -1.2                       # lognormal: mean of ln sigma
    p_std: float = 1.2                         # lognormal: std of ln sigma
    sigma_min: float = SIGMA_MIN               # smallest sigma of both losses
    sigma_max: float = SIGMA_MAX               # largest sigma (the karras grid's top; lognormal truncation)
    weighting: str = "none"                    # w(sigma) of the generator loss: none | sigma2 | snr | edm
    fkl_clip: float = 10.0                     # diffratio-fkl: upper clip of h = exp(-l)
    sid_alpha: float = 1.2                     # sid: alpha of the SiD loss
    ema_halflife_images: float = 5_000         # EMA half-life of the generator, in generated images
    ema_rampup: float = 0.0                    # EDM's ramp-up (0.05 there): half-life <= this x images so far; 0 = off
    grad_clip: float = 0.0                     # max gradient norm for both optimisers, 0 = off
    log_every: int = 25                        # steps between metrics.jsonl rows (means over the interval)
    eval_every: int = 0                        # steps between sample-quality evaluations, 0 = off
    eval_samples: int = 500                    # samples per evaluation (train.metrics.QualityEvaluator)
    eval_seed: int = 0                         # seed of the fixed eval z and of the evaluator's reference
    checkpoint_every: int = 500                # steps between checkpoints (and sample grids)
    seed: int = 0                              # seed of every random draw in training
    device: str = "auto"                       # "auto" | "cpu" | "cuda"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run


def validate(cfg: StudentConfig) -> None:
    """Refuse bad options before anything is written (one-line UserErrors)."""
    get_method(cfg.method)
    def choose(kind: str, value, allowed) -> tuple:
        return value in allowed, f"unknown {kind} {value!r}; choose one of {', '.join(allowed)}"

    checks = [choose("ratio network", cfg.ratio_net, RATIO_NETS),
              choose("sigma distribution", cfg.sigma_dist, SIGMA_DISTS),
              choose("weighting", cfg.weighting, WEIGHTINGS),
              (cfg.sigma_init > 0, "--sigma-init must be positive"),
              (0 < cfg.sigma_min < cfg.sigma_max, "need 0 < sigma_min < sigma_max"),
              (cfg.steps >= 0 and cfg.batch > 0 and cfg.aux_steps >= 1, "steps >= 0, batch >= 1, aux_steps >= 1"),
              (cfg.checkpoint_every > 0 and cfg.log_every > 0, "checkpoint_every and log_every must be positive"),
              (cfg.eval_every >= 0, "eval_every must be >= 0 (0 = off)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ------------------------------------------------------------------------------- pieces
def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor,
                   grad_clip: float) -> tuple[float, bool]:
    """backward + step; returns (gradient norm, stepped). A NaN/inf gradient skips the step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return guarded_step(opt, params, grad_clip)


class Accumulator:
    """Means of logged scalars over a logging interval (part of the checkpoint for exact resume)."""

    def __init__(self, state: dict | None = None):
        self.sums, self.count = (dict(state["sums"]), state["count"]) if state else ({}, 0)

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def pop(self) -> dict:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}


def ema_halflife(cfg: StudentConfig, step: int) -> float:
    """EMA half-life (images) at ``step``: EDM's ramp-up keeps the average from lagging early on."""
    if cfg.ema_rampup <= 0:
        return cfg.ema_halflife_images
    return min(cfg.ema_halflife_images, step * cfg.batch * cfg.ema_rampup)


@torch.no_grad()
def one_step_samples(denoiser, sigma_init: float, z: torch.Tensor, device, batch: int = 250) -> torch.Tensor:
    """G(z) for fixed latents, in chunks, on the CPU."""
    gen = OneStepGenerator(denoiser, sigma_init)
    return torch.cat([gen(zb.to(device)).float().cpu() for zb in z.split(batch)])


def _data_for(cfg: StudentConfig, teacher, needs_images: bool):
    """(data set name, real images or None), checked against the teacher's image shape."""
    name = cfg.data or teacher.dataset
    if name is None and (needs_images or cfg.eval_every > 0):
        raise UserError(f"{cfg.teacher} does not record its data set; pass --data")
    if name is None:
        return None, None
    data = load_dataset(name, "train")
    if (data.channels, data.resolution) != (teacher.channels, teacher.resolution):
        raise UserError(f"teacher {cfg.teacher} works on {teacher.channels}x{teacher.resolution}x{teacher.resolution} "
                        f"images but {name} has {data.channels}x{data.resolution}x{data.resolution}")
    return name, (data.images if needs_images else None)


# ---------------------------------------------------------------------------------- loop
def train_student(cfg: StudentConfig,
                  resume: bool = False,             # continue the run in cfg.out from its state.pt
                  progress: bool = True,            # rich progress bar
                  stop_after: int | None = None,    # return after this step (tests: simulates a kill)
                  ) -> Path:
    """Train (or resume) a one-step generator; returns the run directory. ``stop_after`` simulates a kill.

    Under torchrun every process calls this with the same config (probe/core/distributed.py)."""
    validate(cfg)
    with distributed_session(cfg.device) as device:
        return _train_student(cfg, device, resume, progress and is_main(), stop_after)


def _train_student(cfg: StudentConfig, device, resume: bool, progress: bool, stop_after: int | None) -> Path:
    micros = split_batch(cfg.batch, world_size(), accum=cfg.accum)
    parallel = len(micros) > 1 or world_size() > 1   # else the single-process path, bit-identical to before
    cuda_speedups(device)
    method_cls = get_method(cfg.method)
    teacher = load_model(cfg.teacher, device)
    dataset, images = _data_for(cfg, teacher, method_cls.uses_data)
    images = images.to(device) if images is not None else None
    torch.manual_seed(cfg.seed)  # random parts of auxiliary networks
    gen_net, init_report = initialise_generator(cfg.init, teacher, cfg.seed)
    generator = OneStepGenerator(gen_net, cfg.sigma_init)
    method = method_cls(cfg, teacher.denoiser, generator)
    record = {"method": method.describe(), "init": init_report, "teacher": str(cfg.teacher),
              "teacher_sha256": teacher.sha256(), "teacher_kind": teacher.kind,
              "generator_parameters": sum(p.numel() for p in gen_net.parameters())}
    del teacher  # the loop's last reference: a method with uses_teacher False kept none (methods/base.py)
    if not method.uses_teacher:
        gc.collect()  # free the teacher's weights before training (module graphs can hold cycles)
    evaluator = None
    if cfg.eval_every > 0 and is_main():
        from probe.quality.metrics import QualityEvaluator

        evaluator = QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed, progress=progress)
    out = on_main(prepare_run_dir, Path(cfg.out), cfg, resume)  # only now: bad options above leave nothing behind
    ema = EMA(gen_net, cfg.ema_halflife_images)
    gen_params, aux_params = list(gen_net.parameters()), list(method.aux.parameters())
    betas = tuple(float(b) for b in cfg.betas)  # Adam refuses a mix of int and float
    # fused: one kernel over all tensors instead of a Python loop of ~10 ops per tensor (3-4x faster steps on CPU)
    opt_g = torch.optim.Adam(gen_params, lr=cfg.lr_g, betas=betas, fused=True)
    opt_a = torch.optim.Adam(aux_params, lr=cfg.lr_aux, betas=betas, fused=True)
    rng = torch.Generator().manual_seed(cfg.seed)
    ddp_gen, ddp_aux = (wrap_ddp(generator, device), wrap_ddp(method.aux, device)) if parallel else (None, None)
    step, seconds, counts, acc = 0, 0.0, {"skipped_g": 0, "skipped_aux": 0}, Accumulator()
    state = load_state(out) if resume else None
    if state is not None:
        gen_net.load_state_dict(state["generator"])
        method.aux.load_state_dict(state["aux"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_a.load_state_dict(state["opt_aux"])
        rng.set_state(state["rng"])
        step, seconds, counts, acc = state["step"], state["seconds"], state["counts"], Accumulator(state["acc"])
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None) if is_main() else None
    shape = (cfg.batch, gen_net.unet.config.in_channels, *([gen_net.unet.config.sample_size] * 2))
    # fixed latents for grids and evaluations, drawn like train.evaluate.generate (same z as `probe eval`)
    z_eval = torch.randn((max(cfg.eval_samples, 64), *shape[1:]),
                         generator=torch.Generator().manual_seed(cfg.eval_seed))
    autocast = autocast_for(device)

    def checkpoint() -> None:
        barrier()
        if not is_main():
            return
        save_model(out, ema.net, "generator", dataset, sigma_init=cfg.sigma_init, extra={**record, "steps": step})
        method.save_aux(out, dataset)
        grid = one_step_samples(ema.net, cfg.sigma_init, z_eval[:64], device)
        save_grid(grid, out / "samples" / f"step-{step:06d}.png")
        save_state(out, {"generator": gen_net.state_dict(), "aux": method.aux.state_dict(), "ema": ema.state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_aux": opt_a.state_dict(), "rng": rng.get_state(),
                         "step": step, "seconds": seconds, "counts": dict(counts), "acc": acc.state_dict()})

    def evaluate() -> dict:
        result = evaluator.evaluate(one_step_samples(ema.net, cfg.sigma_init, z_eval[:cfg.eval_samples], device))
        log.log(step=step, seconds=seconds, **{f"eval_{k}": v for k, v in result.items()})
        return result

    if evaluator is not None and state is None:
        evaluate()  # the starting point, at step 0
    with progress_bar(cfg.steps, f"{cfg.method} {dataset or ''}", progress, completed=step) as advance:
        while step < cfg.steps:
            t0 = time.perf_counter()
            if parallel:
                stats = student_step_parallel(cfg, method, generator, ddp_gen, ddp_aux, images, rng, shape, device,
                                              autocast, opt_g, opt_a, gen_params, aux_params, counts, micros)
            else:
                stats = train_step(cfg, method, generator, images, rng, shape, device, autocast, opt_g, opt_a,
                                   gen_params, aux_params, counts)
            ema.halflife_images = ema_halflife(cfg, step + 1)
            ema.update(gen_net, cfg.batch)
            step += 1
            seconds += time.perf_counter() - t0
            acc.add(**stats)
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                log.log(step=step, seconds=seconds, **acc.pop(), **counts)
            if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                evaluate()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            advance(info=f"loss_g {stats['loss_g']:.4f}  loss_aux {stats['loss_aux']:.4f}")
            if stop_after is not None and step >= stop_after:
                return out
    if state is None and cfg.steps == 0:
        checkpoint()
    if not is_main():
        return out
    save_grid(one_step_samples(ema.net, cfg.sigma_init, z_eval[:64], device), out / "samples.png")
    if evaluator is not None:
        final = evaluator.evaluate(one_step_samples(ema.net, cfg.sigma_init, z_eval[:cfg.eval_samples], device))
        write_json(out / "eval.json", {**final, "floor": evaluator.floor(), "evaluator": evaluator.info,
                                       "sampler": "one-step", "nfe": 1, "step": step, "seconds": seconds})
    return out


def train_step(cfg: StudentConfig, method, generator, images, rng, shape, device, autocast, opt_g, opt_a,
               gen_params, aux_params, counts) -> dict:
    """One generator step with its auxiliary steps; returns the scalars to log."""
    z = torch.randn(shape, generator=rng).to(device)
    with autocast:
        fake = generator(z)
    stats: dict = {}
    for i in range(cfg.aux_steps):
        if i < cfg.aux_steps - 1:
            with torch.no_grad(), autocast:
                x = generator(torch.randn(shape, generator=rng).to(device))
        else:
            x = fake.detach()
        real = images[torch.randint(len(images), (cfg.batch,), generator=rng)] if images is not None else None
        with autocast:
            loss_a, stats = method.aux_loss(x, real, rng)
        norm_a, ok = optimizer_step(opt_a, aux_params, loss_a, cfg.grad_clip)
        counts["skipped_aux"] += int(not ok)
    method.aux.requires_grad_(False)  # eta frozen for the generator step (and no wasted parameter grads)
    try:
        with autocast:
            loss_g, gen_stats = method.generator_loss(fake, rng)
        norm_g, ok = optimizer_step(opt_g, gen_params, loss_g, cfg.grad_clip)
    finally:
        method.aux.requires_grad_(True)
    counts["skipped_g"] += int(not ok)
    return {"loss_g": float(loss_g.detach()), "loss_aux": float(loss_a.detach()), "grad_norm_g": norm_g,
            "grad_norm_aux": norm_a, **stats, **gen_stats}
