"""Metric resolution: the real-vs-real floor of FD, KID and FD-infinity at several sample counts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_metric.py            # prints a markdown section
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_metric.py --write    # also replaces it in RESULTS.md

For each embedded data set and each n: a ``QualityEvaluator`` with the toolkit's protocol at that n
(reference and held-out pool sized as the evaluator does by default, so the reference changes with
n; both are listed), then the floor: ``--resamples`` draws of n held-out real images scored like a
model, mean +- std. Then the degradation ladder (``probe eval --health``) at each data set's
default sample count. The default sample count of ``probe eval`` (``default_n_samples``) is chosen
from this table: docs/metric.md says how.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import torch  # noqa: E402

from probe.core.errors import UserError  # noqa: E402
from probe.quality.health import format_health, metric_health  # noqa: E402
from probe.quality.metrics import QualityEvaluator  # noqa: E402

NAME = "bench_metric"


def floor_rows(dataset: str, ns: list[int], resamples: int) -> list[dict]:
    rows = []
    for n in ns:
        start = time.perf_counter()
        try:
            ev = QualityEvaluator(dataset, n_samples=n)
        except UserError:
            rows.append({"n": n, "feasible": False})
            continue
        built = time.perf_counter() - start
        start = time.perf_counter()
        floor = ev.floor(resamples)
        rows.append({"n": n, "feasible": True, "n_reference": ev.n_reference, "n_heldout": len(ev.heldout),
                     "floor": floor, "build_s": built, "score_s": (time.perf_counter() - start) / resamples,
                     "accuracy": ev.classifier_info["test_accuracy"]})
    return rows


def pm(f: dict, key: str, digits: int) -> str:
    return f"{f[key]:.{digits}f} +- {f[key + '_std']:.{digits}f}"


def markdown(results: dict, resamples: int, seconds: float) -> str:
    lines = [f"<!-- {NAME}:start -->",
             "## Metric resolution (`benchmarks/bench_metric.py`)", "",
             f"Real-vs-real floor: n held-out real images scored like a model against the evaluator's reference, "
             f"mean +- std over {resamples} resamples (evaluator seed 0). The reference and the held-out pool follow "
             f"the evaluator's default sizes, so they change with n (listed); a pool smaller than about 2 n makes "
             f"resamples overlap and understates the spread. KID is the unbiased cubic-kernel MMD^2 on the "
             f"classifier's 128-d features (raw units: the features are not normalised); FD-infinity extrapolates "
             f"FD over sub-samples of 0.5-1.0 n to 1/n -> 0. Score time: wall seconds per floor resample (FD, KID, "
             f"FD-infinity, precision/recall, coverage), 1 thread.", ""]
    for dataset, r in results.items():
        acc = next((row["accuracy"] for row in r["rows"] if row["feasible"]), None)
        lines += [f"### {dataset} (classifier test accuracy {acc:.4f})", "",
                  "| n | reference | held-out pool | FD floor | KID floor | FD-infinity floor | score s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            if not row["feasible"]:
                lines.append(f"| {row['n']} | - | - | too few images for a disjoint reference and pool | | | |")
                continue
            f = row["floor"]
            lines.append(f"| {row['n']} | {row['n_reference']} | {row['n_heldout']} | {pm(f, 'fd', 2)} | "
                         f"{pm(f, 'kid', 3)} | {pm(f, 'fd_inf', 2)} | {row['score_s']:.2f} |")
        lines += ["", f"Degradation ladder at the default n = {r['health']['n_samples']} "
                  f"({r['health']['seconds']:.0f} s):", "", "```", format_health(r["health"]), "```", ""]
    lines += [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with "
              f"other jobs; whole run {seconds:.0f} s wall. Rerun on a quiet machine for timings.",
              f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,shapes", help="comma-separated data sets")
    parser.add_argument("--ns", default="250,500,1000,2000", help="comma-separated sample counts")
    parser.add_argument("--resamples", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()

    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for dataset in args.data.split(","):
        rows = floor_rows(dataset, [int(n) for n in args.ns.split(",")], args.resamples)
        results[dataset] = {"rows": rows, "health": metric_health(dataset, n_resamples=args.resamples)}
        print(f"{dataset} done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    text = markdown(results, args.resamples, time.perf_counter() - start)
    print(text)
    if args.write:
        from results_md import write_section

        write_section(NAME, text)


if __name__ == "__main__":
    main()
