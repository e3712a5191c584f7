"""Whole workflows that span layers: an ablation grid trained (``train.ablation``) and then analysed
(``analysis.ablation_summary``). Lives at the top with the CLI and the demo, the only places that may
import every layer."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from rich.console import Console

from analysis.ablation_summary import analyse_grid, write_tables
from probe.core.errors import UserError
from probe.core.locks import exclusive
from train.ablation.grid import AblationConfig, check_grid, load_grid
from train.ablation.jobs import plan_grid, write_plan
from train.ablation.launch import LaunchConfig, launch


def finish_ablation(out: str, progress: bool = False) -> None:
    """The aggregate step of a grid directory whose jobs are all done: tables, features and verdict.
    Run by the launchers as the grid's last job (on SLURM, as a job of its own)."""
    grid_dir = Path(out)
    cfg = AblationConfig(**json.loads((grid_dir / "grid.json").read_text())["config"])
    cfg.seeds = tuple(cfg.seeds) if cfg.seeds else None
    grid = load_grid(cfg.config, cfg)
    analyse_grid(grid_dir, grid, check_grid(grid, grid_dir), progress=progress)


def run_ablation(cfg: AblationConfig, progress: bool = True, train_fn=None,
                 launch_cfg: LaunchConfig | None = None) -> Path:
    """Run (or resume) a grid's jobs, then write its tables, features and verdict; returns the grid directory.

    progress   : progress bars and one line per job                                     (default True)
    train_fn   : see ``train.ablation.run.run_unit`` (local launcher, one job at a time)  (default None)
    launch_cfg : how the jobs run (``train.ablation.launch.LaunchConfig``); None = local, one at a time
    A grid with failed jobs still gets its summary tables (unfinished runs marked), then a UserError
    naming them; running the same command again runs only what is unfinished.
    """
    launch_cfg = launch_cfg or LaunchConfig()
    console = Console(stderr=True, quiet=not progress)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    plan = plan_grid(cfg)  # everything is checked before the directory is touched
    with exclusive(plan.out, "ablation grid"):  # one launch of a grid at a time (docs/reliability.md)
        write_plan(plan)
        report = launch(plan, launch_cfg, progress=progress, train_fn=train_fn,
                        finalize=functools.partial(finish_ablation, str(plan.out), progress), log=log)
        done = report.total - len(report.failed) - len(report.blocked) - len(report.queued)
        log(f"{plan.out}: {done}/{report.total} jobs done ({len(report.ran)} run now, {len(report.skipped)} before) "
            f"in {report.seconds:.1f} s")
        if report.queued:
            log(f"{len(report.queued)} jobs on the cluster; follow them with: probe train ablation --status {plan.out}")
            return plan.out
        if not report.complete:
            write_tables(plan.out, plan.grid, plan.refs)  # what there is so far (unfinished runs marked)
            names = list(report.failed) + report.blocked
            failed = list(report.failed)
            first = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", report.failed[failed[0]]) if failed else ""
            raise UserError(f"{len(failed)} job{'s' if len(failed) != 1 else ''} failed ({', '.join(failed[:5])}"
                            f"{', ...' if len(failed) > 5 else ''})"
                            + (f" and {len(report.blocked)} could not start" if report.blocked else "")
                            + (f"; {failed[0]}: {first}" if failed else "")
                            + f"; logs in {plan.out / 'logs'}; rerunning the same command runs the "
                            f"{len(names)} unfinished jobs")
    verdict = plan.out / "verdict.txt"
    if verdict.exists():
        log(verdict.read_text().rstrip())
    return plan.out
