"""The ``probe`` command line: thin typer commands over plain functions that take a config.

Every command turns its options into one dataclass config (saved with its results) and calls a
library function. Errors the user can cause raise ``UserError``; ``main`` prints them as one line
on stderr and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from probe.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train one-step diffusion generators and look inside them.")
train_app = typer.Typer(no_args_is_help=True, help="Train a teacher, a one-step student, or an ablation grid.")
app.add_typer(train_app, name="train")


def _floats(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"expected a comma-separated list of numbers, got {text!r}") from None


def _band(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    vals = _floats(text)
    if len(vals) != 2 or not 0 < vals[0] <= vals[1]:
        raise UserError(f"--sigma-range takes 'LO,HI' with 0 < LO <= HI, got {text!r}")
    return tuple(vals)


# ------------------------------------------------------------------------------- training
@train_app.command("teacher")
def train_teacher_cmd(
    out: Path = typer.Option(..., help="Run directory to write."),
    data: str = typer.Option("digits", help="digits | shapes | mnist | cifar10 | folder:PATH"),
    preset: str = typer.Option("tiny", help="UNet preset: tiny | small | cifar | test"),
    steps: int = typer.Option(1600, help="Optimiser steps."),
    batch: int = typer.Option(64, help="Images per step (global: across every process)."),
    accum: int = typer.Option(1, help="Gradient-accumulation rounds per step and process."),
    lr: float = typer.Option(2e-3, help="Adam learning rate."),
    ema_halflife: float = typer.Option(12_500, help="EMA half-life in training images."),
    sigma_range: Optional[str] = typer.Option(None, help="'LO,HI': train only on sigmas in this band."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints."),
    sample_steps: int = typer.Option(18, help="Heun steps for samples and evaluation."),
    eval_samples: int = typer.Option(500, help="Samples for the final quality figure (0 = skip)."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
):
    """Train an EDM teacher on a diffusers UNet2DModel."""
    from train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=str(out), data=data, preset=preset, steps=steps, batch=batch, accum=accum, lr=lr,
                        ema_halflife_images=ema_halflife, sigma_range=_band(sigma_range),
                        checkpoint_every=checkpoint_every, sample_steps=sample_steps,
                        eval_samples=eval_samples, seed=seed, device=device)
    run = train_teacher(cfg, resume=resume)
    if _is_main():
        _print_eval(run)
        typer.echo(f"teacher written to {run}")


@train_app.command("student")
def train_student_cmd(
    teacher: Path = typer.Option(..., help="Teacher: run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    out: Path = typer.Option(..., help="Run directory to write."),
    method: str = typer.Option("diffratio-js", help="diffratio-js | diffratio-kl | diffratio-fkl | vsd | sid | gan"),
    init: str = typer.Option("teacher", help="Init spec: teacher | random | keep:GLOBS | reinit:GLOBS | shuffle[:GLOBS] "
                                             "| from:PATH, joined with '+' (see train/initspec.py)."),
    data: Optional[str] = typer.Option(None, help="Real data (default: the teacher's data set)."),
    sigma_init: float = typer.Option(2.5, help="G(z) = D(sigma_init z; sigma_init)."),
    steps: int = typer.Option(2000, help="Generator steps."),
    batch: int = typer.Option(64, help="Generated (and real) images per step (global: across every process)."),
    accum: int = typer.Option(1, help="Gradient-accumulation rounds per step and process."),
    lr_g: float = typer.Option(1e-4, help="Generator learning rate."),
    lr_aux: float = typer.Option(1e-4, help="Ratio classifier / fake-score learning rate."),
    aux_steps: int = typer.Option(1, help="Auxiliary updates per generator update."),
    ratio_net: str = typer.Option("encoder", help="encoder (teacher's, default) | encoder-random | cnn"),
    sigma_dist: str = typer.Option("lognormal", help="lognormal | karras"),
    weighting: str = typer.Option("none", help="w(sigma): none | sigma2 | snr | edm"),
    sid_alpha: float = typer.Option(1.2, help="SiD's alpha."),
    fkl_clip: float = typer.Option(10.0, help="diffratio-fkl: upper clip of exp(-l)."),
    grad_clip: float = typer.Option(0.0, help="Max gradient norm, 0 = off."),
    eval_every: int = typer.Option(100, help="Steps between sample-quality rows in metrics.jsonl, 0 = off."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
):
    """Train a one-step generator G(z) = D(sigma_init z; sigma_init) with one of the methods."""
    from train.student.loop import StudentConfig, train_student

    cfg = StudentConfig(out=str(out), teacher=str(teacher), method=method, init=init, data=data, sigma_init=sigma_init,
                        steps=steps, batch=batch, accum=accum, lr_g=lr_g, lr_aux=lr_aux, aux_steps=aux_steps, ratio_net=ratio_net,
                        sigma_dist=sigma_dist, weighting=weighting, sid_alpha=sid_alpha, fkl_clip=fkl_clip,
                        grad_clip=grad_clip, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed,
                        device=device)
    run = train_student(cfg, resume=resume)
    if _is_main():
        _print_eval(run)
        typer.echo(f"generator written to {run}")


@train_app.command("regress")
def train_regress_cmd(
    teacher: Path = typer.Option(..., help="Teacher whose multi-step samples the generator regresses onto."),
    out: Path = typer.Option(..., help="Run directory to write."),
    sigma_init: float = typer.Option(2.5, help="G(z) = D(sigma_init z; sigma_init)."),
    n_pairs: int = typer.Option(2000, help="(z, teacher sample) pairs."),
    sample_steps: int = typer.Option(18, help="Heun steps of the teacher sampler."),
    steps: int = typer.Option(2000, help="Optimiser steps."),
    batch: int = typer.Option(64, help="Pairs per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Seed of the pairs, the initialisation and training."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    resume: bool = typer.Option(False, help="Continue the run in --out."),
):
    """A generator regressed from random init onto the teacher's samples: the mapping without the features."""
    from train.regress import RegressConfig, regress_generator

    cfg = RegressConfig(out=str(out), teacher=str(teacher), sigma_init=sigma_init, n_pairs=n_pairs,
                        sample_steps=sample_steps, steps=steps, batch=batch, lr=lr, seed=seed, device=device)
    run = regress_generator(cfg, resume=resume)
    _print_eval(run)
    typer.echo(f"regressed generator written to {run}; use it with --init from:{run}")


