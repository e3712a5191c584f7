"""The main job end to end on the embedded digits data: teacher -> students -> features -> report.

``run_demo(DemoConfig())`` is what ``probe demo`` and ``make demo`` call. Stages, each printed
with its own progress bar and each resumable (rerunning the demo reuses what is finished):

1. an EDM teacher on digits (``train/teacher.py``);
2. DiffRatio (``diffratio-js``) students from three initialisations, the shipped ``demo`` grid:
   the full teacher, random weights, and the teacher with its input/output layers re-initialised
   (keeps the multi-noise-level features, loses the noise-to-image mapping), with features of
   teacher and students extracted on the same noisy inputs, CKA teacher vs student and probes
   (``train/ablation/grid.py``);
3. the teacher's own CKA maps, sigma x sigma and layer x layer (``analysis/``);
4. the PDF report (``analysis/report.py``), by default ``reports/demo.pdf``.

``quick=True`` shrinks every stage to seconds for the tests; its numbers mean nothing. It keeps
every evaluation on (teacher and students, 100 samples each), so a quick demo on a fresh machine
goes through the same lazy training of the metric classifier as the full one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console

from analysis.cka import cka_table
from analysis.report import ReportConfig, build_report
from probe.core import checks as c
from probe.core.errors import UserError
from probe.core.runs import run_status
from probe.features.store import FeatureStore
from probe.pipeline import run_ablation
from train.ablation.grid import AblationConfig
from train.teacher import TeacherConfig, train_teacher


@dataclass
class DemoConfig:
    out: str = "runs/demo"               # working directory of every stage
    report: str = "reports/demo.pdf"     # the PDF written at the end
    quick: bool = False                  # tiny models and few steps (for the tests)
    teacher_steps: int = 1600            # teacher optimiser steps (quick: 4)
    student_steps: int = 300             # generator steps per student (quick: 3)
    seeds: tuple = (0,)                  # student seeds
    teacher_eval_samples: int = 500      # samples of the teacher's end-of-run quality figure, 0 = skip (quick: 100)
    seed: int = 0                        # teacher seed
    device: str = "auto"                 # "auto" | "cpu" | "cuda"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad numbers before any stage starts (one-line UserError); runs on construction."""

        c.positive_int(self.teacher_steps, "teacher_steps")
        c.positive_int(self.student_steps, "student_steps")
        seeds = [c.seed(s, "seeds") for s in self.seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        c.eval_samples(self.teacher_eval_samples, "teacher_eval_samples")
        c.seed(self.seed)
        c.device(self.device)


def _quick(cfg: DemoConfig) -> DemoConfig:
    return DemoConfig(**{**asdict(cfg), "teacher_steps": 4, "student_steps": 3, "teacher_eval_samples": 100})


def run_demo(cfg: DemoConfig, progress: bool = True, console: Console | None = None) -> Path:
    """Run every stage; returns the report path."""

    console = console or Console()
    cfg = _quick(cfg) if cfg.quick else cfg
    out = Path(cfg.out)
    t0 = time.time()

    def stage(n: int, text: str) -> None:
        console.print(f"[bold cyan][{n}/4][/] {text}   [dim]({time.time() - t0:.0f} s so far)[/]")

    stage(1, "teacher: EDM denoiser on digits")
    tcfg = TeacherConfig(out=str(out / "teacher"), data="digits", preset="test" if cfg.quick else "tiny",
                         steps=cfg.teacher_steps, batch=16 if cfg.quick else 64,
                         checkpoint_every=max(2, cfg.teacher_steps // 4), sample_steps=3 if cfg.quick else 18,
                         eval_samples=cfg.teacher_eval_samples, seed=cfg.seed, device=cfg.device)
    teacher = _reuse_or_train(tcfg, train_teacher, progress)

    stage(2, "DiffRatio students from teacher / random / re-initialised-I/O weights, features, CKA, probes")
    grid = resources.files("train.ablation") / "grids" / ("demo-quick.toml" if cfg.quick else "demo.toml")
    ablation = run_ablation(AblationConfig(config=str(grid), out=str(out / "ablation"), teacher=str(teacher),
                                           steps=cfg.student_steps, seeds=tuple(cfg.seeds), features=True,
                                           device=cfg.device), progress=progress)

    stage(3, "the teacher's own CKA maps: sigma x sigma and layer x layer")
    teacher_maps(ablation / "features" / "teacher.h5", out / "analysis", progress)

    stage(4, "report")
    pdf = build_report(ReportConfig(inputs=[str(out)], out=cfg.report, title="onestep-probe demo: digits",
                                    umap=True), progress=progress)
    console.print(f"[bold green]report written to {pdf}[/]  (total {time.time() - t0:.0f} s)")
    return pdf


def _reuse_or_train(tcfg, train_teacher, progress: bool) -> Path:
    """A finished teacher with the same config is reused; a partial one is resumed."""
    out = Path(tcfg.out)
    cfg_file = out / "config.json"
    if cfg_file.exists():
        same = json.loads(cfg_file.read_text())["config"] == json.loads(json.dumps(asdict(tcfg), default=str))
        if same and run_status(out, tcfg.steps) == "done":
            return out
        return train_teacher(tcfg, resume=True, progress=progress)
    return train_teacher(tcfg, progress=progress)


def teacher_maps(features: Path, out: Path, progress: bool) -> None:
    """cka_sigmas_teacher.csv and cka_layers_teacher.csv from the teacher's features (its probes
    are already in the ablation's probes.csv)."""

    out.mkdir(parents=True, exist_ok=True)
    with FeatureStore.open(features) as store:
        for mode in ("sigmas", "layers"):
            cka_table(store, mode=mode, estimator="debiased", n_perm=20, progress=progress) \
                .to_csv(out / f"cka_{mode}_teacher.csv", index=False)
