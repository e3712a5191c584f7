"""What the metric classifier's factor heads let the metric see: label-only vs factor-head features.

For each data set that stores factors (shapes, scenes) and each classifier (label only; label +
every factor head, the default), at the evaluator's sample count: the real-vs-real floor (mean and
std over 5 resamples), a clean held-out sample, the same images with their colour channels rotated
(R<-G, G<-B, B<-R) and zoomed (central 12x12 scaled back to 16x16 with bilinear interpolation,
objects 1.33x larger), each scored by FD; and every head's held-out score (accuracy or R^2).
A change the features see sits many floor standard deviations above the floor; one they are blind
to sits at the floor. Classifiers are trained in a fresh cache (``--cache``), one torch thread.

    python benchmarks/bench_factor_heads.py --data shapes,scenes --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

NAME = "bench_factor_heads"


def zoom(images):
    import torch.nn.functional as F

    h = images.shape[-1]
    return F.interpolate(images[:, :, 2:h - 2, 2:h - 2], size=(h, h), mode="bilinear", align_corners=False)


def measure(data: str, factor_heads: bool, n: int, cache: str) -> dict:
    import numpy as np

    from probe.quality.classifier import ClassifierConfig
    from probe.quality.metrics import QualityEvaluator, default_n_samples

    t0 = time.perf_counter()
    ev = QualityEvaluator(data, n_samples=n or default_n_samples(data), seed=0, cache_dir=cache,
                          classifier_config=ClassifierConfig(factor_heads=factor_heads))
    floor = ev.floor(n_resamples=5)
    base = ev.heldout[np.random.default_rng(5).choice(len(ev.heldout), ev.n_samples, replace=False)]
    info = ev.classifier_info
    return {"data": data, "classifier": "factor heads" if factor_heads else "label only", "n": ev.n_samples,
            "pool": len(ev.heldout), "floor": floor["fd"], "floor_std": floor["fd_std"],
            "clean": ev.evaluate(base)["fd"], "rgb": ev.evaluate(base[:, [1, 2, 0]])["fd"],
            "zoom": ev.evaluate(zoom(base))["fd"], "heads": info["head_scores"],
            "train_s": info.get("train_seconds"), "wall_s": time.perf_counter() - t0}


def render(rows: list[dict]) -> str:
    def sd(r, key):  # distance above the floor in floor standard deviations
        return (r[key] - r["floor"]) / r["floor_std"] if r["floor_std"] > 0 else float("nan")

    lines = [f"<!-- {NAME}:start -->", "## Metric classifier: label only vs factor heads "
             "(`benchmarks/bench_factor_heads.py`)", "",
             "FD on the classifier's 128-d features, evaluator seed 0, n images per score (the evaluator's default "
             "for the data set unless `--n`), floor = 5 resamples of n held-out images from a pool of the size "
             "shown (resamples overlap when the pool is under 2n, which understates the std). In brackets: floor "
             "standard deviations above the floor's mean. RGB rotation: R<-G, G<-B, B<-R; zoom: central 12x12 "
             "bilinearly scaled to 16x16. Loss of the factor-head classifier: label cross-entropy + mean of the "
             "factor heads' losses (`probe/quality/classifier.py`).", "",
             "| data | classifier | n / pool | floor | clean sample | RGB rotation | zoom 1.33x | train s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['classifier']} | {r['n']} / {r['pool']} | {r['floor']:.2f} +- "
                     f"{r['floor_std']:.2f} | {r['clean']:.2f} ({sd(r, 'clean'):+.0f}) | {r['rgb']:.2f} "
                     f"({sd(r, 'rgb'):+.0f}) | {r['zoom']:.1f} ({sd(r, 'zoom'):+.0f}) | {r['train_s']:.1f} |")
    lines += ["", "Held-out score of every head (accuracy for categorical heads, R^2 for continuous ones):", ""]
    for r in rows:
        heads = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in r["heads"].items())
        lines.append(f"- {r['data']}, {r['classifier']}: {heads}")
    lines += ["", f"Machine: {os.cpu_count()} CPU cores, 1 torch thread, load average {os.getloadavg()[0]:.1f} at the "
              f"end; {time.strftime('%Y-%m-%d')}.", f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shapes,scenes", help="data sets with stored factors, comma-separated")
    p.add_argument("--n", type=int, default=0, help="images per score (0 = the evaluator's default)")
    p.add_argument("--cache", default="", help="classifier cache (default: a new temporary directory)")
    p.add_argument("--json", help="also write the raw rows here")
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cache = args.cache or tempfile.mkdtemp(prefix="factor_heads_")
    rows = [measure(d, heads, args.n, cache) for d in args.data.split(",") if d for heads in (False, True)]
    text = render(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write:
        sys.path.insert(0, os.path.dirname(__file__))
        from results_md import write_section

        write_section(NAME, text)


if __name__ == "__main__":
    main()
