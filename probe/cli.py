"""The ``probe`` command line: thin typer commands over plain functions that take a config.

Every command turns its options into one dataclass config (saved with its results) and calls a
library function. Option defaults are read from those configs (or, for the analyses, from the
library functions' keyword defaults), so a default is written once; tests/test_cli_contract.py
fails when one drifts. They are read from the source files rather than by importing the modules,
which would load torch, diffusers and matplotlib for every ``--help`` and usage error (0.8 s
instead of 10 s on a busy 2-core machine). Numbers are checked by the configs' ``validate()``
(probe/core/checks.py) before anything is created. Errors the user can cause raise
``UserError``; ``main`` prints them, and typer's usage errors (``--steps abc``), as one line on
stderr and exits with code 2.
"""

from __future__ import annotations

import ast
import errno
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import typer

from probe.core import checks
from probe.core.errors import UserError

# Only these light modules are imported at the top: every command imports the heavy layers it uses (torch,
# diffusers, matplotlib, train, analysis) inside its body, so `probe --help` and usage errors stay fast.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train one-step diffusion generators and look inside them.")
train_app = typer.Typer(no_args_is_help=True, help="Train a teacher, a one-step student, or an ablation grid.")
app.add_typer(train_app, name="train")


# Where each command's defaults live ("module:Class" of a config dataclass, or "module:function").
T, S, R = "train.teacher:TeacherConfig", "train.student.loop:StudentConfig", "train.regress:RegressConfig"
TR = "train.transplant:TransplantConfig"
E, EV = "probe.features.extract:ExtractConfig", "probe.quality.evaluate:EvalConfig"
A = "train.ablation.grid:AblationConfig"
REP, DEMO = "analysis.report:ReportConfig", "probe.demo:DemoConfig"
L = "train.ablation.launch:LaunchConfig"
CKA, LIN, UMAP = "analysis.cka:cka_table", "analysis.linear:probe_table", "analysis.umap_view:umap_panels"


def _d(source: str, name: str):
    """The default of field ``name`` of a config dataclass, or of keyword ``name`` of a function,
    ``source`` = "module:Name": the one place each CLI default is written."""
    module, owner = source.split(":")
    try:
        return _literal(module, _default_node(module, owner, name))
    except LookupError:  # not a plain literal or constant (a default_factory ...): import and ask
        import dataclasses
        import inspect

        obj = getattr(importlib.import_module(module), owner)
        if dataclasses.is_dataclass(obj):
            f = {f.name: f for f in dataclasses.fields(obj)}[name]
            if f.default is not dataclasses.MISSING:
                return f.default
            if not callable(f.default_factory):
                raise LookupError(f"{source}.{name} has no default") from None
            return f.default_factory()
        return inspect.signature(obj).parameters[name].default


@functools.cache
def _tree(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)  # imports the (light) parent packages only
    assert spec is not None and spec.origin is not None, f"{module}: not found (a CLI default source is mistyped)"
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def _default_node(module: str, owner: str, name: str) -> ast.expr:
    for node in _tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == owner:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name \
                        and stmt.value is not None:
                    return stmt.value
        if isinstance(node, ast.FunctionDef) and node.name == owner:
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == name:
                    return default
    raise LookupError(f"{module}:{owner}.{name}")


