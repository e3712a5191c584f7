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

    p = Path(run) / "eval.json"
    if p.exists():
        typer.echo(_format_quality(json.loads(p.read_text())))


def _format_quality(r: dict) -> str:
    floor = r.get("floor") or {}
    line = f"Frechet distance {r['fd']:.2f}"
    if floor:
        line += f"   real-vs-real floor {floor['mean']:.2f} +- {floor['std']:.2f} (n={r.get('n')}, over resamplings)"
    line += f"\nprecision {r.get('precision', float('nan')):.3f}  recall {r.get('recall', float('nan')):.3f}"
    line += f"  class coverage {r.get('coverage', float('nan')):.2f}"
    return line


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