@train_app.command("ablation")
def train_ablation_cmd(
    config: Optional[str] = typer.Option(None, help="Grid TOML file, or a shipped grid: paper | quick"),
    out: Optional[Path] = typer.Option(None, help="Ablation directory; rerunning skips finished jobs and resumes partial ones."),
    teacher: Optional[Path] = typer.Option(None, help="Use this teacher instead of the grid's."),
    steps: Optional[int] = typer.Option(None, help="Override the grid's generator steps."),
    seeds: Optional[str] = typer.Option(None, help="Override the grid's seeds, e.g. 0,1,2"),
    features: Optional[bool] = typer.Option(None, "--features/--no-features", help="Extract features, CKA, probes."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    status: Optional[Path] = typer.Option(None, help="Show every job of the grid in this directory (done, running, "
                                                     "failed with its log's last line, pending) and exit."),
    launcher: str = typer.Option("local", help="local: on this machine | slurm: submitted through submitit"),
    jobs: int = typer.Option(1, help="local: jobs at once, in N worker processes with cores/N threads each and, "
                                     "with GPUs, a GPU each (1 = in this process; 0 = one per GPU, or per core)."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition (default: the cluster's)."),
    time: int = typer.Option(120, help="slurm: time limit per job in minutes (a job past it is requeued and resumes)."),
    gpus_per_job: int = typer.Option(0, help="slurm: GPUs per job."),
    cpus_per_job: int = typer.Option(4, help="slurm: CPUs per job (= torch threads)."),
    mem_gb: float = typer.Option(16.0, help="slurm: memory per job in GB."),
    array_limit: int = typer.Option(0, help="slurm: arms of the job array running at once (0 = no limit)."),
    wait: bool = typer.Option(False, "--wait/--no-wait", help="slurm: wait for the jobs, then write the verdict here "
                                                               "(default: submit and return)."),
    submitit_cluster: str = typer.Option("slurm", hidden=True, help="slurm | local | debug (local: CI, no cluster)"),
):
    """A grid of init specs x methods x seeds, with summary.csv, aggregate.csv and the verdict (docs/grids.md)."""
    from train.ablation.grid import AblationConfig

    if status is not None:
        from train.ablation.jobs import format_status

        typer.echo(format_status(status))
        return
    if not config or out is None:
        raise UserError("--config and --out are required (or --status OUT to look at a grid)")
    from probe.pipeline import run_ablation
    from train.ablation.launch import LaunchConfig

    cfg = AblationConfig(config=config, out=str(out), teacher=str(teacher) if teacher else None, steps=steps,
                         seeds=tuple(int(v) for v in _floats(seeds)) if seeds else None, features=features,
                         device=device)
    launch_cfg = LaunchConfig(launcher=launcher, jobs=jobs, partition=partition, time_min=time, gpus=gpus_per_job,
                              cpus=cpus_per_job, mem_gb=mem_gb, array_limit=array_limit, wait=wait,
                              cluster=submitit_cluster)
    result = run_ablation(cfg, launch_cfg=launch_cfg)
    from train.ablation.jobs import AGGREGATE, job_done, read_jobs

    if all(job_done(result, j) for j in read_jobs(result) if j.kind == AGGREGATE):
        typer.echo((Path(result) / "verdict.txt").read_text())
        typer.echo(f"ablation written to {result}")
    else:
        typer.echo(f"jobs submitted; follow them with: probe train ablation --status {result}")


@app.command("report")
def report_cmd(
    inputs: List[Path] = typer.Argument(..., help="Run, ablation and analysis directories to gather."),
    out: Path = typer.Option(Path("reports/report.pdf"), help="The PDF; figures and tables go to <stem>_files/."),
    title: str = typer.Option("onestep-probe report", help="Title of the first page."),
    umap: bool = typer.Option(True, "--umap/--no-umap", help="Draw UMAP panels (needs feature files)."),
    seed: int = typer.Option(0, help="UMAP seed."),
):
    """A PDF with samples, quality curves, the verdict, probes, CKA maps and UMAP."""
    from analysis.report import ReportConfig, build_report

    pdf = build_report(ReportConfig(inputs=[str(p) for p in inputs], out=str(out), title=title, umap=umap, seed=seed),
                       progress=True)
    typer.echo(f"report written to {pdf}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Working directory of every stage (reused when rerun)."),
    report: Path = typer.Option(Path("reports/demo.pdf"), help="The PDF written at the end."),
    quick: bool = typer.Option(False, help="Tiny models and few steps (seconds; for tests, numbers mean nothing)."),
    seed: int = typer.Option(0, help="Teacher seed."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """The main job end to end on the embedded digits data: teacher, students, features, analyses, report."""
    from probe.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=str(out), report=str(report), quick=quick, seed=seed, device=device))


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
    model: Path = typer.Argument(..., help="Run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    data: Optional[str] = typer.Option(None, help="Data set to compare with (default: the model's own)."),
    n_samples: int = typer.Option(500, help="Generated images per score; the floor uses as many."),
    steps: int = typer.Option(18, help="Heun steps for multi-step models."),
    seed: int = typer.Option(0, help="Seed of the latents and the reference choice."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    inception_weights: Optional[Path] = typer.Option(None, help="Local Inception-v3 file for Inception FID."),
    out: Optional[Path] = typer.Option(None, help="Also write the figures as JSON here."),
    grid: Optional[Path] = typer.Option(None, help="Also write a PNG grid of 64 samples here."),
):
    """Sample quality of a teacher (multi-step Heun) or a one-step generator, next to the real-vs-real floor."""
    from probe.quality.evaluate import EvalConfig, evaluate_model, format_quality
    from probe.core.images import save_grid
    from probe.core.runs import write_json

    cfg = EvalConfig(model=str(model), data=data, n_samples=n_samples, steps=steps, seed=seed, device=device,
                     inception_weights=str(inception_weights) if inception_weights else None)
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
    layers: Optional[str] = typer.Option(None, help="Only modules matching these comma-separated paths / globs."),
    depth: Optional[int] = typer.Option(None, help="Only module paths with at most this many dots + 1."),
):
    """Every hookable module path with its output shape for one input; '*' marks the default selection."""
    from probe.features.hooks import list_layers
    from probe.core.models import load_model

    rows = [info.as_row() for info in list_layers(load_model(model), _list(layers), depth)]
    width = max(len(r["layer"]) for r in rows) + 2
    typer.echo(f"{'layer':<{width}}{'type':<26}{'output (C x H x W)':<20}default  extractable")
    for r in rows:  # plain text, not a table widget: full module paths must stay copyable
        typer.echo(f"{r['layer']:<{width}}{r['type']:<26}{r['shape']:<20}{'*' if r['default'] else '':<9}"
                   f"{'yes' if r['extractable'] else 'no'}")


@app.command("extract")
def extract_cmd(
    model: Path = typer.Argument(..., help="Run directory or diffusers UNet2DModel / DDPMPipeline directory."),
    out: Path = typer.Option(..., help="Feature file (.h5); an interrupted one is resumed."),
    data: str = typer.Option("digits", help="digits | shapes | mnist | cifar10 | folder:PATH"),
    layers: Optional[str] = typer.Option(None, help="Comma-separated module paths or globs (default: down blocks, "
                                                    "mid block, up blocks)."),
    sigmas: Optional[str] = typer.Option(None, help="Comma-separated EDM sigmas, 0 = clean input "
                                                    "(default 0,0.1,0.5,2,10)."),
    pooling: str = typer.Option("mean", help="mean | flatten | avgK (K x K average pool)"),
    dtype: str = typer.Option("float32", help="float32 | float16 on disk"),
    batch: int = typer.Option(256, help="Samples per forward pass (per process under torchrun)."),
    split: str = typer.Option("test", help="train | test"),
    n_samples: Optional[int] = typer.Option(None, help="First N samples of the split (default: all)."),
    noise_seed: int = typer.Option(0, "--noise-seed", "--seed", help="Seed of the per-sample noise."),
    source: str = typer.Option("denoiser", help="denoiser (noised real images) | generation (G's own input)."),
    compression: str = typer.Option("lzf", help="lzf | gzip | none"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Replace an existing file made with other arguments."),
):
    """Features of named modules at several noise levels, streamed into the HDF5 feature store."""
    from probe.features.extract import ExtractConfig, extract

    if sigmas is not None and not _floats(sigmas):
        raise UserError("--sigmas is empty; give at least one noise level")
    cfg = ExtractConfig(model=str(model), out=str(out), data=data, layers=tuple(_list(layers) or ()),
                        sigmas=tuple(_floats(sigmas)) if sigmas is not None else None, pooling=pooling, dtype=dtype,
                        batch=batch, split=split, n_samples=n_samples, noise_seed=noise_seed, source=source,
                        device=device, compression=compression)
    path = extract(cfg, progress=True, overwrite=overwrite)
    if _is_main():
        typer.echo(f"wrote {path}")


# ------------------------------------------------------------------------------- analyses
def _list(text: Optional[str]) -> Optional[list]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@app.command("linear")
def linear_cmd(
    files: List[Path] = typer.Argument(..., help="Feature files; several = several noise seeds (mean and std)."),
    out: Path = typer.Option(..., help="Tidy CSV: layer, sigma, target, accuracy, ..."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    sigmas: Optional[str] = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated targets: label and/or factor names."),
    fig: Optional[Path] = typer.Option(None, help="Heatmap PNG (one per target: the target's name is appended)."),
    seed: int = typer.Option(0, help="Seed of the train/validation/test split."),
):
    """Linear probes (logistic regression, C chosen on a validation split) per layer and sigma."""
    from analysis.heatmaps import plot_probe_heatmap
    from analysis.linear import probe_table
    from probe.features.store import FeatureStore

    stores = [FeatureStore.open(f) for f in files]
    try:
        df = probe_table(stores, layers=_list(layers), sigmas=_floats(sigmas) if sigmas else None,
                         targets=_list(targets), seed=seed, progress=True)
    finally:
        for s in stores:
            s.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    for target in df["target"].unique() if fig else []:
        plot_probe_heatmap(df, target, fig.with_name(f"{fig.stem}-{target}{fig.suffix}"))
    best = df.loc[df.groupby("target")["accuracy"].idxmax()]
    for _, r in best.iterrows():
        typer.echo(f"{r['target']}: best {r['metric']} {r['accuracy']:.3f} at layer {r['layer']}, sigma {r['sigma']:g}")
    typer.echo(f"wrote {out} ({len(df)} rows)")


@app.command("cka")
def cka_cmd(
    file_a: Path = typer.Argument(..., help="Feature file A."),
    file_b: Optional[Path] = typer.Argument(None, help="Feature file B (same data, sigmas and noise seed)."),
    out: Path = typer.Option(..., help="Tidy CSV: layer_a, sigma_a, layer_b, sigma_b, estimator, cka, null_mean, ..."),
    mode: Optional[str] = typer.Option(None, help="pair (A vs B, same layer and sigma) | layers | sigmas. "
                                                  "Default: pair with two files, layers with one."),
    estimator: str = typer.Option("debiased", help="debiased | linear | minibatch | rbf | cknna"),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    sigmas: Optional[str] = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    n_perm: int = typer.Option(10, help="Permutations of the null (rows of one side shuffled)."),
    k: int = typer.Option(10, help="Neighbours for CKNNA."),
    sigma_factor: float = typer.Option(1.0, help="RBF bandwidth = median distance x this."),
    fig: Optional[Path] = typer.Option(None, help="Heatmap PNG."),
    seed: int = typer.Option(0, help="Seed of the null and of subsampling."),
):
    """CKA between two models (same inputs), or layer x layer / sigma x sigma within one."""
    from analysis.cka import cka_table
    from analysis.heatmaps import plot_cka_heatmap
    from probe.features.store import FeatureStore

    mode = mode or ("pair" if file_b else "layers")
    if mode == "pair" and file_b is None:
        raise UserError("--mode pair compares two files: give FILE_A and FILE_B")
    with FeatureStore.open(file_a) as a:
        b = FeatureStore.open(file_b) if file_b else None
        try:
            df = cka_table(a, b, mode=mode, estimator=estimator, layers=_list(layers),
                           sigmas=_floats(sigmas) if sigmas else None, n_perm=n_perm, seed=seed, progress=True,
                           k=k, sigma_factor=sigma_factor)
        finally:
            if b is not None:
                b.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    if fig:
        plot_cka_heatmap(df, fig)
    typer.echo(f"{estimator} CKA ({mode}): mean {df['cka'].mean():.3f}, min {df['cka'].min():.3f}, "
               f"max {df['cka'].max():.3f}; permutation null mean {df['null_mean'].mean():.3f}")
    typer.echo(f"wrote {out} ({len(df)} rows)")


@app.command("umap")
def umap_cmd(
    file: Path = typer.Argument(..., help="Feature file."),
    out: Path = typer.Option(..., help="PNG with one panel per sigma (or per layer with --layers)."),
    layer: Optional[str] = typer.Option(None, help="Layer to embed (one panel per sigma)."),
    sigmas: Optional[str] = typer.Option(None, help="Comma-separated sigmas (default: all)."),
    layers: Optional[str] = typer.Option(None, help="Instead: these layers at --sigma, one panel each."),
    sigma: Optional[float] = typer.Option(None, help="The sigma for --layers."),
    color_by: str = typer.Option("label", help="label or a factor name."),
    max_points: int = typer.Option(2000, help="Points per panel (seeded subset)."),
    csv: Optional[Path] = typer.Option(None, help="Also write the k-NN accuracy per panel as CSV."),
    seed: int = typer.Option(0, help="UMAP seed."),
):
    """2-D UMAP views coloured by label, each panel with the k-NN accuracy of its embedding."""
    from analysis.umap_view import umap_panels
    from probe.features.store import FeatureStore

    with FeatureStore.open(file) as store:
        df = umap_panels(store, layer, sigmas=_floats(sigmas) if sigmas else None, out_png=str(out),
                         layers=_list(layers), sigma=sigma, seed=seed, color_by=color_by, max_points=max_points,
                         progress=True)
    if csv:
        df.to_csv(csv, index=False)
    for _, r in df.iterrows():
        typer.echo(f"{r['layer']} sigma {r['sigma']:g}: {r['knn_k']}-NN accuracy of the embedding {r['knn_accuracy']:.3f}")
    typer.echo(f"wrote {out}")


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command with --resume (training) or as is (extract) to continue",
                   err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
