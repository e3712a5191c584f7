"""Recompute the declared-contrast verdict (analysis/verdict.py, schema 2) from the SHIPPED 300-step tables.

    PYTHONPATH=. python reports/ablation-paper/verdict_contrasts.py   # writes verdict-contrasts.txt/.json here

Inputs: summary.csv of this directory (9 inits x 3 seeds, 300 steps, evaluations every 100 steps) and
the contrasts declared in train/ablation/grids/paper.toml; arms that grid declares but these tables
lack (single, io-keep-temb, temb-reinit) come out "no finished runs". The learning-curve columns are
recomputed from each row's fd_curve. reference.json was not shipped: its two figures are taken
from verdict.txt of this directory (teacher heun-18 FD 8.614; margin 2.506 = 2 x floor std, so
floor std 1.253) and README (floor mean 10.53, the same evaluator: n = 500, seed 0).
"""

from pathlib import Path

import pandas as pd

from analysis.ablation_summary import with_curve_figures
from analysis.verdict import verdict
from probe.core.runs import write_json
from train.ablation.grid import load_grid

HERE = Path(__file__).parent
REFERENCE = {"fd": 8.614, "floor": {"fd": 10.53, "fd_std": 1.253}, "sampler": "heun-18"}


def main() -> None:
    summary = with_curve_figures(pd.read_csv(HERE / "summary.csv"), steps=300, eval_every=100, reference=REFERENCE)
    result = verdict(summary, reference=REFERENCE, contrasts=load_grid("paper").contrasts)
    head = ("Computed from the shipped 300-step tables (reports/ablation-paper/summary.csv: 3 seeds, 300 steps, "
            "not converged) with the contrasts declared in train/ablation/grids/paper.toml; regenerate with "
            "reports/ablation-paper/verdict_contrasts.py. Not a rerun: the grid with the new arms and budgets "
            "has not been run yet.\n\n")
    (HERE / "verdict-contrasts.txt").write_text(head + result.text() + "\n")
    write_json(HERE / "verdict-contrasts.json", result.to_dict())
    cols = ["init", "seed", "fd_start", "fd_at_100", "fd_at_200", "fd_at_300", "fd_auc", "steps_to_150pct",
            "steps_to_110pct", "plateau", "plateau_spread"]
    print(summary[cols].to_string(index=False))


if __name__ == "__main__":
    main()
