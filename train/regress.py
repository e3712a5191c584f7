"""The regression-generator control: a good noise-to-image mapping without diffusion features.

METHOD.md section 4 asks whether initialising a one-step student from the teacher helps because
of the teacher's *I/O mapping* or because of its *features learned across noise levels*. This
module makes the control that has the first and not the second: a randomly initialised copy of
the generator architecture ``G(z) = D(sigma_init z; sigma_init)`` trained by plain L2 regression
onto the teacher's deterministic multi-step samples (Heun from ``sigma_max z``), i.e. onto the
teacher's probability-flow ODE map z -> x. It never sees a noisy image at any other noise level,
so whatever features it has were learned for one map only.

``regress_generator(RegressConfig(...))`` is what ``probe train regress`` calls. The (z, x) pairs
are drawn once and cached in ``pairs.pt`` (keyed by the teacher's weights hash), so a resumed run
does not re-sample the teacher. Training follows the teacher trainer's pattern: one
``torch.Generator`` for every draw, checkpointed with weights, optimiser and EMA for exact resume.

Run directory: ``config.json``, ``metrics.jsonl`` (train and held-out MSE, held-out R^2 against
predicting the mean image), ``pairs.pt``, ``state.pt``, the EMA generator as ``model.json`` +
``unet/`` (kind "generator", usable as ``--init from:DIR``), ``samples.png``, ``eval.json`` when
``eval_samples > 0``, ``regress.json`` (final figures) and ``manifest.json`` (checkpoint digests and,
written last, the finished marker that ``is_finished`` reads). Same NaN policy, one-writer lock and
atomic, checked checkpoints as the teacher (docs/reliability.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.core.edm import SIGMA_MAX, OneStepGenerator, heun_sample
from probe.core.ema import EMA
from probe.core.errors import UserError
from probe.core.images import save_grid
from probe.core.locks import exclusive
from probe.core.models import load_model, save_model
from probe.core.nonfinite import DEFAULT_MAX_NONFINITE, NonFiniteGuard, check_finite, guarded_step, is_finite
from probe.core.progress import progress_bar
from probe.core.runs import (
    MetricsLog,
    announce_resume,
    atomic_torch_save,
    mark_finished,
    pick_device,
    restore_training,
    run_status,
    save_state,
    start_run,
    test_point,
    verify_files,
    write_json,
)
from train.initspec import apply_init_spec

PAIRS_FILE = "pairs.pt"
DONE_FILE = "regress.json"
TRAIN_SEED_OFFSET = 7919   # training draws use seed + this, so they never coincide with the pair latents


@dataclass
class RegressConfig:
    out: str                                   # run directory
    teacher: str                               # teacher: toolkit run dir or diffusers UNet/DDPM directory
    sigma_init: float = 2.5                    # G(z) = D(sigma_init z; sigma_init), EDM sigma
    n_pairs: int = 2000                        # (z, teacher sample) pairs to regress on
    n_val: int = 256                           # further pairs held out for the validation MSE
    sample_steps: int = 18                     # Heun steps of the teacher sampler (2 * steps - 1 evaluations)
    steps: int = 2000                          # optimiser steps in total
    batch: int = 64                            # pairs per step
    lr: float = 1e-3                           # Adam learning rate
    lr_warmup: int = 100                       # steps of linear learning-rate ramp-up
    betas: tuple = (0.9, 0.99)                 # Adam betas
    ema_halflife_images: float = 5_000         # EMA half-life, in training pairs
    grad_clip: float = 0.0                     # max gradient norm, 0 = off
    log_every: int = 50                        # steps between metrics.jsonl rows
    checkpoint_every: int = 500                # steps between checkpoints (and validation)
    max_nonfinite: int = DEFAULT_MAX_NONFINITE  # non-finite steps in a row that stop the run (exit code 3)
    eval_samples: int = 500                    # final sample-quality evaluation (one step), 0 = skip
    eval_seed: int = 0                         # seed of the evaluation latents and the evaluator's reference
    seed: int = 0                              # seed of the pairs, the initialisation and every training draw
    device: str = "auto"                       # "auto" | "cpu" | "cuda"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad numbers before anything is written (one-line UserError); runs on construction."""
        from probe.core import checks as c

        c.positive_float(self.sigma_init, "sigma_init")
        c.positive_int(self.max_nonfinite, "max_nonfinite")
        for name in ("n_pairs", "n_val", "sample_steps", "batch", "log_every", "checkpoint_every"):
            c.positive_int(getattr(self, name), name)
        c.nonneg_int(self.steps, "steps")  # 0 = write the random initialisation (a baseline)
        c.nonneg_int(self.lr_warmup, "lr_warmup")
        c.positive_float(self.lr, "lr")
        c.betas(self.betas)
        c.positive_float(self.ema_halflife_images, "ema_halflife_images")
        c.nonneg_float(self.grad_clip, "grad_clip")
        c.eval_samples(self.eval_samples)
        c.seed(self.eval_seed, "eval_seed")
        c.seed(self.seed)
        c.device(self.device)


