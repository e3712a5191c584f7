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

Matched mapping quality (``target_fd``). The fully regressed generator ends far *better* than the
teacher's own one-step output, so it is no "mapping only" control at matched quality. With
``target_fd`` set, the EMA generator is scored every ``target_every`` steps (and at step 0) with the
evaluator the students use (same ``eval_samples``, ``eval_seed`` and latents as a student's step-0
evaluation) and training stops at the first evaluation with ``FD <= target + tolerance`` (the
tolerance is a number, "N%" of the target or "floor" = 2 x the floor's FD std); that EMA
generator is the run's model. ``target_fd = "teacher"`` targets the teacher's own one-step FD at
``sigma_init`` measured here the same way, which is the full-teacher arm's step-0 FD. The outcome is
written to ``regress.json``, ``eval.json`` and ``model.json`` as ``target``. When the FD falls
past the whole band between two evaluations, the one of the two closer to the target is kept (its
EMA weights are held in memory and in the checkpoint). ``status`` is "matched" (|FD - target| <=
tolerance), "missed" (it crossed the band between two evaluations and neither is inside it: lower
``target_every`` or widen the tolerance) or "not reached" (the step budget ran out; a warning is
printed), with the curve of every evaluation, the stop step and the FD of the kept generator. Only
"matched" is a matched control.
"""

from __future__ import annotations

import re
import sys
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
from probe.core.nonfinite import DEFAULT_MAX_NONFINITE, check_finite, guarded_step, is_finite
from probe.core.progress import progress_bar
from probe.core.runs import (
    MetricsLog,
    atomic_torch_save,
    mark_finished,
    pick_device,
    restore,
    restore_training,
    resume_point,
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
TARGET_TEACHER = "teacher"   # target_fd value: the teacher's own one-step FD at sigma_init, measured in the run
_TOLERANCE = re.compile(r"^(floor|\d+(\.\d+)?%)$")   # a target tolerance given as text


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
    target_fd: float | str = 0.0               # stop at the first evaluation with FD <= this (+ tolerance); a number,
    #                                            "teacher" (the teacher's one-step FD at sigma_init) or 0 = off
    target_every: int = 50                     # steps between FD evaluations while a target is set
    target_tolerance: float | str = "floor"    # slack around the target: FD units, "N%" of it or "floor"
    #                                            (2 x the floor's FD std)
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
        if self.target_fd != TARGET_TEACHER:
            c.nonneg_float(self.target_fd, "target_fd")
        c.positive_int(self.target_every, "target_every")
        if not (isinstance(self.target_tolerance, str) and _TOLERANCE.match(self.target_tolerance)):
            c.nonneg_float(self.target_tolerance, "target_tolerance")
        if self.targeting and self.eval_samples == 0:
            raise UserError("target_fd needs FD evaluations: set eval_samples > 0 (the students' eval_samples)")

    @property
    def targeting(self) -> bool:
        """Is a target FD set (training then stops when it is reached)?"""
        return self.target_fd == TARGET_TEACHER or float(self.target_fd) > 0


def _check(cfg: RegressConfig) -> None:
    cfg.validate()


def parse_target_fd(text: str) -> float | str:
    """A ``--target-fd`` argument: "teacher" or a number (UserError otherwise)."""
    text = str(text).strip()
    if text == TARGET_TEACHER:
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"target_fd must be a number >= 0 or \"{TARGET_TEACHER}\", got {text!r}") from None


def parse_tolerance(text: str) -> float | str:
    """A ``--target-tolerance`` argument: "floor", "N%" or a number (UserError otherwise)."""
    text = str(text).strip()
    if _TOLERANCE.match(text):
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"target_tolerance must be a number >= 0, \"N%\" or \"floor\", got {text!r}") from None


def tolerance_value(rule: float | str, target: float, floor_std: float) -> float:
    """The slack in FD units: a number as it is, "N%" of the target, "floor" = 2 x the floor's FD std."""
    if rule == "floor":
        return 2.0 * float(floor_std)
    if isinstance(rule, str):
        return float(rule.rstrip("%")) / 100.0 * float(target)
    return float(rule)


def target_status(fd: float, target: float, tolerance: float) -> str:
    """"matched" (within the tolerance), "overshot" (below it: passed between evaluations) or "above"."""
    if fd > target + tolerance:
        return "above"
    return "matched" if fd >= target - tolerance else "overshot"


def eval_latents(net, eval_samples: int, eval_seed: int) -> torch.Tensor:
    """The latents of every evaluation, drawn exactly as a student's (train/student/loop.py: z_eval)."""
    shape = (max(eval_samples, 64), net.unet.config.in_channels, *([net.unet.config.sample_size] * 2))
    return torch.randn(shape, generator=torch.Generator().manual_seed(eval_seed))


@torch.no_grad()
def one_step(net, sigma_init: float, z: torch.Tensor, device) -> torch.Tensor:
    """G(z) = D(sigma_init z; sigma_init) for fixed latents, in chunks of 250 (as the students), on the CPU."""
    gen = OneStepGenerator(net, sigma_init)
    return torch.cat([gen(zb.to(device)).float().cpu() for zb in z.split(250)])


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
    if cfg.targeting and teacher.dataset is None:
        raise UserError(f"target_fd needs FD evaluations, but {cfg.teacher} does not record its data set")
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
    if state is not None:
        restore_training(state, net, ema, opt, rng)
    at = resume_point(out, state, resume, cfg.steps, cfg.max_nonfinite)
    step, seconds, guard, log = at.step, at.seconds, at.guard, at.log
    assert log is not None  # a single-process loop: always rank 0
    record = {"regressed_onto": str(cfg.teacher), "teacher_sha256": teacher.sha256(), "n_pairs": cfg.n_pairs,
              "sample_steps": cfg.sample_steps, "init": init_report["canonical"]}
    target = _Target(cfg, teacher, device, progress, state.get("target") if state is not None else None)
    if target.on:
        record["target"] = target.record()

    def validate() -> dict:
        val = mse(OneStepGenerator(ema.net, cfg.sigma_init), z_val, x_val, device)
        return {"val_mse": val, "val_r2": 1.0 - val / max(mse_mean_image, 1e-12)}

    def checkpoint() -> None:
        check_finite({"generator": net, "EMA generator": ema.net}, str(out))  # never overwrite a good checkpoint
        guard.saved(step)
        if target.on:
            record["target"] = target.record()
        save_model(out, ema.net, "generator", teacher.dataset, sigma_init=cfg.sigma_init,
                   extra={**record, "steps": step})
        save_state(out, {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "rng": rng.get_state(), "step": step, "seconds": seconds, "guard": guard.state_dict(),
                         "metrics_rows": log.rows, "running": running, "target": target.state_dict()})

    running = state.get("running", 0.0) if state is not None else 0.0
    if target.on and state is None:
        target.evaluate(ema.net, 0, seconds, log)  # the random initialisation may already meet it
    with progress_bar(cfg.steps, "regress generator", progress, completed=step) as advance:
        while step < cfg.steps and not target.reached:
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
            if target.on and (step % cfg.target_every == 0 or step == cfg.steps):
                target.evaluate(ema.net, step, seconds, log)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or target.reached:
                log.log(step=step, seconds=seconds, **validate())
                checkpoint()
            advance(info=f"mse {float(loss.detach()):.4f}")
            if stop_after is not None and step >= stop_after:
                return out
    if state is None and step == 0:
        checkpoint()  # nothing trained: the random initialisation is the model
    if target.on:
        target.finish(step)
        if not target.reached:
            print(f"warning: {out}: target FD {target.value:.4g} (+{target.tolerance:.3g}) not reached within "
                  f"{cfg.steps} steps (last FD {target.curve[-1]['fd']:.4g}); the run is labelled "
                  "\"not reached\" and is no matched control", file=sys.stderr)
        record["target"] = target.record()
        save_model(out, ema.net, "generator", teacher.dataset, sigma_init=cfg.sigma_init,
                   extra={**record, "steps": step})  # the label travels with the model
    _finish(out, ema.net, cfg, teacher.dataset, device, validate(), seconds, progress,
            target.stop_step if target.on else step,
            target.record() if target.on else None, target.final_quality, target.evaluator)
    mark_finished(out, cfg.steps)
    return out


class _Target:
    """The target-FD rule of a regression run: its evaluator, the target value, the curve and the stop."""

    def __init__(self, cfg: RegressConfig, teacher, device, progress: bool, saved: dict | None):
        self.cfg, self.device, self.on = cfg, device, cfg.targeting
        self.curve: list[dict] = []
        self.reached, self.status, self.stop_step, self.fd_reached = False, "running", None, None
        self.final_quality: dict | None = None   # the evaluation of the model the run keeps
        self.prev: dict | None = None            # the last evaluation above the band, with its weights
        self.evaluator = None
        if not self.on:
            return
        from probe.quality.metrics import QualityEvaluator

        self.evaluator = QualityEvaluator(teacher.dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed,
                                          progress=progress)
        self.floor = self.evaluator.floor()
        self.z = eval_latents(teacher.denoiser, cfg.eval_samples, cfg.eval_seed)[:cfg.eval_samples]
        if saved is not None:
            self.value, self.teacher_fd = saved["value"], saved["teacher_fd"]
            self.curve, self.reached, self.status = list(saved["curve"]), saved["reached"], saved["status"]
            self.stop_step, self.fd_reached, self.prev = saved["stop_step"], saved.get("fd_reached"), saved.get("prev")
        else:
            self.teacher_fd = None
            if cfg.target_fd == TARGET_TEACHER:
                # the full-teacher arm's step-0 FD: the teacher copied into G, scored as a student scores step 0
                samples = one_step(teacher.denoiser, cfg.sigma_init, self.z, device)
                self.teacher_fd = float(self.evaluator.evaluate(samples)["fd"])
            self.value = self.teacher_fd if self.teacher_fd is not None else float(cfg.target_fd)
        self.tolerance = tolerance_value(cfg.target_tolerance, self.value, self.floor["fd_std"])

    def evaluate(self, net, step: int, seconds: float, log: MetricsLog) -> None:
        """Score ``net`` (the EMA generator); at the first FD <= target + tolerance keep whichever of this
        evaluation and the previous one is closer to the target (``net`` is set back to the previous
        weights when that one is), and label it."""
        assert self.evaluator is not None  # made whenever a target is on
        quality = self.evaluator.evaluate(one_step(net, self.cfg.sigma_init, self.z, self.device))
        log.log(step=step, seconds=seconds, **{f"eval_{k}": v for k, v in quality.items()})
        fd = float(quality["fd"])
        self.curve.append({"step": step, "fd": fd})
        self.final_quality, self.fd_reached, self.stop_step = quality, fd, step
        if target_status(fd, self.value, self.tolerance) == "above":
            self.prev = {"step": step, "fd": fd, "quality": quality,
                         "weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
            return
        prev = self.prev
        if prev is not None and abs(prev["fd"] - self.value) < abs(fd - self.value):
            # FD fell past the band between two evaluations: the one above it was closer
            restore("EMA generator", net.load_state_dict, prev["weights"])
            self.final_quality, self.fd_reached, self.stop_step = prev["quality"], prev["fd"], prev["step"]
        self.reached, self.prev = True, None
        self.status = "matched" if abs(self.fd_reached - self.value) <= self.tolerance else "missed"

    def finish(self, step: int) -> None:
        """The budget ran out (or the run ended) without reaching the target: label it."""
        if not self.reached:
            self.status, self.stop_step = "not reached", step

    def record(self) -> dict:
        """What model.json, eval.json and regress.json say about the target."""
        return {"status": self.status, "target_fd": self.value, "requested": self.cfg.target_fd,
                "teacher_fd": self.teacher_fd, "tolerance": self.tolerance,
                "tolerance_rule": str(self.cfg.target_tolerance), "every": self.cfg.target_every,
                "stop_step": self.stop_step, "fd_reached": self.fd_reached,
                "budget": self.cfg.steps, "curve": list(self.curve),
                "floor_fd": self.floor["fd"], "floor_fd_std": self.floor["fd_std"]}

    def state_dict(self) -> dict | None:
        if not self.on:
            return None
        return {"value": self.value, "teacher_fd": self.teacher_fd, "curve": list(self.curve),
                "reached": self.reached, "status": self.status, "stop_step": self.stop_step,
                "fd_reached": self.fd_reached, "prev": self.prev}


@torch.no_grad()
def _finish(out: Path, net, cfg: RegressConfig, dataset: str | None, device, val: dict, seconds: float,
            progress: bool, step: int | None = None, target: dict | None = None,
            quality: dict | None = None, evaluator=None) -> None:
    """Sample grid, optional sample quality, and the final figures (regress.json). ``quality`` is the
    target rule's evaluation of this very model (reused); ``evaluator`` its evaluator."""
    step = cfg.steps if step is None else step
    z = eval_latents(net, cfg.eval_samples, cfg.eval_seed)
    samples = one_step(net, cfg.sigma_init, z, device)
    save_grid(samples[:64], out / "samples.png")
    result = {**val, "steps": step, "budget": cfg.steps, "seconds": seconds, "sigma_init": cfg.sigma_init}
    if cfg.eval_samples > 0 and dataset is not None:
        from probe.quality.metrics import QualityEvaluator

        if evaluator is None:
            evaluator = QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed, progress=progress)
        if quality is None:
            quality = evaluator.evaluate(samples[:cfg.eval_samples])
        quality = {**quality, "floor": evaluator.floor(), "evaluator": evaluator.info,
                   "sampler": "one-step", "nfe": 1, "step": step}
        if target is not None:
            quality["target"] = target
        write_json(out / "eval.json", quality)
        result["fd"] = quality["fd"]
    if target is not None:
        result["target"] = target
    write_json(out / DONE_FILE, result)


def is_finished(run_dir: Path, steps: int | None = None) -> bool:
    """Has a regression run completed (``steps`` at least, when given)? The one rule: ``run_status``."""
    return run_status(run_dir, steps) == "done"
