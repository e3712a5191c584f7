"""Train an EDM teacher (Karras et al. 2022) around a diffusers UNet2DModel.

``train_teacher(TeacherConfig(...))`` is what ``probe train teacher`` calls. Every random draw
(batch indices, sigmas, noise) comes from one ``torch.Generator`` whose state is checkpointed
with the weights, optimiser and EMA, so a killed run resumed with ``resume=True`` ends with
exactly the weights of an uninterrupted one.

Several processes (``torchrun --nproc_per_node=K``): the network is wrapped in
DistributedDataParallel, every rank draws the whole global batch's randomness from the same
generator and trains on its block of rows (``probe/core/distributed.py``), so the result does not
depend on K up to float rounding; ``accum`` micro-batches per process keep ``batch`` the global
batch. Rank 0 writes the run directory (holding its one-writer lock); all ranks read it on resume.

NaN policy (``probe/core/nonfinite.py``, shared with the student and regression loops): a step
whose loss or gradient is not finite is skipped and counted (``skipped_steps``,
``nonfinite_in_a_row`` in metrics.jsonl); ``max_nonfinite`` of them in a row stop the run with
exit code 3, leaving the last checkpoint (always finite) in place.

``sigma_range`` truncates the training noise levels to a band; a teacher trained only around
``sigma_init`` is the "I/O mapping without multi-level features" control of METHOD.md section 4.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.core.data import load_dataset
from probe.core.distributed import (
    all_reduce_mean,
    autocast_for,
    barrier,
    cuda_speedups,
    distributed_session,
    is_main,
    no_sync,
    on_main,
    split_batch,
    world_size,
    wrap_ddp,
)
from probe.core.edm import Denoiser, EDMDenoiser, edm_loss, heun_sample, sample_edm_sigmas
from probe.core.ema import EMA, rampup_halflife
from probe.core.images import save_grid
from probe.core.locks import exclusive
from probe.core.models import build_unet, save_model
from probe.core.nonfinite import DEFAULT_MAX_NONFINITE, NonFiniteGuard, check_finite, guarded_step, is_finite
from probe.core.progress import progress_bar
from probe.core.runs import (
    MetricsLog,
    load_state,
    mark_finished,
    restore_training,
    resume_point,
    save_state,
    start_run,
    test_point,
    write_json,
)

# Default optimiser steps per data set, each measured to fit 10 minutes of training on 2 CPU cores
# (benchmarks/RESULTS.md, "Benchmark headroom"): scenes' 16x16 RGB images need more steps than the
# 8x8 digits for a teacher that draws every class; any other data set gets DEFAULT_TEACHER_STEPS.
DEFAULT_TEACHER_STEPS = 1600
TEACHER_STEPS = {"scenes": 2400}


def default_teacher_steps(data: str) -> int:
    """The optimiser steps a teacher of data set ``data`` trains when its config leaves steps out."""
    return TEACHER_STEPS.get(data, DEFAULT_TEACHER_STEPS)


@dataclass
class TeacherConfig:
    out: str                                   # run directory
    data: str = "digits"                       # data set name (probe/core/data.py)
    preset: str = "tiny"                       # UNet preset (probe/core/models.py)
    steps: int | None = None                   # optimiser steps in total; None = the data set's (TEACHER_STEPS)
    batch: int = 64                            # images per step (global: over all processes and micro-batches)
    accum: int = 1                             # micro-batches per process and step (gradient accumulation)
    lr: float = 2e-3                           # Adam learning rate
    lr_warmup: int = 200                       # steps of linear learning-rate ramp-up
    lr_cooldown: float = 0.25                  # last fraction of the steps over which the lr falls linearly to 0
                                               # (0 = off; 0.25 measured better on scenes, equal on digits)
    betas: tuple = (0.9, 0.99)                 # Adam betas
    ema_halflife_images: float = 12_500        # EMA half-life, in training images
    ema_rampup: float = 0.0                    # EDM's ramp-up: half-life <= this x images seen so far; 0 = off
    p_mean: float = -1.2                       # mean of ln sigma during training
    p_std: float = 1.2                         # std of ln sigma during training
    sigma_range: tuple | None = None           # (lo, hi): train only on sigmas in this band
    grad_clip: float = 0.0                     # max gradient norm, 0 = off
    checkpoint_every: int = 500                # steps between checkpoints
    max_nonfinite: int = DEFAULT_MAX_NONFINITE  # non-finite steps in a row that stop the run (exit code 3)
    sample_steps: int = 18                     # Heun steps for the sample grid and evaluation
    eval_samples: int = 500                    # one-off sample-quality evaluation at the end, 0 = skip
    seed: int = 0                              # seed of every random draw
    device: str = "auto"                       # "auto" | "cpu" | "cuda"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        if self.steps is None:  # resolved here, so config.json records the number the run used
            self.steps = default_teacher_steps(self.data)
        self.validate()

    def validate(self) -> None:
        """Refuse bad numbers before anything is written (one-line UserError); runs on construction."""
        from probe.core import checks as c

        for name in ("steps", "batch", "accum", "checkpoint_every", "sample_steps"):
            c.positive_int(getattr(self, name), name)
        c.nonneg_int(self.lr_warmup, "lr_warmup")
        c.number(self.lr_cooldown, "lr_cooldown", at_least=0.0, below=1.0)
        c.positive_int(self.max_nonfinite, "max_nonfinite")
        c.positive_float(self.lr, "lr")
        c.betas(self.betas)
        c.positive_float(self.ema_halflife_images, "ema_halflife_images")
        c.nonneg_float(self.ema_rampup, "ema_rampup")
        c.finite(self.p_mean, "p_mean")
        c.positive_float(self.p_std, "p_std")
        c.sigma_range(self.sigma_range)
        c.nonneg_float(self.grad_clip, "grad_clip")
        c.eval_samples(self.eval_samples)
        c.seed(self.seed)
        c.device(self.device)


def train_teacher(cfg: TeacherConfig,
                  resume: bool = False,             # continue the run in cfg.out from its state.pt
                  progress: bool = True,            # rich progress bar
                  stop_after: int | None = None,    # return after this step (tests: simulates a kill)
                  on_step: Callable[[int, torch.nn.Module], None] | None = None,  # rank 0: (0, net) before a
                                                    # new run, (step, raw net) after each EMA update; not resumed
                  ) -> Path:
    """Train (or resume) a teacher; returns the run directory. ``stop_after`` simulates a kill.

    Under torchrun every process calls this with the same config (see the module docstring)."""
    with distributed_session(cfg.device) as device:
        return _train(cfg, device, resume, progress and is_main(), stop_after, on_step)


STATE_KEYS = ("net", "ema", "opt", "rng", "step")


def learning_rate(cfg: TeacherConfig, step: int) -> float:
    """The lr of step ``step`` (0-based): linear warm-up, constant, then an optional linear cool-down to 0."""
    assert cfg.steps is not None  # resolved on construction
    scale = min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
    start = cfg.steps * (1.0 - cfg.lr_cooldown)
    if cfg.lr_cooldown > 0 and step >= start:
        scale *= (cfg.steps - step) / (cfg.steps - start)
    return cfg.lr * scale


def _train(cfg: TeacherConfig, device: torch.device, resume: bool, progress: bool, stop_after: int | None,
           on_step=None) -> Path:
    micros = split_batch(cfg.batch, world_size(), accum=cfg.accum)  # refuses a batch too small to split
    cuda_speedups(device)
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(cfg.seed)  # weight init
    unet = build_unet(data.resolution, data.channels, cfg.preset)  # refuses a resolution it cannot take
    with ExitStack() as stack:
        if is_main():  # one writer per run directory; other ranks only read it
            stack.enter_context(exclusive(cfg.out, "teacher run"))
        return _train_locked(cfg, device, resume, progress, stop_after, micros, data, unet, on_step)


def _train_locked(cfg: TeacherConfig, device: torch.device, resume: bool, progress: bool, stop_after: int | None,
                  micros, data, unet, on_step=None) -> Path:
    assert cfg.steps is not None  # resolved on construction
    kept = {}

    def start():  # rank 0: check everything a resume needs, then open the run directory
        out, state = start_run(Path(cfg.out), cfg, resume, STATE_KEYS)
        kept["state"] = state
        return out

    out = on_main(start)
    state = kept.get("state") if is_main() else (load_state(out, STATE_KEYS) if resume else None)
    net = EDMDenoiser(unet).to(device).train()
    ddp = wrap_ddp(net, device)  # identical initial weights on every rank (same seed), DDP checks it
    ema = EMA(net, cfg.ema_halflife_images)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    rng = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        restore_training(state, net, ema, opt, rng)
    at = resume_point(out, state, resume, cfg.steps, cfg.max_nonfinite, main=is_main())
    step, guard, log = at.step, at.guard, at.log
    images = data.images.to(device)
    autocast = autocast_for(device)
    comm = _comm_device(device)
    params = list(net.parameters())
    if on_step is not None and is_main() and state is None:
        on_step(0, net)  # the starting weights, which the run's own EMA starts from
    t0 = time.time()
    with progress_bar(cfg.steps, f"teacher {cfg.data}", progress, completed=step) as advance:
        while step < cfg.steps:
            idx = torch.randint(len(images), (cfg.batch,), generator=rng)
            sigma = sample_edm_sigmas(cfg.batch, rng, cfg.p_mean, cfg.p_std, cfg.sigma_range)
            noise = torch.randn(images[idx].shape, generator=rng)
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for k, m in enumerate(micros):  # this rank's rows; gradients all-reduced after the last
                with no_sync(ddp, enabled=k < len(micros) - 1):
                    with autocast:
                        part = m.weight(edm_loss(ddp, images[idx[m.rows]], sigma[m.rows].to(device),
                                                 noise[m.rows].to(device)))
                    part.backward()
                loss = part.detach() if k == 0 else loss + part.detach()
            loss_value = all_reduce_mean({"loss": float(loss)}, comm)["loss"]  # global-batch mean
            # a NaN/inf loss or gradient skips the step: Adam's moments are never poisoned
            _, ok = guarded_step(opt, params, cfg.grad_clip, is_finite(loss_value))
            guard.update(ok, step + 1, str(out), log)
            ema.halflife_images = rampup_halflife(cfg.ema_halflife_images, cfg.ema_rampup, (step + 1) * cfg.batch)
            ema.update(net, cfg.batch)
            step += 1
            if on_step is not None and is_main():
                on_step(step, net)
            if log is not None and (step % 50 == 0 or step == cfg.steps):
                log.log(step=step, loss=loss_value, lr=opt.param_groups[0]["lr"], seconds=time.time() - t0,
                        **guard.metrics())
            advance(info=f"loss {loss_value:.4f}")
            test_point(f"step:{step}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                barrier()
                if is_main():
                    assert log is not None  # rank 0 opened it
                    _checkpoint(out, net, ema, opt, rng, step, cfg, guard, log)
            if stop_after is not None and step >= stop_after:
                return out
    if is_main():
        assert log is not None  # rank 0 opened it
        _finish(out, ema.net, cfg, device, log, progress)
        mark_finished(out, cfg.steps)
    # no rank returns before rank 0 has written the final model: a caller (train then extract under
    # torchrun) that loads the run next would otherwise read the previous checkpoint's weights
    barrier()
    return out


def _comm_device(device: torch.device) -> torch.device:
    """Where a reduction tensor must live: the GPU under NCCL, the CPU under gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def _checkpoint(out: Path, net, ema: EMA, opt, rng, step: int, cfg: TeacherConfig, guard: NonFiniteGuard,
                log: MetricsLog) -> None:
    check_finite({"network": net, "EMA network": ema.net}, str(out))  # never overwrite a good checkpoint
    guard.saved(step)
    save_model(out, ema.net, "teacher", cfg.data, extra={"steps": step, "sigma_range": cfg.sigma_range})
    save_state(out, {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "rng": rng.get_state(), "step": step, "guard": guard.state_dict(), "metrics_rows": log.rows})


@torch.no_grad()
def _finish(out: Path, denoiser: Denoiser, cfg: TeacherConfig, device, log: MetricsLog, progress: bool) -> None:
    """Sample grid from the EMA weights and, when asked, the sample-quality figure."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = max(cfg.eval_samples, 64)
    size = denoiser.unet.config["sample_size"]
    latents = torch.randn(n, denoiser.unet.config["in_channels"], size, size, generator=gen)
    samples = torch.cat([heun_sample(denoiser, lat.to(device), cfg.sample_steps).cpu()
                         for lat in latents.split(500)])
    save_grid(samples[:64], out / "samples.png")
    if cfg.eval_samples > 0:
        from probe.quality.metrics import QualityEvaluator

        evaluator = QualityEvaluator(cfg.data, n_samples=cfg.eval_samples, seed=cfg.seed, progress=progress)
        result = {**evaluator.evaluate(samples[: cfg.eval_samples]), "floor": evaluator.floor(),
                  "sampler": f"heun-{cfg.sample_steps}", "nfe": 2 * cfg.sample_steps - 1}
        write_json(out / "eval.json", result)
        log.log(step=cfg.steps, **{f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