def _check(cfg: RegressConfig) -> None:
    cfg.validate()


@torch.no_grad()
def teacher_pairs(teacher, n: int, sample_steps: int, seed: int, device, batch: int = 250,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents z (seeded) and the teacher's Heun samples from sigma_max z, on the CPU."""
    shape = (n, teacher.channels, teacher.resolution, teacher.resolution)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    xs = []
    with progress_bar(n, "teacher samples", progress) as advance:
        for zb in z.split(batch):
            xs.append(heun_sample(teacher.denoiser, zb.to(device), sample_steps, sigma_max=SIGMA_MAX).cpu())
            advance(len(zb))
    return z, torch.cat(xs)


def load_or_make_pairs(out: Path, cfg: RegressConfig, teacher, device, progress: bool) -> dict:
    """The cached pairs of this run, made on first use; refuses a cache made from other weights."""
    key = {"teacher_sha256": teacher.sha256(), "n": cfg.n_pairs + cfg.n_val, "sample_steps": cfg.sample_steps,
           "seed": cfg.seed, "sigma_max": SIGMA_MAX}
    path = out / PAIRS_FILE
    if path.exists():
        verify_files(out, [PAIRS_FILE])
        try:
            cached = torch.load(path, map_location="cpu", weights_only=False)
            cached_key = cached["key"]
        except Exception as err:  # torch raises several types for a damaged archive
            raise UserError(f"{path} is damaged: cannot read it ({type(err).__name__}); delete it to sample the "
                            "pairs again") from None
        if cached_key != key:
            raise UserError(f"{path} was made from another teacher or with other settings; "
                            "delete it or use a new --out")
        return cached
    z, x = teacher_pairs(teacher, key["n"], cfg.sample_steps, cfg.seed, device, progress=progress)
    pairs = {"z": z, "x": x, "key": key}
    atomic_torch_save(path, pairs, manifest=out)
    return pairs


@torch.no_grad()
def mse(generator: OneStepGenerator, z: torch.Tensor, x: torch.Tensor, device, batch: int = 500) -> float:
    """Mean squared error of G(z) against x over all pairs."""
    total = 0.0
    for zb, xb in zip(z.split(batch), x.split(batch)):
        total += float(((generator(zb.to(device)).float().cpu() - xb) ** 2).sum())
    return total / x.numel()


STATE_KEYS = ("net", "ema", "opt", "rng", "step", "seconds")


def regress_generator(cfg: RegressConfig, resume: bool = False, progress: bool = True,
                      stop_after: int | None = None) -> Path:
    """Train (or resume) the regressed generator; returns the run directory. ``stop_after`` simulates a kill."""
    _check(cfg)
    device = pick_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    with exclusive(cfg.out, "regression run"):
        return _regress(cfg, device, teacher, resume, progress, stop_after)


def _regress(cfg: RegressConfig, device, teacher, resume: bool, progress: bool, stop_after: int | None) -> Path:
    if (Path(cfg.out) / PAIRS_FILE).exists():
        verify_files(cfg.out, [PAIRS_FILE])  # checked with the rest before the run directory changes
    out, state = start_run(Path(cfg.out), cfg, resume, STATE_KEYS)
    pairs = load_or_make_pairs(out, cfg, teacher, device, progress)
    z_train, x_train = pairs["z"][:cfg.n_pairs], pairs["x"][:cfg.n_pairs]
    z_val, x_val = pairs["z"][cfg.n_pairs:], pairs["x"][cfg.n_pairs:]
    # R^2 reference: predicting the mean training image for every z
    mse_mean_image = float(((x_val - x_train.mean(0, keepdim=True)) ** 2).mean())

    net, init_report = apply_init_spec("random", teacher, cfg.seed)
    net.to(device)
    generator = OneStepGenerator(net, cfg.sigma_init)
    ema = EMA(net, cfg.ema_halflife_images)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    params = list(net.parameters())
    rng = torch.Generator().manual_seed(cfg.seed + TRAIN_SEED_OFFSET)
    step, seconds = 0, 0.0
    guard = NonFiniteGuard(cfg.max_nonfinite)
    if state is not None:
        restore_training(state, net, ema, opt, rng)
        step, seconds = state["step"], state["seconds"]
        guard = NonFiniteGuard(cfg.max_nonfinite, state.get("guard"))
    if resume:
        announce_resume(out, state, cfg.steps)
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None,
                     resume_rows=state.get("metrics_rows") if state is not None else None)
    record = {"regressed_onto": str(cfg.teacher), "teacher_sha256": teacher.sha256(), "n_pairs": cfg.n_pairs,
              "sample_steps": cfg.sample_steps, "init": init_report["canonical"]}

    def validate() -> dict:
        val = mse(OneStepGenerator(ema.net, cfg.sigma_init), z_val, x_val, device)
        return {"val_mse": val, "val_r2": 1.0 - val / max(mse_mean_image, 1e-12)}

    def checkpoint() -> None:
        check_finite({"generator": net, "EMA generator": ema.net}, str(out))  # never overwrite a good checkpoint
        guard.saved(step)
        save_model(out, ema.net, "generator", teacher.dataset, sigma_init=cfg.sigma_init,
                   extra={**record, "steps": step})
        save_state(out, {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "rng": rng.get_state(), "step": step, "seconds": seconds, "guard": guard.state_dict(),
                         "metrics_rows": log.rows, "running": running})

    running = state.get("running", 0.0) if state is not None else 0.0
    with progress_bar(cfg.steps, "regress generator", progress, completed=step) as advance:
        while step < cfg.steps:
            t0 = time.perf_counter()
            idx = torch.randint(cfg.n_pairs, (cfg.batch,), generator=rng)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
            loss = ((generator(z_train[idx].to(device)) - x_train[idx].to(device)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # a NaN/inf loss or gradient skips the step (probe/core/nonfinite.py)
            _, ok = guarded_step(opt, params, cfg.grad_clip, is_finite(loss.detach()))
            guard.update(ok, step + 1, str(out), log)
            ema.update(net, cfg.batch)
            step += 1
            seconds += time.perf_counter() - t0
            running += float(loss.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                log.log(step=step, seconds=seconds, loss=running / n, lr=opt.param_groups[0]["lr"], **guard.metrics())
                running = 0.0
            test_point(f"step:{step}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                log.log(step=step, seconds=seconds, **validate())
                checkpoint()
            advance(info=f"mse {float(loss.detach()):.4f}")
            if stop_after is not None and step >= stop_after:
                return out
    if state is None and cfg.steps == 0:
        checkpoint()
    _finish(out, ema.net, cfg, teacher.dataset, device, validate(), seconds, progress)
    mark_finished(out, cfg.steps)
    return out


@torch.no_grad()
def _finish(out: Path, net, cfg: RegressConfig, dataset: str | None, device, val: dict, seconds: float,
            progress: bool) -> None:
    """Sample grid, optional sample quality, and the final figures (regress.json)."""
    gen = OneStepGenerator(net, cfg.sigma_init)
    n = max(cfg.eval_samples, 64)
    shape = (n, net.unet.config.in_channels, *([net.unet.config.sample_size] * 2))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.eval_seed))
    samples = torch.cat([gen(zb.to(device)).float().cpu() for zb in z.split(250)])
    save_grid(samples[:64], out / "samples.png")
    result = {**val, "steps": cfg.steps, "seconds": seconds, "sigma_init": cfg.sigma_init}
    if cfg.eval_samples > 0 and dataset is not None:
        from probe.quality.metrics import QualityEvaluator

        evaluator = QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed, progress=progress)
        quality = {**evaluator.evaluate(samples), "floor": evaluator.floor(), "evaluator": evaluator.info,
                   "sampler": "one-step", "nfe": 1}
        write_json(out / "eval.json", quality)
        result["fd"] = quality["fd"]
    write_json(out / DONE_FILE, result)


def is_finished(run_dir: Path, steps: int | None = None) -> bool:
    """Has a regression run completed (``steps`` at least, when given)? The one rule: ``run_status``."""
    return run_status(run_dir, steps) == "done"
