"""The feature transplant: a random generator whose *internal features* are trained to match the
teacher's at several noise levels, and nothing else (issue 16, docs/verdict.md).

The question the ablation asks is whether the teacher's multi-noise-level features, rather than its
noise-to-image mapping, make teacher initialisation work. The transplant moves the features alone:
a fresh copy of the teacher's architecture (exactly the ``random`` init at the same seed) is trained
so that the outputs of chosen modules (``layers``: the down blocks, mid block and up blocks by
default) match the teacher's on the same noisy images ``y + sigma n`` at each of ``sigmas``. The
loss never looks at the network's output: modules after the last matched one (``conv_norm_out``,
``conv_out`` with the default layers) get no gradient and keep their random weights, so the
transplanted generator's step-0 FD should stay as bad as random. A DiffRatio student then starts
from it (``init = "from:@transplanted"``) like from any other generator.

Losses (per layer and sigma, averaged over both):

- ``regression``: ``mean((f_s - f_t)^2) / var(f_t)`` on the full feature maps, 1.0 = predicting the
  teacher's batch mean; matches the teacher's features in the teacher's own basis.
- ``cka``: ``1 - linear CKA(f_s, f_t)`` over the batch (centred Gram matrices of the flattened
  maps); matches the features' similarity structure up to a rotation and scale.

Both figures, and linear CKA, are measured before and after on a fixed held-out set (``n_val``
test-split images with seeded noise) for every layer and sigma, and written to
``transplant.json`` together with which parameters the phase changed (``untouched``: top-level
modules it left exactly at their random initialisation) and, with ``eval_samples > 0``, the
generator's FD before and after (``eval.json``: after).

``transplant_features(TransplantConfig(...))`` is what ``probe train transplant`` calls and what a
grid's ``[prereq.NAME] kind = "transplant"`` runs. The run directory has the regressed generator's
layout and rules: ``config.json``, ``metrics.jsonl``, ``state.pt`` (exact resume), ``model.json`` +
``unet/`` (kind "generator"), ``transplant.json``, ``manifest.json`` with the finished marker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe.core.data import load_dataset
from probe.core.errors import UserError
from probe.core.locks import exclusive
from probe.core.models import load_model, save_model
from probe.core.nonfinite import DEFAULT_MAX_NONFINITE, check_finite, guarded_step, is_finite
from probe.core.progress import progress_bar
from probe.core.runs import (
    mark_finished,
    pick_device,
    restore_training,
    resume_point,
    run_status,
    save_state,
    start_run,
    test_point,
    write_json,
)
from probe.features.hooks import FeatureHooks, resolve_layers, select_output, trace_modules
from train.initspec import apply_init_spec, top_module

LOSSES = ("regression", "cka")
DONE_FILE = "transplant.json"
OUTPUT_MODULES = ("conv_out",)   # the UNet's output layer: matching it would transplant the mapping
TRAIN_SEED_OFFSET = 104_729      # batch and noise draws use seed + this, apart from the init's stream
VAL_SEED_OFFSET = 7_777          # the held-out set's noise
STATE_KEYS = ("net", "opt", "rng", "step", "seconds")


@dataclass
class TransplantConfig:
    out: str                                   # run directory
    teacher: str                               # teacher whose features are transplanted (run dir or diffusers dir)
    layers: tuple = ()                         # module paths / globs of the matched outputs; () = down, mid, up blocks
    sigmas: tuple = (0.5, 1.0, 2.5, 5.0)       # noise levels of the matched inputs y + sigma n, EDM sigma
    loss: str = "regression"                   # "regression" (normalised MSE) | "cka" (1 - linear CKA)
    steps: int = 300                           # optimiser steps
    batch: int = 32                            # images per step (each seen at every sigma)
    lr: float = 1e-3                           # Adam learning rate
    lr_warmup: int = 20                        # steps of linear learning-rate ramp-up
    betas: tuple = (0.9, 0.99)                 # Adam betas
    grad_clip: float = 0.0                     # max gradient norm, 0 = off
    n_val: int = 128                           # held-out test images for the before / after figures
    sigma_init: float = 2.5                    # the generator's G(z) = D(sigma_init z; sigma_init), recorded
    data: str | None = None                    # images the features are matched on (default: the teacher's)
    log_every: int = 25                        # steps between metrics.jsonl rows
    checkpoint_every: int = 100                # steps between checkpoints (and held-out figures)
    max_nonfinite: int = DEFAULT_MAX_NONFINITE  # non-finite steps in a row that stop the run (exit code 3)
    eval_samples: int = 500                    # FD of the generator before and after (one step), 0 = skip
    eval_seed: int = 0                         # seed of the evaluation latents and the evaluator's reference
    seed: int = 0                              # seed of the random init (the "random" arm's) and every draw
    device: str = "auto"                       # "auto" | "cpu" | "cuda"
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad values before anything is written (one-line UserError); runs on construction."""
        from probe.core import checks as c

        c.sigma_list(self.sigmas)
        c.one_of(self.loss, "loss", LOSSES)
        if isinstance(self.layers, str) or not all(isinstance(x, str) and x.strip() for x in self.layers):
            raise UserError(f"layers must be a list of module paths or globs, got {self.layers!r}")
        bad = [x for x in self.layers if x in OUTPUT_MODULES or x == ""]
        if bad:
            raise UserError(f"layers: {bad[0]!r} is the network's output; the transplant matches internal "
                            "features only (the output would transplant the mapping)")
        for name in ("steps", "batch", "n_val", "log_every", "checkpoint_every", "max_nonfinite"):
            c.positive_int(getattr(self, name), name)
        if self.batch < 2 or self.n_val < 2:
            raise UserError("batch and n_val must be >= 2 (feature variances and CKA need two images)")
        c.nonneg_int(self.lr_warmup, "lr_warmup")
        c.positive_float(self.lr, "lr")
        c.betas(self.betas)
        c.nonneg_float(self.grad_clip, "grad_clip")
        c.positive_float(self.sigma_init, "sigma_init")
        c.eval_samples(self.eval_samples)
        c.seed(self.eval_seed, "eval_seed")
        c.seed(self.seed)
        c.device(self.device)


