"""Train a one-step generator G(z) = D_theta(sigma_init z; sigma_init): one loop for every method.

``train_student(StudentConfig(...))`` is what ``probe train student`` calls. The generator is a
copy of the teacher's denoiser (``EDMDenoiser`` or ``DDPMDenoiser``) with an init spec applied
(``train/init.py``); the method (``train/student/methods/``) brings its auxiliary network and its two
losses. Per step (``train/student/step.py``, the same code for one process and for torchrun):

1. draw z (and the fresh z and real-batch indices of the aux steps);
2. ``aux_steps`` auxiliary updates on no-grad generator samples, the last one on G(z);
3. one generator update on ``method.generator_loss(G(z))`` with the auxiliary network frozen;
4. EMA of the generator by half-life in images, with EDM's ramp-up (``ema_rampup``).

NaN policy (``probe/core/nonfinite.py``): an update whose loss or gradient is not finite is
skipped, counted in ``metrics.jsonl`` (``skipped_g``, ``skipped_aux``, ``skipped_steps``,
``nonfinite_in_a_row``), and ``max_nonfinite`` bad steps in a row stop the run (exit code 3);
checkpoints only ever hold finite weights. Every random draw comes from one CPU
``torch.Generator`` saved in ``state.pt`` with weights, optimisers, EMA, counters and log
accumulators, so a killed run resumed with ``resume=True`` ends bit-identical to an uninterrupted
one. bf16 autocast is used on CUDA only. One process writes a run directory at a time
(``probe/core/locks.py``); ``manifest.json`` records every checkpoint file's sha256, and the
finished marker is written last.

Signals (docs/verdict.md): classifier methods log, per logging interval, their accuracy in 4
log-spaced sigma buckets over [sigma_min, sigma_max] (``acc_b{k}`` balanced, ``acc_real_b{k}``,
``acc_fake_b{k}``, ``n_b{k}`` rows per class; edges in model.json's ``method.accuracy_sigma_buckets``)
from the logits the classifier loss computes anyway. ``null_signal = "shuffle"`` permutes the
classifier's real/fake labels every step: a control whose classifier cannot see the data.
``plateau_tol > 0`` stops the run early by ``PLATEAU_RULE``; the stop is recorded in ``state.pt``,
``metrics.jsonl`` (a ``stopped_early`` row), ``eval.json`` and the manifest's finished marker, and
the run counts as finished for its whole budget (a resume trains no further).

Run directory: ``config.json``, ``metrics.jsonl``, ``state.pt``, the EMA generator as
``model.json`` + ``unet/`` (``load_model(run).generator`` works), the auxiliary network in
``ratio/`` (ratio/gan methods, ``train.ratio_net.load_ratio_net``) or ``fake/`` (vsd/sid, a
toolkit model directory), sample grids from a fixed z in ``samples/`` and ``samples.png``, and
``eval.json`` (final sample quality) when ``eval_every > 0``.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.core.data import load_dataset
from probe.core.distributed import (
    autocast_for,
    barrier,
    cuda_speedups,
    distributed_session,
    is_main,
    on_main,
    split_batch,
    world_size,
    wrap_ddp,
)
from probe.core.edm import SIGMA_MAX, SIGMA_MIN, OneStepGenerator
from probe.core.ema import EMA, rampup_halflife
from probe.core.errors import UserError
from probe.core.images import save_grid
from probe.core.locks import exclusive
from probe.core.models import load_model, save_model
from probe.core.nonfinite import DEFAULT_MAX_NONFINITE, check_finite
from probe.core.progress import progress_bar
from probe.core.runs import (
    load_state,
    mark_finished,
    restore,
    resume_point,
    save_state,
    start_run,
    test_point,
    write_json,
)
from train.init import initialise_generator
from train.student.drift import capture_reference, drift_metrics
from train.student.losses import SIGMA_DISTS, TALLY, WEIGHTINGS, bucket_accuracies
from train.student.methods import DEFAULT_METHOD, get_method
from train.student.methods.diffratio import ClassifierMethod
from train.student.ratio_net import RATIO_NETS
from train.student.step import StepParts, student_step

NULL_SIGNALS = ("off", "shuffle")


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
    ema_halflife_images: float = 20_000        # EMA half-life of the generator, in generated images
    ema_rampup: float = 0.1                    # EDM's ramp-up: half-life <= this x images so far (0 = off); the
                                               # pair was chosen by benchmarks/bench_ema.py (docs/method.md)
    grad_clip: float = 0.0                     # max gradient norm for both optimisers, 0 = off
    log_every: int = 25                        # steps between metrics.jsonl rows (means over the interval)
    eval_every: int = 100                      # steps between sample-quality evaluations, 0 = off
    eval_samples: int = 500                    # samples per evaluation (train.metrics.QualityEvaluator)
    eval_seed: int = 0                         # seed of the fixed eval z and of the evaluator's reference
    drift_layers: str = "default"              # modules whose CKA to the teacher each evaluation logs (train/student/
                                               # drift.py): paths/globs, comma-separated; "default" = down, mid and
                                               # up blocks; "" = off
    drift_sigmas: tuple = (0.0, 0.5, 2.5)      # noise levels of the drift inputs, EDM sigma (0 = clean)
    drift_samples: int = 256                   # test images of the drift inputs (at most)
    checkpoint_every: int = 500                # steps between checkpoints (and sample grids)
    max_nonfinite: int = DEFAULT_MAX_NONFINITE  # non-finite steps in a row that stop the run (exit code 3)
    null_signal: str = "off"                   # "off" | "shuffle": classifier labels permuted each step (a control)
    plateau_tol: float = 0.0                   # early stop: FD band (FD units) that counts as a plateau; 0 = off
    plateau_window: float = 0.25               # early stop: fraction of the evaluations so far (>= 4) within the band
    plateau_min_steps: int = 0                 # early stop: never before this step
    seed: int = 0                              # seed of every random draw in training
    device: str = "auto"                       # "auto" | "cpu" | "cuda"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad options before anything is written (one-line UserErrors); runs on construction."""
        from probe.core import checks as c

        get_method(self.method)
        c.one_of(self.ratio_net, "ratio network", RATIO_NETS)
        c.one_of(self.sigma_dist, "sigma distribution", SIGMA_DISTS)
        c.positive_int(self.max_nonfinite, "max_nonfinite")
        c.one_of(self.weighting, "weighting", WEIGHTINGS)
        c.positive_float(self.sigma_init, "sigma_init")
        c.nonneg_int(self.steps, "steps")  # 0 = write the initialised generator as it is
        for name in ("batch", "accum", "aux_steps", "cnn_width", "log_every", "checkpoint_every"):
            c.positive_int(getattr(self, name), name)
        for name in ("lr_g", "lr_aux", "p_std", "fkl_clip", "ema_halflife_images"):
            c.positive_float(getattr(self, name), name)
        c.betas(self.betas)
        c.finite(self.p_mean, "p_mean")
        c.finite(self.sid_alpha, "sid_alpha")
        lo, hi = c.positive_float(self.sigma_min, "sigma_min"), c.positive_float(self.sigma_max, "sigma_max")
        if not lo < hi:
            raise UserError(f"need sigma_min < sigma_max, got {lo:g} and {hi:g}")
        for name in ("ema_rampup", "grad_clip"):
            c.nonneg_float(getattr(self, name), name)
        c.nonneg_int(self.eval_every, "eval_every")
        if c.eval_samples(self.eval_samples) == 0 and self.eval_every > 0:
            raise UserError("eval_samples is 0 but eval_every asks for evaluations; set eval_every = 0 to skip them")
        c.seed(self.eval_seed, "eval_seed")
        if not isinstance(self.drift_layers, str):
            raise UserError(f"drift_layers must be a comma-separated string of module names, got {self.drift_layers!r}")
        c.sigma_list(self.drift_sigmas, "drift_sigmas")
        c.positive_int(self.drift_samples, "drift_samples")
        c.seed(self.seed)
        c.device(self.device)
        c.one_of(self.null_signal, "null signal", NULL_SIGNALS)
        if self.null_signal != "off" and not issubclass(get_method(self.method), ClassifierMethod):
            raise UserError(f"null_signal {self.null_signal!r} shuffles a ratio classifier's labels; method "
                            f"{self.method} has none (use diffratio-js, diffratio-kl, diffratio-fkl or gan)")
        c.nonneg_float(self.plateau_tol, "plateau_tol")
        c.number(self.plateau_window, "plateau_window", above=0.0)
        if self.plateau_window > 1:
            raise UserError(f"plateau_window is a fraction of the evaluations: need 0 < plateau_window <= 1, "
                            f"got {self.plateau_window:g}")
        c.nonneg_int(self.plateau_min_steps, "plateau_min_steps")
        if self.plateau_tol > 0 and self.eval_every <= 0:
            raise UserError("plateau_tol stops at a plateau of the evaluated FD; it needs eval_every > 0")