def _literal(module: str, node: ast.expr):
    """A literal, or a module-level constant (followed through ``from X import NAME``)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if not isinstance(node, ast.Name):
        raise LookupError(ast.dump(node))
    for stmt in _tree(module).body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
            return _literal(module, stmt.value)
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == node.id \
                and stmt.value is not None:
            return _literal(module, stmt.value)
        if isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module is not None:
            for alias in stmt.names:
                if (alias.asname or alias.name) == node.id:
                    return _literal(stmt.module, ast.Name(id=alias.name))
    raise LookupError(node.id)


def _floats(text: str, option: str = "the list") -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} expects a comma-separated list of numbers, got {text!r}") from None


def _sigmas(text: str | None, option: str = "--sigmas") -> list | None:
    """None (all / the default) when not given; else a non-empty list of finite sigmas >= 0."""
    if text is None:
        return None
    return list(checks.sigma_list(_floats(text, option), option))


def _ints(text: str | None, option: str) -> tuple | None:
    """Distinct non-negative integers (seeds), or None when not given."""
    if text is None:
        return None
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} expects comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise UserError(f"{option} expects distinct integers such as 0,1,2, got {text!r}")
    return tuple(checks.seed(v, option) for v in values)


def _band(text: str | None) -> tuple | None:
    """'LO,HI' as two numbers (their rules are TeacherConfig's), or None."""
    if text is None:
        return None
    vals = _floats(text, "--sigma-range")
    if len(vals) != 2:
        raise UserError(f"--sigma-range takes 'LO,HI' with 0 < LO <= HI, got {text!r}")
    return tuple(vals)


def _out_dir(path: Path, option: str = "--out") -> Path:
    """A run / working directory that can be created (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a directory")
    return checks.writable_output(path, option)


def _out_file(path: Path | None, option: str = "--out") -> Path | None:
    """An output file that can be written (checked before any work); None passes."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    return checks.writable_output(path, option)


# ------------------------------------------------------------------------------- training
@train_app.command("teacher")
def train_teacher_cmd(
    out: Path = typer.Option(..., help="Run directory to write."),
    data: str = typer.Option(_d(T, "data"), help="digits | shapes | scenes | mnist | cifar10 | folder:PATH"),
    preset: str = typer.Option(_d(T, "preset"), help="UNet preset: tiny | small | cifar | test"),
    steps: int | None = typer.Option(_d(T, "steps"), help="Optimiser steps (default: 2400 on scenes, else 1600)."),
    batch: int = typer.Option(_d(T, "batch"), help="Images per step (global: across every process)."),
    accum: int = typer.Option(_d(T, "accum"), help="Gradient-accumulation rounds per step and process."),
    lr: float = typer.Option(_d(T, "lr"), help="Adam learning rate."),
    lr_cooldown: float = typer.Option(_d(T, "lr_cooldown"), help="Last fraction of the steps: lr falls linearly to 0."),
    ema_halflife: float = typer.Option(_d(T, "ema_halflife_images"), help="EMA half-life in training images."),
    ema_rampup: float = typer.Option(_d(T, "ema_rampup"), help="EMA half-life <= this x images seen (0 = off)."),
    sigma_range: str | None = typer.Option(_d(T, "sigma_range"),
                                              help="'LO,HI': train only on sigmas in this band."),
    checkpoint_every: int = typer.Option(_d(T, "checkpoint_every"), help="Steps between checkpoints."),
    sample_steps: int = typer.Option(_d(T, "sample_steps"), help="Heun steps for samples and evaluation."),
    eval_samples: int = typer.Option(_d(T, "eval_samples"), help="Samples for the final quality figure (0 = skip)."),
    seed: int = typer.Option(_d(T, "seed"), help="Seed of every random draw."),
    device: str = typer.Option(_d(T, "device"), help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
):
    """Train an EDM teacher on a diffusers UNet2DModel."""
    from train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=str(out), data=data, preset=preset, steps=steps, batch=batch, accum=accum, lr=lr,
                        lr_cooldown=lr_cooldown,
                        ema_halflife_images=ema_halflife, ema_rampup=ema_rampup, sigma_range=_band(sigma_range),
                        checkpoint_every=checkpoint_every, sample_steps=sample_steps,
                        eval_samples=eval_samples, seed=seed, device=device)
    _out_dir(out)
    run = train_teacher(cfg, resume=resume)
    if _is_main():
        _print_eval(run)
        typer.echo(f"teacher written to {run}")


@train_app.command("student")
def train_student_cmd(
    teacher: Path = typer.Option(..., help="Teacher: run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    out: Path = typer.Option(..., help="Run directory to write."),
    method: str = typer.Option(_d(S, "method"), help="diffratio-js | diffratio-kl | diffratio-fkl | vsd | sid | gan"),
    init: str = typer.Option(_d(S, "init"), help="Init spec: teacher | random | keep:GLOBS | reinit:GLOBS "
                                                 "| shuffle[:GLOBS] | from:PATH, joined with '+' "
                                                 "(see train/initspec.py)."),
    data: str | None = typer.Option(_d(S, "data"), help="Real data (default: the teacher's data set)."),
    sigma_init: float = typer.Option(_d(S, "sigma_init"), help="G(z) = D(sigma_init z; sigma_init)."),
    steps: int = typer.Option(_d(S, "steps"), help="Generator steps (0 = write the initialised generator)."),
    batch: int = typer.Option(_d(S, "batch"), help="Generated (and real) images per step (global: across every "
                                                   "process)."),
    accum: int = typer.Option(_d(S, "accum"), help="Gradient-accumulation rounds per step and process."),
    lr_g: float = typer.Option(_d(S, "lr_g"), help="Generator learning rate."),
    lr_aux: float = typer.Option(_d(S, "lr_aux"), help="Ratio classifier / fake-score learning rate."),
    aux_steps: int = typer.Option(_d(S, "aux_steps"), help="Auxiliary updates per generator update."),
    ratio_net: str = typer.Option(_d(S, "ratio_net"), help="encoder (teacher's, default) | encoder-random | cnn"),
    sigma_dist: str = typer.Option(_d(S, "sigma_dist"), help="lognormal | karras"),
    weighting: str = typer.Option(_d(S, "weighting"), help="w(sigma): none | sigma2 | snr | edm"),
    sid_alpha: float = typer.Option(_d(S, "sid_alpha"), help="SiD's alpha."),
    fkl_clip: float = typer.Option(_d(S, "fkl_clip"), help="diffratio-fkl: upper clip of exp(-l)."),
    grad_clip: float = typer.Option(_d(S, "grad_clip"), help="Max gradient norm, 0 = off."),
    ema_halflife: float = typer.Option(_d(S, "ema_halflife_images"), help="Generator EMA half-life in images."),
    ema_rampup: float = typer.Option(_d(S, "ema_rampup"), help="EMA half-life <= this x images seen (0 = off)."),
    eval_every: int = typer.Option(_d(S, "eval_every"), help="Steps between sample-quality rows in metrics.jsonl, "
                                                             "0 = off (and no eval.json)."),
    eval_samples: int = typer.Option(_d(S, "eval_samples"), help="Samples per quality evaluation."),
    checkpoint_every: int = typer.Option(_d(S, "checkpoint_every"), help="Steps between checkpoints."),
    seed: int = typer.Option(_d(S, "seed"), help="Seed of every random draw."),
    null_signal: str = typer.Option(_d(S, "null_signal"), help="off | shuffle: permute the ratio classifier's "
                                                               "real/fake labels every step (a control)."),
    plateau_tol: float = typer.Option(_d(S, "plateau_tol"), help="Stop early when the last plateau-window "
                                                                 "evaluations lie within this many FD units of "
                                                                 "their mean; 0 = off."),
    plateau_window: float = typer.Option(_d(S, "plateau_window"), help="Fraction of the evaluations so far "
                                                                       "(at least 4) the plateau rule looks at."),
    plateau_min_steps: int = typer.Option(_d(S, "plateau_min_steps"), help="No early stop before this step."),
    device: str = typer.Option(_d(S, "device"), help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
):
    """Train a one-step generator G(z) = D(sigma_init z; sigma_init) with one of the methods."""
    from train.student.loop import StudentConfig, train_student

    cfg = StudentConfig(out=str(out), teacher=str(teacher), method=method, init=init, data=data, sigma_init=sigma_init,
                        steps=steps, batch=batch, accum=accum, lr_g=lr_g, lr_aux=lr_aux, aux_steps=aux_steps,
                        ratio_net=ratio_net, sigma_dist=sigma_dist, weighting=weighting, sid_alpha=sid_alpha,
                        fkl_clip=fkl_clip, grad_clip=grad_clip, ema_halflife_images=ema_halflife, ema_rampup=ema_rampup,
                        eval_every=eval_every, eval_samples=eval_samples,
                        checkpoint_every=checkpoint_every, seed=seed, device=device, null_signal=null_signal,
                        plateau_tol=plateau_tol, plateau_window=plateau_window, plateau_min_steps=plateau_min_steps)
    _out_dir(out)
    run = train_student(cfg, resume=resume)
    if _is_main():
        import json

        from train.initspec import format_init_report

        _print_eval(run)
        typer.echo(format_init_report(json.loads((Path(run) / "model.json").read_text())["init"]))
        ev = Path(run) / "eval.json"
        stop = json.loads(ev.read_text()).get("stopped_early") if ev.exists() else None
        if stop:
            typer.echo(f"stopped early at step {stop['step']} of {steps}: the last {stop['evaluations']} FDs lie "
                       f"within {stop['fd_max_deviation']:.3g} of their mean {stop['fd_mean']:.4g} "
                       f"(plateau_tol {stop['plateau_tol']:g})")
        typer.echo(f"generator written to {run}")


@train_app.command("regress")
def train_regress_cmd(
    teacher: Path = typer.Option(..., help="Teacher whose multi-step samples the generator regresses onto."),
    out: Path = typer.Option(..., help="Run directory to write."),
    sigma_init: float = typer.Option(_d(R, "sigma_init"), help="G(z) = D(sigma_init z; sigma_init)."),
    n_pairs: int = typer.Option(_d(R, "n_pairs"), help="(z, teacher sample) pairs."),
    sample_steps: int = typer.Option(_d(R, "sample_steps"), help="Heun steps of the teacher sampler."),
    steps: int = typer.Option(_d(R, "steps"), help="Optimiser steps."),
    batch: int = typer.Option(_d(R, "batch"), help="Pairs per step."),
    lr: float = typer.Option(_d(R, "lr"), help="Adam learning rate."),
    eval_samples: int = typer.Option(_d(R, "eval_samples"), help="Samples for the final quality figure (0 = skip)."),
    seed: int = typer.Option(_d(R, "seed"), help="Seed of the pairs, the initialisation and training."),
    device: str = typer.Option(_d(R, "device"), help="auto | cpu | cuda"),
    target_fd: str | None = typer.Option(None, help="Stop at the first evaluation with FD <= this: a number, or "
                                                    "'teacher' (the teacher's one-step FD at sigma_init, i.e. the "
                                                    "full-teacher arm's step-0 FD). Default: off."),
    target_every: int = typer.Option(_d(R, "target_every"), help="Steps between FD evaluations with --target-fd."),
    target_tolerance: str = typer.Option(_d(R, "target_tolerance"), help="Slack around the target: FD units, 'N%' "
                                                                         "of it, or 'floor' (2 x the floor's FD std)."),
    eval_seed: int = typer.Option(_d(R, "eval_seed"), help="Seed of the evaluation latents and reference (use the "
                                                           "students' eval_seed)."),
    resume: bool = typer.Option(False, help="Continue the run in --out."),
):
    """A generator regressed from random init onto the teacher's samples: the mapping without the features."""
    from train.regress import RegressConfig, parse_target_fd, parse_tolerance, regress_generator

    cfg = RegressConfig(out=str(out), teacher=str(teacher), sigma_init=sigma_init, n_pairs=n_pairs,
                        sample_steps=sample_steps, steps=steps, batch=batch, lr=lr, eval_samples=eval_samples,
                        seed=seed, device=device, target_every=target_every, eval_seed=eval_seed,
                        target_tolerance=parse_tolerance(target_tolerance),
                        target_fd=parse_target_fd(target_fd) if target_fd is not None else _d(R, "target_fd"))
    _out_dir(out)
    run = regress_generator(cfg, resume=resume)
    _print_eval(run)
    if cfg.targeting:
        import json

        t = json.loads((Path(run) / "regress.json").read_text())["target"]
        typer.echo(f"target FD {t['target_fd']:.4g} +- {t['tolerance']:.3g}: {t['status']} at step {t['stop_step']} "
                   f"of {t['budget']} (FD {t['fd_reached']:.4g})")
    typer.echo(f"regressed generator written to {run}; use it with --init from:{run}")


@train_app.command("transplant")
def train_transplant_cmd(
    teacher: Path = typer.Option(..., help="Teacher whose internal features are transplanted."),
    out: Path = typer.Option(..., help="Run directory to write."),
    layers: str | None = typer.Option(None, help="Comma-separated module paths / globs whose outputs are matched "
                                                 "(default: down blocks, mid block, up blocks; never conv_out)."),
    sigmas: str | None = typer.Option(None, help="Comma-separated EDM sigmas of the matched inputs y + sigma n "
                                                 "(default: 0.5,1,2.5,5)."),
    loss: str = typer.Option(_d(TR, "loss"), help="regression (normalised MSE) | cka (1 - linear CKA)."),
    steps: int = typer.Option(_d(TR, "steps"), help="Optimiser steps."),
    batch: int = typer.Option(_d(TR, "batch"), help="Images per step (each at every sigma)."),
    lr: float = typer.Option(_d(TR, "lr"), help="Adam learning rate."),
    n_val: int = typer.Option(_d(TR, "n_val"), help="Held-out test images for the before / after figures."),
    sigma_init: float = typer.Option(_d(TR, "sigma_init"), help="The generator's sigma_init, recorded."),
    data: str | None = typer.Option(_d(TR, "data"), help="Data set of the matched images (default: the teacher's)."),
    eval_samples: int = typer.Option(_d(TR, "eval_samples"), help="Samples for the FD before and after (0 = skip)."),
    eval_seed: int = typer.Option(_d(TR, "eval_seed"), help="Seed of the evaluation latents and reference."),
    seed: int = typer.Option(_d(TR, "seed"), help="Seed of the random init (the random arm's) and every draw."),
    device: str = typer.Option(_d(TR, "device"), help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out."),
):
    """Random init whose internal features are trained to match the teacher's at several sigmas (never the output)."""
    from train.transplant import TransplantConfig, transplant_features

    sig = _sigmas(sigmas)
    cfg = TransplantConfig(out=str(out), teacher=str(teacher), layers=tuple(_names(layers, "--layers") or ()),
                           loss=loss, steps=steps, batch=batch, lr=lr, n_val=n_val, sigma_init=sigma_init, data=data,
                           eval_samples=eval_samples, eval_seed=eval_seed, seed=seed, device=device,
                           sigmas=tuple(sig) if sig is not None else _d(TR, "sigmas"))
    _out_dir(out)
    run = transplant_features(cfg, resume=resume)
    import json

    r = json.loads((Path(run) / "transplant.json").read_text())
    typer.echo(f"feature loss ({r['loss']}, {len(r['layers'])} layers x {len(r['sigmas'])} sigmas, held out): "
               f"{r['loss_before']:.4g} -> {r['loss_after']:.4g}; untouched: {', '.join(r['untouched']) or 'none'}")
    if r.get("fd") is not None:
        typer.echo(f"one-step FD {r['fd_before']:.4g} -> {r['fd']:.4g}")
    typer.echo(f"transplanted generator written to {run}; use it with --init from:{run}")


@train_app.command("ablation")
def train_ablation_cmd(
    config: str | None = typer.Option(None, help="Grid TOML file, or a shipped grid: "
                                                 + " | ".join(_literal("train.ablation.grid", ast.Name(id="SHIPPED")))),
    out: Path | None = typer.Option(None, help="Ablation directory; rerunning skips finished jobs and resumes "
                                                  "partial ones."),
    teacher: Path | None = typer.Option(_d(A, "teacher"), help="Use this teacher instead of the grid's."),
    steps: int | None = typer.Option(_d(A, "steps"), help="Override the grid's generator steps."),
    seeds: str | None = typer.Option(_d(A, "seeds"), help="Override the grid's seeds (every arm's), e.g. 0,1,2"),
    scale: int | None = typer.Option(_d(A, "scale"), help="Full-size version: multiply every step count of the "
                                                          "grid (students and prerequisites) by this integer."),
    features: bool | None = typer.Option(_d(A, "features"), "--features/--no-features",
                                            help="Extract features, CKA, probes."),
    device: str | None = typer.Option(_d(A, "device"), help="auto | cpu | cuda"),
    status: Path | None = typer.Option(None, help="Show every job of the grid in this directory (done, running, "
                                                     "failed with its log's last line, pending) and exit."),
    launcher: str = typer.Option(_d(L, "launcher"), help="local: on this machine | slurm: submitted through submitit"),
    jobs: int = typer.Option(_d(L, "jobs"), help="local: jobs at once, in N worker processes with cores/N threads "
                                                 "each and, with GPUs, a GPU each (1 = in this process; 0 = one "
                                                 "per GPU, or per core)."),
    partition: str | None = typer.Option(_d(L, "partition"), help="slurm: partition (default: the cluster's)."),
    time: int = typer.Option(_d(L, "time_min"), help="slurm: time limit per job in minutes (a job past it is "
                                                     "requeued and resumes)."),
    gpus_per_job: int = typer.Option(_d(L, "gpus"), help="slurm: GPUs per job."),
    cpus_per_job: int = typer.Option(_d(L, "cpus"), help="slurm: CPUs per job (= torch threads)."),
    mem_gb: float = typer.Option(_d(L, "mem_gb"), help="slurm: memory per job in GB."),
    array_limit: int = typer.Option(_d(L, "array_limit"), help="slurm: arms of the job array running at once "
                                                               "(0 = no limit)."),
    wait: bool = typer.Option(_d(L, "wait"), "--wait/--no-wait", help="slurm: wait for the jobs, then write the "
                                                                      "verdict here (default: submit and return)."),
    submitit_cluster: str = typer.Option(_d(L, "cluster"), hidden=True,
                                         help="slurm | local | debug (local: CI, no cluster)"),
):
    """A grid of init specs x methods x seeds, with summary.csv, aggregate.csv and the verdict (docs/grids.md)."""
    from probe.pipeline import run_ablation
    from train.ablation.grid import AblationConfig
    from train.ablation.jobs import AGGREGATE, format_status, job_done, read_jobs
    from train.ablation.launch import LaunchConfig

    if status is not None:
        typer.echo(format_status(status))
        return
    if not config or out is None:
        raise UserError("--config and --out are required (or --status OUT to look at a grid)")

    if steps is not None:
        checks.nonneg_int(steps, "--steps")
    if device is not None:
        checks.device(device, "--device")
    if scale is not None:
        checks.positive_int(scale, "--scale")
    cfg = AblationConfig(config=config, out=str(out), teacher=str(teacher) if teacher else None, steps=steps,
                         seeds=_ints(seeds, "--seeds"), scale=scale, features=features, device=device)
    launch_cfg = LaunchConfig(launcher=launcher, jobs=jobs, partition=partition, time_min=time, gpus=gpus_per_job,
                              cpus=cpus_per_job, mem_gb=mem_gb, array_limit=array_limit, wait=wait,
                              cluster=submitit_cluster)
    _out_dir(out)
    result = run_ablation(cfg, launch_cfg=launch_cfg)
    if all(job_done(result, j) for j in read_jobs(result) if j.kind == AGGREGATE):
        typer.echo((Path(result) / "verdict.txt").read_text())
        typer.echo(f"ablation written to {result}")
    else:
        typer.echo(f"jobs submitted; follow them with: probe train ablation --status {result}")


@app.command("report")
def report_cmd(
    inputs: list[Path] = typer.Argument(..., help="Run, ablation and analysis directories to gather."),
    out: Path = typer.Option(Path(_d(REP, "out")), help="The PDF; figures and tables go to <stem>_files/."),
    title: str = typer.Option(_d(REP, "title"), help="Title of the first page."),
    umap: bool = typer.Option(_d(REP, "umap"), "--umap/--no-umap", help="Draw UMAP panels (needs feature files)."),
    seed: int = typer.Option(_d(REP, "seed"), help="UMAP seed."),
):
    """A PDF with samples, quality curves, the verdict, probes, CKA maps and UMAP."""
    from analysis.report import ReportConfig, build_report

    checks.seed(seed, "--seed")
    for p in inputs:
        if not p.exists():
            raise UserError(f"input {p} does not exist")
    _out_file(out)
    pdf = build_report(ReportConfig(inputs=[str(p) for p in inputs], out=str(out), title=title, umap=umap, seed=seed),
                       progress=True)
    typer.echo(f"report written to {pdf}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path(_d(DEMO, "out")), help="Working directory of every stage (reused when rerun)."),
    report: Path = typer.Option(Path(_d(DEMO, "report")), help="The PDF written at the end."),
    quick: bool = typer.Option(_d(DEMO, "quick"), help="Tiny models and few steps (seconds; for tests, "
                                                            "numbers mean nothing; evaluation stays on)."),
    seed: int = typer.Option(_d(DEMO, "seed"), help="Teacher seed."),
    device: str = typer.Option(_d(DEMO, "device"), help="auto | cpu | cuda"),
):
    """The main job end to end on the embedded digits data: teacher, students, features, analyses, report."""
    from probe.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(out), report=str(report), quick=quick, seed=seed, device=device)
    _out_dir(out)
    _out_file(report, "--report")
    run_demo(cfg)


def _is_main() -> bool:
    """Under torchrun only rank 0 prints."""
    from probe.core.distributed import is_main

    return is_main()


def _print_eval(run: Path) -> None:
    import json

    from probe.quality.evaluate import format_quality

    p = Path(run) / "eval.json"
    if p.exists():
        typer.echo(format_quality(json.loads(p.read_text())))


@app.command("eval")
def eval_cmd(
    model: Path | None = typer.Argument(None, help="Run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    data: str | None = typer.Option(_d(EV, "data"), help="Data set to compare with (default: the model's own)."),
    n_samples: int | None = typer.Option(_d(EV, "n_samples"), help="Generated images per score; the floor uses as "
                                            "many (default: measured per data set, see docs/metric.md)."),
    draws: int = typer.Option(_d(EV, "draws"), help="Batches of latents scored: the model's own spread."),
    steps: int = typer.Option(_d(EV, "steps"), help="Heun steps for multi-step models."),
    churn: float = typer.Option(_d(EV, "churn"), help="EDM's S_churn: stochastic Heun for multi-step models "
                                   "(0 = deterministic, the default; docs/metric.md has what it changes)."),
    churn_tmin: float = typer.Option(_d(EV, "churn_tmin"), help="Add churn noise only at sigma >= this."),
    churn_tmax: float = typer.Option(_d(EV, "churn_tmax"), help="Add churn noise only at sigma <= this."),
    seed: int = typer.Option(_d(EV, "seed"), help="Seed of the latents and the reference choice."),
    device: str = typer.Option(_d(EV, "device"), help="auto | cpu | cuda"),
    inception_weights: Path | None = typer.Option(_d(EV, "inception_weights"),
                                                     help="Local Inception-v3 file for Inception FID."),
    out: Path | None = typer.Option(None, help="Also write the figures as JSON here."),
    grid: Path | None = typer.Option(None, help="Also write a PNG grid of 64 samples here."),
    health: str | None = typer.Option(None, help="No model: print the metric's health on this data set "
                                         "(degradation ladder, floor and spread, sample counts)."),
):
    """Sample quality of a teacher (multi-step Heun) or a one-step generator, next to the real-vs-real floor."""
    from probe.core.runs import write_json

    if health is not None:
        from probe.quality.health import format_health, metric_health

        if model is not None:
            raise UserError("--health takes a data set and no model")
        report = metric_health(health, n_samples=n_samples, seed=seed, progress=True)
        typer.echo(format_health(report))
        if out:
            write_json(out, report)
        return
    if model is None:
        raise UserError("give a model to evaluate, or --health DATA")
    from probe.core.images import save_grid
    from probe.quality.evaluate import EvalConfig, evaluate_model, format_quality

    cfg = EvalConfig(model=str(model), data=data, n_samples=n_samples, draws=draws, steps=steps, churn=churn,
                     churn_tmin=churn_tmin, churn_tmax=churn_tmax, seed=seed, device=device,
                     inception_weights=str(inception_weights) if inception_weights else None)
    _out_file(out)
    _out_file(grid, "--grid")
    result, samples = evaluate_model(cfg, progress=True)
    typer.echo(f"classifier held-out accuracy {result['evaluator']['classifier_test_accuracy']:.4f}")
    typer.echo(format_quality(result))
    if out:
        write_json(out, {"config": cfg.__dict__, **result})
    if grid:
        save_grid(samples[:64], grid)


# ----------------------------------------------------------------------------- extraction
@app.command("layers")
def layers_cmd(
    model: Path = typer.Argument(..., help="Run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    layers: str | None = typer.Option(None, help="Only modules matching these comma-separated paths / globs."),
    depth: int | None = typer.Option(None, help="Only module paths with at most this many dots + 1."),
):
    """Every hookable module path with its output shape for one input; '*' marks the default selection."""
    from probe.core.models import load_model
    from probe.features.hooks import list_layers

    if depth is not None:
        checks.positive_int(depth, "--depth")
    rows = [info.as_row() for info in list_layers(load_model(model), _names(layers, "--layers"), depth)]
    if not rows:
        raise UserError(f"no module of {model} matches --layers {layers!r} at --depth {depth}")
    width = max(len(r["layer"]) for r in rows) + 2
    typer.echo(f"{'layer':<{width}}{'type':<26}{'output (C x H x W)':<20}default  extractable")
    for r in rows:  # plain text, not a table widget: full module paths must stay copyable
        typer.echo(f"{r['layer']:<{width}}{r['type']:<26}{r['shape']:<20}{'*' if r['default'] else '':<9}"
                   f"{'yes' if r['extractable'] else 'no'}")


@app.command("extract")
def extract_cmd(
    model: Path = typer.Argument(..., help="Run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    out: Path = typer.Option(..., help="Feature file (.h5); an interrupted one is resumed."),
    data: str = typer.Option(_d(E, "data"), help="digits | shapes | scenes | mnist | cifar10 | folder:PATH"),
    layers: str | None = typer.Option(None, help="Comma-separated module paths or globs (default: down blocks, "
                                                    "mid block, up blocks)."),
    sigmas: str | None = typer.Option(None, help="Comma-separated EDM sigmas, 0 = clean input "
                                                    "(default 0,0.1,0.5,2,10)."),
    pooling: str = typer.Option(_d(E, "pooling"), help="mean | flatten | avgK (K x K average pool)"),
    dtype: str = typer.Option(_d(E, "dtype"), help="float32 | float16 on disk"),
    batch: int = typer.Option(_d(E, "batch"), help="Samples per forward pass (per process under torchrun)."),
    split: str = typer.Option(_d(E, "split"), help="train | test"),
    n_samples: int | None = typer.Option(_d(E, "n_samples"), help="First N samples of the split (default: all)."),
    noise_seed: int = typer.Option(_d(E, "noise_seed"), "--noise-seed", "--seed", help="Seed of the per-sample noise."),
    source: str = typer.Option(_d(E, "source"), help="denoiser (noised real images) | generation (G's own input)."),
    compression: str = typer.Option(_d(E, "compression"), help="lzf | gzip | none"),
    device: str = typer.Option(_d(E, "device"), help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Replace an existing file made with other arguments."),
):
    """Features of named modules at several noise levels, streamed into the HDF5 feature store."""
    from probe.features.extract import ExtractConfig, extract

    sig = _sigmas(sigmas)
    cfg = ExtractConfig(model=str(model), out=str(out), data=data, layers=tuple(_names(layers, "--layers") or ()),
                        sigmas=tuple(sig) if sig is not None else None, pooling=pooling, dtype=dtype,
                        batch=batch, split=split, n_samples=n_samples, noise_seed=noise_seed, source=source,
                        device=device, compression=compression)
    _out_file(out)
    path = extract(cfg, progress=True, overwrite=overwrite)
    if _is_main():
        typer.echo(f"wrote {path}")


# ------------------------------------------------------------------------------- analyses
def _list(text: str | None) -> list | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _names(text: str | None, option: str) -> list | None:
    """None when not given; else a non-empty list of comma-separated names."""
    if text is None:
        return None
    names = _list(text)
    if not names:
        raise UserError(f"{option} is empty; give comma-separated names")
    return names


def _open_stores(files) -> list:
    from probe.features.store import FeatureStore

    stores = []
    try:
        for f in files:
            stores.append(FeatureStore.open(f))
    except BaseException:
        for s in stores:
            s.close()
        raise
    return stores


@app.command("linear")
def linear_cmd(
    files: list[Path] = typer.Argument(..., help="Feature files; several = several noise seeds (mean and std)."),
    out: Path = typer.Option(..., help="Tidy CSV: layer, sigma, target, accuracy, ..."),
    layers: str | None = typer.Option(None, help="Comma-separated layers (default: all)."),
    sigmas: str | None = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    targets: str | None = typer.Option(None, help="Comma-separated targets: label and/or factor names."),
    fig: Path | None = typer.Option(None, help="Heatmap PNG (one per target: the target's name is appended)."),
    seed: int = typer.Option(_d(LIN, "seed"), help="Seed of the train/validation/test split."),
):
    """Linear probes (logistic regression, C chosen on a validation split) per layer and sigma."""
    from analysis.heatmaps import plot_probe_heatmap
    from analysis.linear import probe_table

    checks.seed(seed, "--seed")
    sig, names, tnames = _sigmas(sigmas), _names(layers, "--layers"), _names(targets, "--targets")
    _out_file(out)
    _out_file(fig, "--fig")
    stores = _open_stores(files)
    try:
        df = probe_table(stores, layers=names, sigmas=sig, targets=tnames, seed=seed, progress=True)
    finally:
        for s in stores:
            s.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    figures = []
    if fig is not None:
        for target in df["target"].unique():
            figures.append(fig.with_name(f"{fig.stem}-{target}{fig.suffix}"))
            plot_probe_heatmap(df, target, figures[-1])
    best = df.loc[df.groupby("target")["accuracy"].idxmax()]
    for _, r in best.iterrows():
        typer.echo(f"{r['target']}: best {r['metric']} {r['accuracy']:.3f} at layer {r['layer']}, sigma {r['sigma']:g}")
    typer.echo(f"wrote {out} ({len(df)} rows)" + "".join(f", {f}" for f in figures))


@app.command("cka")
def cka_cmd(
    file_a: Path = typer.Argument(..., help="Feature file A."),
    file_b: Path | None = typer.Argument(None, help="Feature file B (same data, sigmas and noise seed)."),
    out: Path = typer.Option(..., help="Tidy CSV: layer_a, sigma_a, layer_b, sigma_b, estimator, cka, null_mean, ..."),
    mode: str | None = typer.Option(None, help="pair (A vs B, same layer and sigma) | layers | sigmas. "
                                                  "Default: pair with two files, layers with one."),
    estimator: str = typer.Option(_d(CKA, "estimator"), help="debiased | linear | minibatch | rbf | cknna"),
    layers: str | None = typer.Option(None, help="Comma-separated layers (default: all)."),
    sigmas: str | None = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    n_perm: int = typer.Option(_d(CKA, "n_perm"), help="Permutations of the null (rows of one side shuffled); "
                                                             "0 = none."),
    k: int = typer.Option(_d(CKA, "k"), help="Neighbours for CKNNA."),
    sigma_factor: float = typer.Option(_d(CKA, "sigma_factor"), help="RBF bandwidth = median distance x this."),
    bandwidth: str = typer.Option(_d(CKA, "bandwidth"), help="RBF: how that median is taken: kornblith (all n^2 "
                                                             "pairs, zero diagonal included) | offdiag (distinct "
                                                             "pairs only)."),
    fig: Path | None = typer.Option(None, help="Heatmap PNG."),
    seed: int = typer.Option(_d(CKA, "seed"), help="Seed of the null and of subsampling."),
):
    """CKA between two models (same inputs), or layer x layer / sigma x sigma within one."""
    from analysis.cka import cka_table

    checks.nonneg_int(n_perm, "--n-perm")
    checks.positive_int(k, "--k")
    checks.positive_float(sigma_factor, "--sigma-factor")
    checks.seed(seed, "--seed")
    sig, names = _sigmas(sigmas), _names(layers, "--layers")
    mode = mode or ("pair" if file_b else "layers")
    if mode == "pair" and file_b is None:
        raise UserError("--mode pair compares two files: give FILE_A and FILE_B")
    _out_file(out)
    _out_file(fig, "--fig")
    stores = _open_stores([file_a] + ([file_b] if file_b else []))
    try:
        df = cka_table(stores[0], stores[1] if file_b else None, mode=mode, estimator=estimator, layers=names,
                       sigmas=sig, n_perm=n_perm, seed=seed, progress=True, k=k, sigma_factor=sigma_factor,
                       bandwidth=bandwidth)
    finally:
        for s in stores:
            s.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    if fig:
        from analysis.heatmaps import plot_cka_heatmap  # matplotlib: only when a figure is asked for

        plot_cka_heatmap(df, fig)
    typer.echo(f"{estimator} CKA ({mode}): mean {df['cka'].mean():.3f}, min {df['cka'].min():.3f}, "
               f"max {df['cka'].max():.3f}; permutation null mean {df['null_mean'].mean():.3f}")
    typer.echo(f"wrote {out} ({len(df)} rows)" + (f", {fig}" if fig else ""))


@app.command("umap")
def umap_cmd(
    file: Path = typer.Argument(..., help="Feature file."),
    out: Path = typer.Option(..., help="PNG with one panel per sigma (or per layer with --layers)."),
    layer: str | None = typer.Option(_d(UMAP, "layer"), help="Layer to embed (one panel per sigma)."),
    sigmas: str | None = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    layers: str | None = typer.Option(None, help="Instead: these layers at --sigma, one panel each."),
    sigma: float | None = typer.Option(_d(UMAP, "sigma"), help="The sigma for --layers."),
    color_by: str = typer.Option(_d(UMAP, "color_by"), help="label or a factor name."),
    max_points: int = typer.Option(_d(UMAP, "max_points"), help="Points per panel (seeded subset)."),
    csv: Path | None = typer.Option(None, help="Also write the k-NN accuracy per panel as CSV."),
    seed: int = typer.Option(_d(UMAP, "seed"), help="UMAP seed."),
):
    """2-D UMAP views coloured by label, each panel with the k-NN accuracy of its embedding."""
    from analysis.umap_view import umap_panels
    from probe.features.store import FeatureStore

    checks.integer(max_points, "--max-points", minimum=4)  # UMAP and its k-NN score need a few points
    checks.seed(seed, "--seed")
    if sigma is not None:
        checks.sigma(sigma, "--sigma")
    sig, names = _sigmas(sigmas), _names(layers, "--layers")
    _out_file(out)
    _out_file(csv, "--csv")
    with FeatureStore.open(file) as store:
        df = umap_panels(store, layer, sigmas=sig, out_png=str(out), layers=names, sigma=sigma, seed=seed,
                         color_by=color_by, max_points=max_points, progress=True)
    if csv:
        df.to_csv(csv, index=False)
    for _, r in df.iterrows():
        typer.echo(f"{r['layer']} sigma {r['sigma']:g}: {r['knn_k']}-NN accuracy of the embedding "
                   f"{r['knn_accuracy']:.3f}")
    typer.echo(f"wrote {out}")


# Errors from the operating system that the user causes and can fix (a path, a full disk).
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC,
                  errno.EDQUOT, errno.ENAMETOOLONG, errno.EEXIST}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# click's base of usage errors: typer >= 0.22 vendors click, older typer uses it as a dependency
_CLICK_ERROR: type[Any] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors (ours and typer's) become one line on stderr, exit code 2
    (3: a run diverged)."""
    try:
        code = app(args=argv, prog_name="probe", standalone_mode=False)
    except _CLICK_ERROR as e:  # --steps abc, a missing option, an unknown command ...
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `probe` or `probe train`: the help, as before
            e.show()
            sys.exit(e.exit_code)
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(2)
    except UserError as e:  # exit code 2, or 3 for a run that diverged (RunDiverged)
        typer.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {_one_line(e.strerror or e)}{where}", err=True)
        sys.exit(2)
    except RuntimeError as e:  # click's / typer's Abort (EOF at a prompt)
        if type(e).__name__ != "Abort":
            raise
        typer.echo("error: aborted", err=True)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        typer.echo("interrupted; rerun the same command with --resume (training) or as is (extract) to continue",
                   err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