# ------------------------------------------------------------------------------- features
class _Taps:
    """Forward hooks that keep each layer's output *with* its graph (``FeatureHooks`` detaches and pools:
    right for extraction, useless for a loss that trains the network)."""

    def __init__(self, unet, layers: list[str]):
        modules = dict(unet.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in layers]

    def _hook(self, name: str):
        def hook(module, args, output):
            t = select_output(output)
            if t is None:  # pick_layers admits only modules that return a tensor
                raise UserError(f"module {name!r} returns {type(output).__name__}, not a tensor")
            self.outputs[name] = t
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def student_features(net, layers: list[str], x: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """The network's flattened layer outputs for inputs x at sigma, differentiable (the output is discarded)."""
    taps = _Taps(net.unet, layers)
    try:
        net(x, sigma)
    finally:
        taps.remove()
    return {k: v.flatten(1).float() for k, v in taps.outputs.items()}


def pick_layers(teacher, patterns) -> list[str]:
    """Module paths (execution order) the transplant matches: the rules of ``probe extract`` (modules that
    run once and return a tensor), minus the network's output layer."""
    order, shapes, calls = trace_modules(teacher)
    usable = {p for p in order if shapes.get(p) is not None and calls.get(p) == 1}
    layers = resolve_layers(teacher.unet, list(patterns) or None, order, usable)
    out = [p for p in layers if p.split(".")[0] in OUTPUT_MODULES]
    if out:
        raise UserError(f"layers select {out[0]!r}, the network's output layer; the transplant matches internal "
                        "features only")
    return layers


def noisy(y: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    return y + sigma * noise


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two [B, D] feature sets over the batch (biased HSIC, centred Gram matrices)."""
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    ka, kb = a @ a.T, b @ b.T
    return (ka * kb).sum() / (ka.norm() * kb.norm()).clamp_min(1e-12)


def feature_losses(student: dict, teacher: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"regression": normalised MSE, "cka": linear CKA}} of [B, D] features."""
    out = {}
    for name, t in teacher.items():
        s = student[name]
        var = ((t - t.mean(0, keepdim=True)) ** 2).mean().clamp_min(1e-12)
        out[name] = {"regression": ((s - t) ** 2).mean() / var, "cka": linear_cka(s, t)}
    return out


def objective(losses: dict, loss: str) -> torch.Tensor:
    """The training loss of one sigma: mean over layers of the chosen per-layer loss."""
    terms = [v["regression"] if loss == "regression" else 1.0 - v["cka"] for v in losses.values()]
    return torch.stack(terms).mean()


@torch.no_grad()
def teacher_features(teacher, layers: list[str], x: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """The teacher's flattened layer outputs for inputs x at noise level sigma (``FeatureHooks``)."""
    with FeatureHooks(teacher.unet, layers, pooling="flatten") as hooks:
        teacher.denoiser(x, sigma)
        return hooks.take()


# ------------------------------------------------------------------------------- the run
def transplant_features(cfg: TransplantConfig, resume: bool = False, progress: bool = True,
                        stop_after: int | None = None) -> Path:
    """Run (or resume) the transplant phase; returns the run directory. ``stop_after`` simulates a kill."""
    cfg.validate()
    device = pick_device(cfg.device)
    teacher = load_model(cfg.teacher, device)
    teacher.denoiser.eval().requires_grad_(False)
    layers = pick_layers(teacher, cfg.layers)
    dataset = cfg.data or teacher.dataset
    if dataset is None:
        raise UserError(f"{cfg.teacher} does not record its data set; pass --data")
    train_images = load_dataset(dataset, "train").images
    val_images = load_dataset(dataset, "test").images
    if tuple(train_images.shape[1:]) != (teacher.channels, teacher.resolution, teacher.resolution):
        raise UserError(f"teacher {cfg.teacher} works on {teacher.channels}x{teacher.resolution}x{teacher.resolution} "
                        f"images but {dataset} has {'x'.join(map(str, train_images.shape[1:]))}")
    if len(val_images) < cfg.n_val:
        raise UserError(f"n_val={cfg.n_val} but {dataset}'s test split has {len(val_images)} images")
    with exclusive(cfg.out, "transplant run"):
        return _run(cfg, device, teacher, layers, dataset, train_images, val_images[:cfg.n_val], resume, progress,
                    stop_after)


def _run(cfg: TransplantConfig, device, teacher, layers: list[str], dataset: str, images: torch.Tensor,
         val_images: torch.Tensor, resume: bool, progress: bool, stop_after: int | None) -> Path:
    out, state = start_run(Path(cfg.out), cfg, resume, STATE_KEYS)
    net, init_report = apply_init_spec("random", teacher, cfg.seed)   # the "random" arm's init at this seed
    net.to(device)
    initial = {k: v.detach().clone() for k, v in net.unet.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    params = list(net.parameters())
    rng = torch.Generator().manual_seed(cfg.seed + TRAIN_SEED_OFFSET)
    if state is not None:
        restore_training(state, net, None, opt, rng)
    at = resume_point(out, state, resume, cfg.steps, cfg.max_nonfinite)
    step, seconds, guard, log = at.step, at.seconds, at.guard, at.log
    assert log is not None  # a single-process loop: always rank 0
    record = {"transplanted_from": str(cfg.teacher), "teacher_sha256": teacher.sha256(), "layers": layers,
              "sigmas": list(cfg.sigmas), "loss": cfg.loss, "init": init_report["canonical"]}

    # the held-out set: fixed images and noise, the teacher's features computed once
    val_noise = torch.randn(val_images.shape, generator=torch.Generator().manual_seed(cfg.seed + VAL_SEED_OFFSET))
    val_inputs = {s: noisy(val_images, s, val_noise).to(device) for s in cfg.sigmas}
    val_targets = {s: teacher_features(teacher, layers, val_inputs[s], s) for s in cfg.sigmas}

    @torch.no_grad()
    def held_out() -> dict:
        """{sigma: {layer: {"regression", "cka"}}} of the current network on the held-out set."""
        was = net.training
        net.eval()
        try:
            return {s: {k: {m: float(v) for m, v in d.items()}
                        for k, d in feature_losses(student_features(net, layers, val_inputs[s], s),
                                                   val_targets[s]).items()}
                    for s in cfg.sigmas}
        finally:
            net.train(was)

    def summary(h: dict) -> dict:
        return {"val_regression": _mean([d["regression"] for by in h.values() for d in by.values()]),
                "val_cka": _mean([d["cka"] for by in h.values() for d in by.values()])}

    fd_before = state.get("fd_before") if state is not None else None
    evaluator = _evaluator(cfg, dataset, progress)
    before = state["before"] if state is not None else held_out()
    if state is None:
        log.log(step=0, seconds=0.0, **summary(before))
        if evaluator is not None:
            fd_before = _fd(evaluator, net, cfg, device)
            log.log(step=0, seconds=0.0, eval_fd=fd_before)

    def checkpoint() -> None:
        check_finite({"network": net}, str(out))  # never overwrite a good checkpoint
        guard.saved(step)
        save_model(out, net, "generator", dataset, sigma_init=cfg.sigma_init, extra={**record, "steps": step})
        save_state(out, {"net": net.state_dict(), "opt": opt.state_dict(), "rng": rng.get_state(), "step": step,
                         "seconds": seconds, "guard": guard.state_dict(), "metrics_rows": log.rows,
                         "running": running, "before": before, "fd_before": fd_before})

    running = state.get("running", 0.0) if state is not None else 0.0
    with progress_bar(cfg.steps, "feature transplant", progress, completed=step) as advance:
        while step < cfg.steps:
            t0 = time.perf_counter()
            idx = torch.randint(len(images), (cfg.batch,), generator=rng)
            y = images[idx]
            noise = torch.randn(y.shape, generator=rng)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in cfg.sigmas:   # one backward per sigma: only one sigma's graph is held at a time
                x = noisy(y, s, noise).to(device)
                target = teacher_features(teacher, layers, x, s)
                feats = student_features(net, layers, x, s)
                loss = objective(feature_losses(feats, target), cfg.loss) / len(cfg.sigmas)
                loss.backward()
                total += float(loss.detach())
            _, ok = guarded_step(opt, params, cfg.grad_clip, is_finite(total))
            guard.update(ok, step + 1, str(out), log)
            step += 1
            seconds += time.perf_counter() - t0
            running += total
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                log.log(step=step, seconds=seconds, loss=running / n, lr=opt.param_groups[0]["lr"],
                        **guard.metrics())
                running = 0.0
            test_point(f"step:{step}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                log.log(step=step, seconds=seconds, **summary(held_out()))
                checkpoint()
            advance(info=f"loss {total:.4f}")
            if stop_after is not None and step >= stop_after:
                return out
    _finish(out, cfg, net, initial, before, held_out(), fd_before, evaluator, layers, seconds, device)
    mark_finished(out, cfg.steps)
    return out


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _loss(rows: list[dict], loss: str, when: str) -> float:
    """The training objective on the held-out set: mean normalised MSE, or mean (1 - CKA)."""
    values = [r[f"{loss}_{when}"] for r in rows]
    return _mean(values) if loss == "regression" else 1.0 - _mean(values)


def _evaluator(cfg: TransplantConfig, dataset: str, progress: bool):
    if cfg.eval_samples <= 0:
        return None
    from probe.quality.metrics import QualityEvaluator

    return QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed, progress=progress)


def _samples(net, cfg: TransplantConfig, device) -> torch.Tensor:
    from train.regress import eval_latents, one_step

    return one_step(net, cfg.sigma_init, eval_latents(net, cfg.eval_samples, cfg.eval_seed), device)


def _fd(evaluator, net, cfg: TransplantConfig, device) -> float:
    return float(evaluator.evaluate(_samples(net, cfg, device)[:cfg.eval_samples])["fd"])


def untouched_modules(initial: dict, final: dict) -> tuple[list[str], float]:
    """Top-level modules whose every tensor is still exactly its initial value, and the fraction of
    parameters the phase changed."""
    changed: dict[str, bool] = {}
    total, moved = 0, 0
    for name, t in initial.items():
        same = torch.equal(t.cpu(), final[name].detach().cpu())
        top = top_module(name)
        changed[top] = changed.get(top, False) or not same
        total += t.numel()
        moved += 0 if same else t.numel()
    return sorted(k for k, v in changed.items() if not v), moved / max(total, 1)


@torch.no_grad()
def _finish(out: Path, cfg: TransplantConfig, net, initial: dict, before: dict, after: dict, fd_before,
            evaluator, layers: list[str], seconds: float, device) -> None:
    """transplant.json (per-layer figures before / after, what changed) and eval.json (FD after)."""
    from probe.core.images import save_grid

    samples = _samples(net, cfg, device)
    save_grid(samples[:64], out / "samples.png")
    untouched, changed = untouched_modules(initial, net.unet.state_dict())
    rows = [{"layer": layer, "sigma": s,
             "regression_before": before[s][layer]["regression"], "regression_after": after[s][layer]["regression"],
             "cka_before": before[s][layer]["cka"], "cka_after": after[s][layer]["cka"]}
            for s in cfg.sigmas for layer in layers]
    per_layer = {layer: {k: _mean([r[k] for r in rows if r["layer"] == layer])
                         for k in ("regression_before", "regression_after", "cka_before", "cka_after")}
                 for layer in layers}
    result = {"layers": layers, "sigmas": list(cfg.sigmas), "loss": cfg.loss, "steps": cfg.steps,
              "seconds": seconds, "per_layer": per_layer, "per_layer_sigma": rows,
              "loss_before": _loss(rows, cfg.loss, "before"), "loss_after": _loss(rows, cfg.loss, "after"),
              "untouched": untouched, "changed_fraction": changed, "sigma_init": cfg.sigma_init,
              "fd_before": fd_before}
    if evaluator is not None:
        quality = {**evaluator.evaluate(samples[:cfg.eval_samples]), "floor": evaluator.floor(),
                   "evaluator": evaluator.info, "sampler": "one-step", "nfe": 1, "fd_before": fd_before}
        write_json(out / "eval.json", quality)
        result["fd"] = quality["fd"]
    write_json(out / DONE_FILE, result)


def is_finished(run_dir: Path, steps: int | None = None) -> bool:
    """Has a transplant run completed (``steps`` at least, when given)? The one rule: ``run_status``."""
    return run_status(run_dir, steps) == "done"