def validate(cfg: StudentConfig) -> None:
    """Refuse bad options before anything is written (kept for callers: ``cfg.validate()``)."""
    cfg.validate()


# ------------------------------------------------------------------------------- pieces
class Accumulator:
    """Means of logged scalars over a logging interval (part of the checkpoint for exact resume).

    ``tally_*`` values are counts: they are summed, and ``pop`` turns the interval's totals into the
    per-sigma-bucket accuracies of ``losses.bucket_accuracies`` (total right / total rows, so a bucket
    empty in some steps is weighted by its rows, not averaged as a mean of means)."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict(state["sums"]) if state else {}
        self.count: int = state["count"] if state else 0

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def pop(self) -> dict:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items() if not k.startswith(TALLY)}
        out.update(bucket_accuracies({k[len(TALLY):]: v for k, v in self.sums.items() if k.startswith(TALLY)}))
        self.sums, self.count = {}, 0
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}


PLATEAU_MIN_EVALS = 4
PLATEAU_RULE = ("stop at an evaluation when the last k = max(4, ceil(plateau_window x n)) of the n FD evaluations "
                "so far (step 0 included) all lie within plateau_tol of their mean, and step >= plateau_min_steps")


def plateau_reached(evals: list,               # [(step, FD)] of every evaluation so far, in order
                    tol: float,                # plateau_tol, FD units (<= 0: never)
                    window: float = 0.25,      # plateau_window, a fraction of the evaluations so far
                    min_steps: int = 0,        # plateau_min_steps: no stop before this step
                    ) -> dict | None:
    """The early-stop rule (``PLATEAU_RULE``) on the evaluations so far: None to go on, or the record of
    the stop (step, rule, options, evaluations used, their mean FD and largest deviation from it).

    The window grows with the run (a quarter of the curve by default), so a slow steady descent is
    not mistaken for a plateau late in a long run, and at least 4 evaluations must agree."""
    n = len(evals)
    if tol <= 0 or n == 0:
        return None
    k = max(PLATEAU_MIN_EVALS, math.ceil(round(window * n, 9)))
    step = int(evals[-1][0])
    if n < k or step < min_steps:
        return None
    tail = [float(fd) for _, fd in evals[-k:]]
    if not all(math.isfinite(v) for v in tail):
        return None
    mean = sum(tail) / k
    deviation = max(abs(v - mean) for v in tail)
    if deviation > tol:
        return None
    return {"step": step, "rule": PLATEAU_RULE, "plateau_tol": tol, "plateau_window": window,
            "plateau_min_steps": min_steps, "evaluations": k, "from_step": int(evals[-k][0]),
            "fd_mean": mean, "fd_max_deviation": deviation}


def ema_halflife(cfg: StudentConfig, step: int) -> float:
    """EMA half-life (images) at ``step``: EDM's ramp-up keeps the average from lagging early on."""
    return rampup_halflife(cfg.ema_halflife_images, cfg.ema_rampup, step * cfg.batch)


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
                  on_step: Callable[[int, torch.nn.Module], None] | None = None,  # rank 0: (0, generator) before
                                                    # a new run, (step, raw generator) after each EMA update;
                                                    # not resumed
                  ) -> Path:
    """Train (or resume) a one-step generator; returns the run directory. ``stop_after`` simulates a kill.

    Under torchrun every process calls this with the same config (probe/core/distributed.py)."""
    validate(cfg)
    with distributed_session(cfg.device) as device:
        return _train_student(cfg, device, resume, progress and is_main(), stop_after, on_step)


