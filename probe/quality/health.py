"""Metric health: does the metric rank known degradations of real images in the right order?

Before a comparison of two models is trusted, the metric has to show that it sees the kinds of
error models make and that its steps are larger than its noise. ``metric_health`` takes one
sample of held-out real images (the same images at every rung, so the rungs differ only by the
degradation) and degrades it along four families:

- ``noise``       additive Gaussian noise, std 0.1, 0.2, 0.4 (data range [-1, 1]);
- ``blur``        Gaussian blur, std 0.5, 1.0, 2.0 pixels;
- ``colour``      a colour shift: +0.1, +0.2, +0.4 on every channel of grey images, or along
                  (+1, 0, -1) (redder and less blue) on RGB images;
- ``drop``        a mode-dropping sampler: the images of one class (and then of half the classes)
                  replaced by held-out images of the other classes, so the sample never shows them
                  (a rung is left out when the held-out pool has too few images of the other classes).

Every metric (FD, KID, FD-infinity) must rise with each rung, starting from the clean sample;
``monotone`` records whether it does. The report also holds the real-vs-real floor with its spread,
the sample counts and the classifier's held-out score per head (label accuracy, and each stored
factor's accuracy or R^2, see ``probe.quality.classifier``). ``probe eval --health DATA`` prints it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from probe.quality.metrics import QualityEvaluator, default_n_samples

HEALTH_METRICS = ("fd", "kid", "fd_inf")
NOISE_STDS = (0.1, 0.2, 0.4)
BLUR_STDS = (0.5, 1.0, 2.0)          # pixels
COLOUR_SHIFTS = (0.1, 0.2, 0.4)


def gaussian_blur(images: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian blur (std in pixels, radius 3 std capped at the image size), edges replicated."""
    radius = max(1, min(math.ceil(3 * std), images.shape[-1] - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / std) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def colour_shift(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Shift every pixel's colour by ``amount`` (grey: brighter; RGB: along (+1, 0, -1)), clamped."""
    direction = torch.ones(images.shape[1]) if images.shape[1] != 3 else torch.tensor([1.0, 0.0, -1.0])
    return (images + amount * direction.view(1, -1, 1, 1)).clamp(-1, 1)


def add_noise(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(-1, 1)


def drop_classes(base_idx: np.ndarray, labels: np.ndarray, dropped: np.ndarray, rng: np.random.Generator,
                 max_repeats: float = 0.1) -> np.ndarray | None:
    """Indices like ``base_idx`` with every image of a ``dropped`` class replaced by an unused image
    of another class. When the pool runs short, up to ``max_repeats`` x n replacements repeat an
    image of the other classes; beyond that (or with no other class left) None: no such rung."""
    keep = ~np.isin(labels[base_idx], dropped)
    others = np.flatnonzero(~np.isin(labels, dropped) & (labels >= 0))
    spare = np.setdiff1d(others, base_idx[keep])
    missing = int((~keep).sum())
    if len(others) == 0 or missing - len(spare) > max_repeats * len(base_idx):
        return None
    fresh = rng.choice(spare, min(missing, len(spare)), replace=False)
    repeats = rng.choice(others, missing - len(fresh), replace=True)
    out = base_idx.copy()
    out[~keep] = np.concatenate([fresh, repeats]).astype(out.dtype)
    return out


def metric_health(dataset: str,
                  n_samples: int | None = None,   # images per score; None = the eval default for the data set
                  seed: int = 0,                   # evaluator reference, base sample, noise and dropped classes
                  n_resamples: int = 5,            # floor resamples
                  evaluator=None,                  # a QualityEvaluator to reuse (its n_samples then wins)
                  progress: bool = False) -> dict:
    """The degradation ladder, floor and settings of one data set's metric (see the module doc).

    Returns ``{"dataset", "n_samples", "n_reference", "n_heldout", "classifier_test_accuracy",
    "classifier_heads": {head: test score}, "classifier_info", "floor", "clean",
    "ladder": [{"family", "level", "strength", "fd", "kid", "fd_inf", ...}], "monotone": {metric: bool}, "seconds"}``.
    """
    start = time.perf_counter()
    if evaluator is None:
        n = n_samples if n_samples is not None else default_n_samples(dataset)
        evaluator = QualityEvaluator(dataset, n_samples=n, seed=seed, progress=progress)
    n = evaluator.n_samples
    rng = np.random.default_rng([seed, 2])   # apart from the floor's and the reference's streams
    labels = evaluator.heldout_labels.numpy()
    base_idx = rng.choice(len(evaluator.heldout), n, replace=False)
    base = evaluator.heldout[base_idx]

    def score(images):
        r = evaluator.evaluate(images)
        return {k: r[k] for k in (*HEALTH_METRICS, "precision", "recall", "coverage")}

    rungs = [("noise", s, add_noise(base, s, seed + i)) for i, s in enumerate(NOISE_STDS)]
    rungs += [("blur", s, gaussian_blur(base, s)) for s in BLUR_STDS]
    rungs += [("colour", s, colour_shift(base, s)) for s in COLOUR_SHIFTS]
    classes = np.unique(labels[labels >= 0])
    order = rng.permutation(classes)
    for n_drop in sorted({1, max(1, len(classes) // 2)}):
        idx = drop_classes(base_idx, labels, order[:n_drop], rng)
        if idx is not None:
            rungs.append(("drop", n_drop, evaluator.heldout[idx]))
    clean = score(base)
    ladder = [{"family": fam, "level": sum(r[0] == fam for r in rungs[:i]) + 1, "strength": strength,
               **score(images)} for i, (fam, strength, images) in enumerate(rungs)]
    monotone = {}
    for metric in HEALTH_METRICS:
        ok = True
        for fam in dict.fromkeys(r["family"] for r in ladder):
            values = [clean[metric]] + [r[metric] for r in ladder if r["family"] == fam]
            ok &= all(b > a for a, b in zip(values, values[1:]))
        monotone[metric] = bool(ok)
    return {"dataset": evaluator.dataset_name, "n_samples": n, "n_reference": evaluator.n_reference,
            "n_heldout": len(evaluator.heldout), "seed": evaluator.seed,
            "classifier_test_accuracy": evaluator.classifier_info["test_accuracy"],
            "classifier_heads": classifier_heads(evaluator.classifier_info),
            "classifier_info": {k: evaluator.classifier_info.get(k) for k in ("key", "heads", "train_seconds")},
            "dropped_classes": [int(c) for c in order[:max(1, len(classes) // 2)]],
            "floor": evaluator.floor(n_resamples), "clean": clean, "ladder": ladder, "monotone": monotone,
            "seconds": round(time.perf_counter() - start, 2)}


def classifier_heads(info: dict) -> dict:
    """Head -> held-out test score of the metric classifier (label accuracy first; factor heads give
    accuracy or R^2); entries cached before factor heads existed have only the label."""
    return dict(info.get("head_scores") or {"label": info.get("test_accuracy")})


def format_heads(info: dict, heads: dict | None = None) -> str:
    """``label acc 0.998, colour acc 1.000, size R^2 0.943, ...`` from the classifier's info."""
    kinds = {h["name"]: h["kind"] for h in info.get("heads") or []}
    parts = []
    for name, score in (heads if heads is not None else classifier_heads(info)).items():
        what = "R^2" if kinds.get(name) == "continuous" else "acc"
        parts.append(f"{name} {what} {score:.3f}" if score is not None else f"{name} {what} -")
    return ", ".join(parts)


def format_health(r: dict) -> str:
    """The ladder as a text table, then the floor, sample counts and classifier accuracy."""
    f = r["floor"]
    lines = [f"metric health of {r['dataset']}: n = {r['n_samples']} samples per score, reference "
             f"{r['n_reference']} train images, held-out pool {r['n_heldout']}; classifier test accuracy "
             f"{r['classifier_test_accuracy']:.4f}",
             f"classifier heads on the test split (each stored factor has one; features = their shared "
             f"penultimate layer): {format_heads(r.get('classifier_info') or {}, r.get('classifier_heads'))}",
             f"real-vs-real floor over {f['n_resamples']} resamples: FD {f['fd']:.2f} +- {f['fd_std']:.2f}   "
             f"KID {f['kid']:.3f} +- {f['kid_std']:.3f}   FD-inf {f['fd_inf']:.2f} +- {f['fd_inf_std']:.2f}",
             f"{'rung':<22}{'FD':>10}{'KID':>10}{'FD-inf':>10}{'precision':>11}{'recall':>8}"]
    rows = [("clean (held-out)", r["clean"])]
    names = {"noise": "noise std {}", "blur": "blur {} px", "colour": "colour shift {}",
             "drop": "drop {} class(es)"}
    rows += [(names[x["family"]].format(x["strength"]), x) for x in r["ladder"]]
    for name, x in rows:
        # A rung within 2 floor std of the floor mean cannot be told from real data by that metric alone.
        hidden = [m for m in HEALTH_METRICS if x[m] <= f[m] + 2 * f[f"{m}_std"]]
        lines.append(f"{name:<22}{x['fd']:>10.2f}{x['kid']:>10.3f}{x['fd_inf']:>10.2f}"
                     f"{x['precision']:>11.3f}{x['recall']:>8.3f}"
                     + (f"   within floor + 2 std: {', '.join(hidden)}" if hidden and name[:5] != "clean" else ""))
    bad = [m for m, ok in r["monotone"].items() if not ok]
    lines.append("every metric ranks every family monotonically (same base images at every rung)" if not bad else
                 f"NOT monotone: {', '.join(bad)} (the metric cannot resolve some rungs at this n)")
    return "\n".join(lines)
