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

from probe.errors import UserError

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
    steps: int = typer.Option(2000, help="Optimiser steps."),
    batch: int = typer.Option(64, help="Images per step."),
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

    cfg = TeacherConfig(out=str(out), data=data, preset=preset, steps=steps, batch=batch, lr=lr,
                        ema_halflife_images=ema_halflife, sigma_range=_band(sigma_range),
                        checkpoint_every=checkpoint_every, sample_steps=sample_steps,
                        eval_samples=eval_samples, seed=seed, device=device)
    run = train_teacher(cfg, resume=resume)
    _print_eval(run)
    typer.echo(f"teacher written to {run}")


def _print_eval(run: Path) -> None:
    import json

    from train.evaluate import format_quality

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
    from train.evaluate import EvalConfig, evaluate_model, format_quality
    from train.images import save_grid
    from train.runs import write_json

    cfg = EvalConfig(model=str(model), data=data, n_samples=n_samples, steps=steps, seed=seed, device=device,
                     inception_weights=str(inception_weights) if inception_weights else None)
    result, samples = evaluate_model(cfg, progress=True)
    typer.echo(f"classifier held-out accuracy {result['evaluator']['classifier_test_accuracy']:.4f}")
    typer.echo(format_quality(result))
    if out:
        write_json(out, {"config": cfg.__dict__, **result})
    if grid:
        save_grid(samples[:64], grid)


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