STATE_KEYS = ("generator", "aux", "ema", "opt_g", "opt_aux", "rng", "step", "seconds", "counts", "acc")


def _train_student(cfg: StudentConfig, device, resume: bool, progress: bool, stop_after: int | None,
                   on_step=None) -> Path:
    micros = split_batch(cfg.batch, world_size(), accum=cfg.accum)
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
    drift = (capture_reference(teacher, dataset, cfg.drift_layers, cfg.drift_sigmas, cfg.drift_samples, device)
             if cfg.eval_every > 0 and is_main() else None)  # the teacher's features, kept past its release
    del teacher  # the loop's last reference: a method with uses_teacher False kept none (methods/base.py)
    if not method.uses_teacher:
        gc.collect()  # free the teacher's weights before training (module graphs can hold cycles)
    evaluator = None
    if cfg.eval_every > 0 and is_main():
        from probe.quality.metrics import QualityEvaluator

        evaluator = QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed, progress=progress)
    with ExitStack() as stack:
        if is_main():  # one writer per run directory; other ranks only read it
            stack.enter_context(exclusive(cfg.out, "student run"))
        return _train_locked(cfg, device, resume, progress, stop_after, micros, record, dataset, images,
                             gen_net, generator, method, evaluator, drift, on_step)


def _train_locked(cfg: StudentConfig, device, resume: bool, progress: bool, stop_after: int | None, micros,
                  record, dataset, images, gen_net, generator, method, evaluator, drift=None, on_step=None) -> Path:
    kept = {}

    def start():  # rank 0: check everything a resume needs, then open the run directory
        out, state = start_run(Path(cfg.out), cfg, resume, STATE_KEYS)
        kept["state"] = state
        return out

    out = on_main(start)  # only now: bad options above leave nothing behind
    state = kept.get("state") if is_main() else (load_state(out, STATE_KEYS) if resume else None)
    ema = EMA(gen_net, cfg.ema_halflife_images)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))  # Adam refuses a mix of int and float; validate: 2 values
    # fused: one kernel over all tensors instead of a Python loop of ~10 ops per tensor (3-4x faster steps on CPU)
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=cfg.lr_g, betas=betas, fused=True)
    opt_a = torch.optim.Adam(method.aux.parameters(), lr=cfg.lr_aux, betas=betas, fused=True)
    rng = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, gen_net.unet.config.in_channels, *([gen_net.unet.config.sample_size] * 2))
    parts = StepParts(cfg, method, generator, wrap_ddp(generator, device), wrap_ddp(method.aux, device), images,
                      shape, device, autocast_for(device), opt_g, opt_a, micros)
    counts, acc = {"skipped_g": 0, "skipped_aux": 0}, Accumulator()
    if state is not None:
        restore("generator", gen_net.load_state_dict, state["generator"])
        restore("auxiliary network", method.aux.load_state_dict, state["aux"])
        restore("EMA", ema.load_state_dict, state["ema"])
        restore("generator optimiser", opt_g.load_state_dict, state["opt_g"])
        restore("auxiliary optimiser", opt_a.load_state_dict, state["opt_aux"])
        restore("random state", rng.set_state, state["rng"])
        counts, acc = dict(state["counts"]), Accumulator(state["acc"])
    at = resume_point(out, state, resume, cfg.steps, cfg.max_nonfinite, main=is_main())
    step, seconds, guard, log = at.step, at.seconds, at.guard, at.log
    # an early stop (plateau_reached) is final: a resumed run that stopped trains no further
    stopped: dict | None = state.get("stopped") if state is not None else None
    if resume and is_main() and stopped is not None:
        print(f"the run stopped at a plateau at step {stopped['step']}: not training further", file=sys.stderr)
    evals: list = []  # [(step, FD)] of the evaluations so far (rank 0), for the early-stop rule
    if log is not None and state is not None:  # the log kept exactly the rows of the checkpoint
        evals = [(r["step"], r["eval_fd"]) for r in log.kept if "eval_fd" in r]
    # fixed latents for grids and evaluations, drawn like probe.quality.evaluate (same z as `probe eval`)
    z_eval = torch.randn((max(cfg.eval_samples, 64), *shape[1:]),
                         generator=torch.Generator().manual_seed(cfg.eval_seed))

    def checkpoint() -> None:
        barrier()
        if not is_main():
            return
        assert log is not None  # rank 0 opened it
        check_finite({"generator": gen_net, "auxiliary network": method.aux, "EMA generator": ema.net}, str(out))
        guard.saved(step)
        save_model(out, ema.net, "generator", dataset, sigma_init=cfg.sigma_init, extra={**record, "steps": step})
        method.save_aux(out, dataset)
        grid = one_step_samples(ema.net, cfg.sigma_init, z_eval[:64], device)
        save_grid(grid, out / "samples" / f"step-{step:06d}.png")
        save_state(out, {"generator": gen_net.state_dict(), "aux": method.aux.state_dict(), "ema": ema.state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_aux": opt_a.state_dict(), "rng": rng.get_state(),
                         "step": step, "seconds": seconds, "counts": dict(counts), "acc": acc.state_dict(),
                         "guard": guard.state_dict(), "metrics_rows": log.rows, "stopped": stopped})

    last_eval: dict = {}  # the latest evaluation: the final one reuses it when nothing has changed since

    def evaluate() -> dict:
        assert evaluator is not None and log is not None  # both exist on rank 0 only, where this runs
        result = evaluator.evaluate(one_step_samples(ema.net, cfg.sigma_init, z_eval[:cfg.eval_samples], device))
        cka = drift_metrics(drift, ema.net) if drift is not None else {}  # feature drift: cka/<layer>/<sigma>
        log.log(step=step, seconds=seconds, **{f"eval_{k}": v for k, v in result.items()}, **cka)
        last_eval.update(step=step, result=result)
        return result

    if evaluator is not None and state is None:
        evals.append((step, evaluate()["fd"]))  # the starting point, at step 0
    if on_step is not None and is_main() and state is None:
        on_step(0, gen_net)  # the starting weights, which the run's own EMA starts from
    with progress_bar(cfg.steps, f"{cfg.method} {dataset or ''}", progress, completed=step) as advance:
        while step < cfg.steps and stopped is None:
            t0 = time.perf_counter()
            stats, ok = student_step(parts, rng, counts)
            guard.update(ok, step + 1, str(out), log)
            ema.halflife_images = ema_halflife(cfg, step + 1)
            ema.update(gen_net, cfg.batch)
            step += 1
            seconds += time.perf_counter() - t0
            if on_step is not None and is_main():
                on_step(step, gen_net)  # after the clock stops: an observer's cost is not training time
            acc.add(**stats)
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                log.log(step=step, seconds=seconds, **acc.pop(), **counts, **guard.metrics())
            test_point(f"step:{step}")
            if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                evals.append((step, evaluate()["fd"]))
            if cfg.plateau_tol > 0 and step % cfg.eval_every == 0 and step < cfg.steps:  # every rank decides alike
                stopped = on_main(plateau_reached, evals, cfg.plateau_tol, cfg.plateau_window, cfg.plateau_min_steps)
                if stopped is not None and log is not None:
                    if acc.count:  # the interval's last, short row
                        log.log(step=step, seconds=seconds, **acc.pop(), **counts, **guard.metrics())
                    log.log(step=step, seconds=seconds, stopped_early=1, stopped_fd_mean=stopped["fd_mean"],
                            stopped_fd_max_deviation=stopped["fd_max_deviation"])
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped is not None:
                checkpoint()
            advance(info=f"loss_g {stats['loss_g']:.4f}  loss_aux {stats['loss_aux']:.4f}")
            if stop_after is not None and step >= stop_after:
                return out
    if state is None and cfg.steps == 0:
        checkpoint()
    if not is_main():
        barrier()  # returns only after rank 0 has written the final files: a caller may load the run next
        return out
    save_grid(one_step_samples(ema.net, cfg.sigma_init, z_eval[:64], device), out / "samples.png")
    if evaluator is not None:
        samples = one_step_samples(ema.net, cfg.sigma_init, z_eval[:cfg.eval_samples], device)
        # the loop's own evaluation at this step scored the same weights on the same latents: reuse it
        final = last_eval["result"] if last_eval.get("step") == step else evaluator.evaluate(samples)
        write_json(out / "eval.json", {**final, "memorisation": evaluator.memorisation(samples),
                                       "floor": evaluator.floor(), "evaluator": evaluator.info,
                                       "sampler": "one-step", "nfe": 1, "step": step, "seconds": seconds,
                                       "stopped_early": stopped})
    # a run stopped at a plateau is finished for its whole budget (run_status); the marker says where it stopped
    mark_finished(out, cfg.steps if stopped is not None else step, stopped_early=stopped)
    barrier()  # release the other ranks (above) now that the run is complete on disk
    return out
