"""Whole workflows that span layers: an ablation grid trained (``train.ablation``) and then analysed
(``analysis.ablation_summary``). Lives at the top with the CLI and the demo, the only places that may
import every layer."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from analysis.ablation_summary import analyse_grid, write_tables
from probe.core.locks import exclusive
from train.ablation.grid import AblationConfig, check_grid, load_grid
from train.ablation.run import run_grid


def run_ablation(cfg: AblationConfig, progress: bool = True, train_fn=None) -> Path:
    """Run (or resume) a grid, then write its tables, features and verdict; returns the grid directory.

    progress : progress bars and one line per run                                        (default True)
    train_fn : see ``train.ablation.run.run_grid``                                        (default None)
    """
    check_grid(load_grid(cfg.config, cfg), Path(cfg.out))  # a bad grid is refused before anything (a lock) is made
    with exclusive(cfg.out, "ablation grid"):  # training and analysis: one writer (re-entrant in run_grid)
        out, grid, refs = run_grid(cfg, progress=progress, train_fn=train_fn,
                                   after_run=lambda o, g, r: write_tables(o, g, r))  # a partial summary after each arm
        result = analyse_grid(out, grid, refs, progress=progress)
    Console(stderr=True, quiet=not progress).print(result.text(), markup=False, highlight=False)
    return out
