"""Sample-quality metrics of generators: Fréchet distance, KID, FD-infinity, precision/recall, class coverage.

Measured in the feature space of a small per-data-set classifier (``probe.quality.classifier``), because an
ImageNet Inception network means little on 8x8 digits and its weights cannot be downloaded here.
The numbers are therefore comparable between models evaluated on the same data set with the same
evaluator settings, not to published FIDs; ``inception_fid`` gives the usual Inception FID when the
user has the weights file locally.

Every figure is reported next to a *real-vs-real floor*: real images that the reference set does
not contain, in the same number as the generated samples, scored exactly like a model. A generator
cannot be expected to go below that floor; the distance above it is what matters. FD's floor is
mostly its own small-sample bias (it falls like 1/n), so next to it come two figures that are not
dominated by it: KID, an unbiased estimate (floor ~ 0 at any n), and FD-infinity, the FD
extrapolated to n -> infinity. docs/metric.md explains the figures and their measured resolution.

    ev = QualityEvaluator("digits")          # trains/loads the classifier, precomputes the reference
    ev.floor()                               # {"fd": ..., "fd_std": ..., "precision": ..., ...}
    ev.evaluate(samples)                     # {"fd": ..., "precision": ..., "recall": ..., ...}
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from probe.core.data import load_dataset
from probe.core.errors import UserError
from probe.quality.classifier import ClassifierConfig, load_or_train_classifier, progress_bar
from probe.quality.memorisation import memorisation

METRIC_KEYS = ("fd", "kid", "fd_inf", "precision", "recall", "coverage", "class_entropy")


# ------------------------------------------------------------------------- Fréchet distance
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of features [N, D]."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape [N>=2, D], got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64. When the product
    is singular (dead feature units) or ``sqrtm`` returns a clearly complex result, ``eps`` is added
    to both diagonals (the usual FID practice) and the distance recomputed; small imaginary parts
    left by round-off are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched shapes: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(s1, s2)
    if tr_covmean is None:
        # Offset every term, not only the root: the result is then the exact distance between the
        # slightly regularised Gaussians, so identical inputs still give 0.
        s1, s2 = s1 + np.eye(len(mu1)) * eps, s2 + np.eye(len(mu1)) * eps
        tr_covmean = _trace_sqrt_product(s1, s2, strict=False)
        if tr_covmean is None:
            raise ValueError("matrix square root of the covariance product is not real; "
                             "check the features for NaN or degenerate dimensions")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, strict: bool = True,
                        imag_tol: float = 1e-3) -> float | None:
    """tr((s1 s2)^(1/2)), or None when sqrtm's result is not finite or has a large imaginary part.

    ``strict``: also fail when sqrtm warns that the product is singular (dead feature units do
    that), so the caller retries with the eps offset instead of printing a warning per call.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error" if strict else "ignore", scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(s1 @ s2)
        except (scipy.linalg.LinAlgWarning, np.linalg.LinAlgError):
            return None
    if not np.all(np.isfinite(covmean)):
        return None
    if np.iscomplexobj(covmean):
        # A PSD product has a real root; imaginary parts beyond round-off mean a near-singular product.
        scale = max(1.0, float(np.abs(np.trace(covmean.real))))
        if np.max(np.abs(np.diag(covmean.imag))) > imag_tol * scale:
            return None
        covmean = covmean.real
    return float(np.trace(covmean))


# ---------------------------------------------------------------------- KID and FD-infinity
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef)^degree for all pairs of rows, [len(x), len(y)]; gamma None = 1/D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices (Gretton et al. 2012, eq. 3): the within-set means leave
    out the diagonal (k(x_i, x_i) is no sample of E k(x, x') for independent x, x'); sets may differ in size."""
    m, n = len(k_xx), len(k_yy)
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 points per set, got {m} and {n}")
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid(fake: np.ndarray, real: np.ndarray,
        subsets: int = 100,                  # random subset pairs averaged (Binkowski et al. use 100)
        subset_size: int = 1000,             # points per subset; capped at the smaller set
        seed: int = 0,                       # subset choice
        real_kernel: np.ndarray | None = None,  # precomputed polynomial_kernel(real, real), to reuse
        ) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) on given features: mean and std of MMD^2.

    Each of ``subsets`` rounds draws ``subset_size`` points of each set without replacement and
    computes the unbiased MMD^2 with the cubic kernel (x.y/D + 1)^3; returns the mean over rounds
    and their (population) std, as Binkowski et al. and torchmetrics do. Unbiased: its expectation
    is the population MMD^2 whatever the sample size (so 0 for two samples of one distribution; a
    single value may be negative). When ``subset_size`` covers a whole set, that set is the same
    in every round and the std measures only the other set's resampling.
    """
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    m, n = len(fake), len(real)
    s = min(int(subset_size), m, n)
    if s < 2:
        raise ValueError(f"KID needs at least 2 points per set, got {m} and {n}")
    k_ff = polynomial_kernel(fake, fake)
    k_rr = polynomial_kernel(real, real) if real_kernel is None else real_kernel
    k_fr = polynomial_kernel(fake, real)
    rng = np.random.default_rng(seed)
    # Subsets as 0/1 indicator columns: a subset's kernel sum is then s^T K s, so all rounds cost
    # three matrix products instead of `subsets` copies of sub-matrices.
    sel_f, sel_r = np.zeros((m, subsets)), np.zeros((n, subsets))
    for j in range(subsets):
        sel_f[rng.choice(m, s, replace=False) if s < m else slice(None), j] = 1.0
        sel_r[rng.choice(n, s, replace=False) if s < n else slice(None), j] = 1.0
    ff = np.einsum("ij,ij->j", sel_f, k_ff @ sel_f) - np.diag(k_ff) @ sel_f
    rr = np.einsum("ij,ij->j", sel_r, k_rr @ sel_r) - np.diag(k_rr) @ sel_r
    fr = np.einsum("ij,ij->j", sel_f, k_fr @ sel_r)
    values = (ff + rr) / (s * (s - 1)) - 2.0 * fr / (s * s)
    return float(values.mean()), float(values.std())


FD_INF_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def fd_infinity(fake: np.ndarray, real: np.ndarray,
                fractions: tuple[float, ...] = FD_INF_FRACTIONS,  # sub-sample sizes, share of each set
                draws: int = 2,                  # random sub-samples per fraction below 1 (FD averaged)
                seed: int = 0,                   # sub-sample choice
                ) -> dict:
    """FD extrapolated to infinitely many samples (Chong & Forsyth 2020, "FID-infinity").

    The FD of finite samples is biased upwards by a term that, to first order, falls like 1/n for
    each set (E FD_n ~ FD_inf + a/n_fake + b/n_real). Here both sets are sub-sampled to the same
    share t of their size, so the bias is (a/N_fake + b/N_real)/t, linear in 1/n_fake = 1/(t N_fake);
    an ordinary least-squares line of FD against 1/n_fake over ``fractions`` is extrapolated to
    1/n -> 0. Chong & Forsyth keep the (50k-image) reference whole; sub-sampling it too removes the
    reference's own bias, which is not small with a reference of about a thousand images.
    The 1/n law holds when n is well above the feature dimension (n >= 2 D is a reasonable floor).

    Returns ``{"fd_inf", "slope", "ns", "fds"}`` (slope: FD units x samples).
    """
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    if len(fractions) < 2 or not all(0 < t <= 1 for t in fractions):
        raise ValueError(f"fractions must be at least two shares in (0, 1], got {fractions}")
    rng = np.random.default_rng(seed)
    ns, fds = [], []
    for t in sorted(fractions):
        n_f, n_r = max(2, round(t * len(fake))), max(2, round(t * len(real)))
        values = []
        for _ in range(1 if t >= 1 else draws):
            f = fake if n_f >= len(fake) else fake[rng.choice(len(fake), n_f, replace=False)]
            r = real if n_r >= len(real) else real[rng.choice(len(real), n_r, replace=False)]
            values.append(frechet_distance(*feature_stats(f), *feature_stats(r)))
        ns.append(n_f)
        fds.append(float(np.mean(values)))
    slope, intercept = np.polyfit(1.0 / np.array(ns, np.float64), np.array(fds), 1)
    return {"fd_inf": float(intercept), "slope": float(slope), "ns": ns, "fds": fds}


# ----------------------------------------------------------------------- precision / recall
def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point of the same set."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs at least k+1={k + 1} points, got {len(features)}")
    nn = NearestNeighbors(n_neighbors=k + 1).fit(features)
    dist, _ = nn.kneighbors(features)  # column 0 is the point itself (distance 0)
    return dist[:, k]


def in_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray,
                chunk: int = 1024) -> np.ndarray:
    """For each query: does it lie in at least one ball (support[j], radii[j])? Boolean [Q]."""
    inside = np.empty(len(queries), dtype=bool)
    for start in range(0, len(queries), chunk):  # chunks bound memory at chunk x len(support)
        d = cdist(queries[start:start + chunk], support)
        inside[start:start + chunk] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision: share of fake points inside the real manifold (union of balls around each real
    point reaching its k-th real neighbour); recall: share of real points inside the fake manifold.
    ``real_radii`` may pass precomputed ``knn_radii(real, k)``.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = in_manifold(fake, real, real_radii).mean()
    recall = in_manifold(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------- class coverage
def class_histogram(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of predictions per class, float64 [num_classes], summing to 1."""
    counts = np.bincount(np.asarray(predicted, np.int64), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


def class_coverage(predicted: np.ndarray, num_classes: int, class_prior: np.ndarray | None = None,
                   min_share: float = 0.5) -> float:
    """Fraction of classes that receive at least ``min_share`` of their expected share of predictions.

    Class c counts as covered when share_c >= min_share * prior_c, with prior_c its frequency in the
    training data (uniform when not given). 1.0: every class generated at >= half its rate; 1/K:
    the generator collapsed to one class. This is *class* coverage, not the "coverage" of Naeem et
    al. 2020.
    """
    prior = np.full(num_classes, 1.0 / num_classes) if class_prior is None else np.asarray(class_prior)
    return float((class_histogram(predicted, num_classes) >= min_share * prior).mean())


def class_entropy(predicted: np.ndarray, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over log(num_classes): 1 uniform, 0 one class."""
    p = class_histogram(predicted, num_classes)
    p = p[p > 0]
    if num_classes < 2:
        return 0.0
    return float(-(p * np.log(p)).sum() / math.log(num_classes)) + 0.0  # + 0.0 turns -0.0 into 0.0


# -------------------------------------------------------------------------------- evaluator
MAX_DEFAULT_SAMPLES = 2000      # measured floor spreads, docs/metric.md and benchmarks/RESULTS.md
SAMPLE_STEP = 250


def default_n_samples(dataset_name: str) -> int:
    """Samples per score for ``probe eval`` and the health check when the user gives none.

    ``MAX_DEFAULT_SAMPLES`` (2000) where the data set allows it, else the largest multiple of 250
    that still leaves a reference of at least n train images and a held-out pool of 1.5 n (digits:
    1797 images, so 500). The measured floor spreads behind the 2000 are in docs/metric.md.
    """
    n_train, n_test = len(load_dataset(dataset_name, "train")), len(load_dataset(dataset_name, "test"))
    fit = min(n_train, (n_train + n_test) / 2.5)  # n_reference >= n and a pool of 1.5 n
    return int(max(SAMPLE_STEP, min(MAX_DEFAULT_SAMPLES, fit // SAMPLE_STEP * SAMPLE_STEP)))


class QualityEvaluator:
    """Scores generated images against a fixed real reference set, in classifier feature space.

    Protocol (the same for models and for the floor, so the two are comparable):
    - reference set: ``n_reference`` images of the *train* split, chosen by ``seed``; its feature
      statistics, k-NN radii and the train class frequencies are precomputed once.
    - held-out pool: every other real image (the rest of the train split plus the whole test
      split), never part of the reference.
    - a score uses exactly ``n_samples`` images: FD, KID and FD-infinity between their features and
      the reference's, precision/recall (k-NN, ``k``) against the reference, class coverage and entropy of their
      predicted classes. ``floor()`` scores ``n_samples`` held-out real images instead of samples,
      ``n_resamples`` times, and reports mean and std.

    By default ``n_reference`` leaves a held-out pool of 1.5 x ``n_samples`` images so resamples
    of the floor differ (digits, n_samples=500: 1047 reference, 750 pool), capped at the train
    split and at 10,000. Keep ``seed`` and the sizes fixed across runs that are compared: they
    define the reference. FD from few samples is biased upwards, which is why only numbers with
    the same ``n_samples`` may be compared.
    """

    def __init__(self, dataset_name: str,
                 n_samples: int = 500,                   # images per score (generated or floor)
                 n_reference: int | None = None,         # reference images (train split); None = see above
                 k: int = 3,                             # neighbours of the precision/recall manifolds
                 seed: int = 0,                          # picks the reference subset and floor resamples
                 cache_dir: str | os.PathLike | None = None,  # classifier cache; None = default_cache_dir()
                 classifier_config: ClassifierConfig | None = None,  # None = ClassifierConfig()
                 device: str | torch.device = "cpu",    # where the classifier runs
                 progress: bool = False):                # rich progress bar while training the classifier
        train, test = load_dataset(dataset_name, "train"), load_dataset(dataset_name, "test")
        self.dataset_name, self.n_samples, self.k, self.seed = dataset_name, int(n_samples), int(k), seed
        self.shape = tuple(train.images.shape[1:])
        self.num_classes = train.num_classes
        self.classifier, self.classifier_info = load_or_train_classifier(
            dataset_name, classifier_config, cache_dir, progress, train=train, test=test)
        self.classifier.to(device)

        n_real = len(train) + len(test)
        if n_reference is None:
            n_reference = min(10_000, len(train), n_real - math.ceil(1.5 * self.n_samples))
        self.n_reference = int(n_reference)
        if self.n_samples <= self.k:
            raise UserError(f"n_samples={self.n_samples} must exceed k={k}")
        if not self.k < self.n_reference <= len(train) or n_real - self.n_reference < self.n_samples:
            raise UserError(f"{dataset_name} has {len(train)} train + {len(test)} test images: too few for "
                            f"n_reference={self.n_reference} plus a disjoint held-out pool of "
                            f"n_samples={self.n_samples}; lower n_samples or n_reference")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(train)))
        self.heldout = torch.cat([train.images[order[self.n_reference:]], test.images])
        self.heldout_labels = torch.cat([train.labels[order[self.n_reference:]], test.labels])
        reference = train.images[order[:self.n_reference]]
        # Whole splits, for the memorisation check: a model trains on the train split, never on test.
        self.train_images, self.test_images = train.images, test.images
        self._split_features: tuple[np.ndarray, np.ndarray] | None = None

        self.ref_features, _ = self.classifier.features_and_predictions(reference)
        with threadpool_limits(1):  # see _score
            self.ref_mu, self.ref_sigma = feature_stats(self.ref_features)
            self.ref_radii = knn_radii(self.ref_features, self.k)
            self.ref_kernel = polynomial_kernel(self.ref_features, self.ref_features)
        self.class_prior = class_histogram(train.labels[train.labels >= 0].numpy(), self.num_classes)
        self._floors: dict[int, dict] = {}

    @property
    def info(self) -> dict:
        """Settings that define the numbers (for a run's config.json / metrics header)."""
        return {"dataset": self.dataset_name, "n_samples": self.n_samples, "n_reference": self.n_reference,
                "n_heldout": len(self.heldout), "k": self.k, "seed": self.seed,
                "classifier_test_accuracy": self.classifier_info["test_accuracy"],
                "classifier_heads": self.classifier_info.get("head_scores"),  # every factor head's test score
                "classifier_path": self.classifier_info["path"]}

    def _check(self, samples) -> torch.Tensor:
        x = torch.as_tensor(samples).detach().float().cpu()
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise UserError(f"samples must have shape [n, {', '.join(map(str, self.shape))}] for "
                            f"{self.dataset_name}, got {list(x.shape)}")
        if len(x) < self.n_samples:
            raise UserError(f"got {len(x)} samples, the evaluator needs n_samples={self.n_samples} "
                            f"(scores from fewer samples are not comparable with the floor)")
        # Diverged generators produce NaN/inf: map them to mid-grey/extremes so they score badly
        # instead of crashing the training loop; [-1, 1] is the data range the classifier knows.
        return torch.nan_to_num(x[:self.n_samples], nan=0.0).clamp(-1.0, 1.0)

    def _score(self, images: torch.Tensor) -> dict:
        feats, preds = self.classifier.features_and_predictions(images)
        # One BLAS thread: the matrices are small (128-d), and on a busy 2-core machine two
        # threads made one evaluation 15x slower (3 s instead of 0.2 s, measured).
        with threadpool_limits(1):
            mu, sigma = feature_stats(feats)
            fd = frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)
            # Fixed subset seed: every model is scored on the same reference subsets (common random numbers).
            kid_value, kid_subset_std = kid(feats, self.ref_features, seed=self.seed, real_kernel=self.ref_kernel)
            fd_inf = fd_infinity(feats, self.ref_features, seed=self.seed)["fd_inf"]
            precision, recall = precision_recall(self.ref_features, feats, self.k, self.ref_radii)
        return {"fd": fd, "kid": kid_value, "kid_subset_std": kid_subset_std, "fd_inf": fd_inf,
                "precision": precision, "recall": recall,
                "coverage": class_coverage(preds, self.num_classes, self.class_prior),
                "class_entropy": class_entropy(preds, self.num_classes), "n": len(images)}

    def evaluate(self, samples: torch.Tensor) -> dict:
        """Scores of generated images [n >= n_samples, C, H, W] in [-1, 1] (the first n_samples are used).

        Returns ``{"fd", "kid", "kid_subset_std", "fd_inf", "precision", "recall", "coverage",
        "class_entropy", "n"}``; ``kid_subset_std`` is KID's std over reference subsets (see ``kid``).
        """
        return self._score(self._check(samples))

    def memorisation(self, samples: torch.Tensor, n_subsets: int = 5) -> dict:
        """Nearest-neighbour copy check of samples against the train split vs the test split.

        ``{"pixel": {...}, "features": {...}}`` with the figures of ``probe.quality.memorisation``
        (nn_ratio ~ 1 and copy_share ~ 0.01: no copying), in pixel space and classifier feature space.
        """
        x = self._check(samples)
        if self._split_features is None:
            self._split_features = (self.classifier.features_and_predictions(self.train_images)[0],
                                    self.classifier.features_and_predictions(self.test_images)[0])
        feats = self.classifier.features_and_predictions(x)[0]
        with threadpool_limits(1):
            return {"pixel": memorisation(x.numpy(), self.train_images.numpy(), self.test_images.numpy(),
                                          n_subsets, seed=self.seed),
                    "features": memorisation(feats, *self._split_features, n_subsets, seed=self.seed)}

    def floor_draws(self, n_resamples: int = 5) -> list[np.ndarray]:
        """Rows of the held-out pool that each floor resample scores.

        Disjoint blocks of one permutation when the pool holds ``n_resamples`` x ``n_samples``
        images (scenes: 10,000), so the resamples' spread is not shrunk by shared images;
        otherwise independent draws without replacement, which share images (digits: 500 of 750)."""
        rng = np.random.default_rng([self.seed, 1])  # independent of the reference choice
        n, pool = self.n_samples, len(self.heldout)
        if pool >= n_resamples * n:
            order = rng.permutation(pool)
            return [order[i * n:(i + 1) * n] for i in range(n_resamples)]
        return [rng.choice(pool, n, replace=False) for _ in range(n_resamples)]

    def floor(self, n_resamples: int = 5) -> dict:
        """Real-vs-real floor: held-out real images scored like a model, mean and std over resamples.

        Returns ``{"fd", "fd_std", "precision", "precision_std", ..., "n", "n_resamples"}``; cached.
        """
        if n_resamples not in self._floors:
            scores = [self._score(self.heldout[rows]) for rows in self.floor_draws(n_resamples)]
            out: dict = {}
            for key in METRIC_KEYS:
                values = np.array([s[key] for s in scores])
                out[key] = float(values.mean())
                out[f"{key}_std"] = float(values.std(ddof=1)) if n_resamples > 1 else 0.0
            self._floors[n_resamples] = {**out, "n": self.n_samples, "n_resamples": n_resamples}
        return dict(self._floors[n_resamples])


# ---------------------------------------------------------------------------- Inception FID
INCEPTION_SIZE = 299            # input resolution of Inception-v3


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [N, C, H, W] -> uint8 [N, 3, 299, 299]: grey replicated, bilinear resize."""
    x = torch.as_tensor(images).float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"images must be [N, 1 or 3, H, W], got {list(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    # Quantise to 8-bit after resizing, the input both torch-fidelity and the TF reference expect.
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _TorchScriptExtractor:
    """Calls a TorchScript Inception; ``return_features=True`` when its forward takes it (NVlabs'
    and clean-fid's ``inception-2015-12-05.pt`` do: float input in [0, 255], 2048-d pool3 output)."""

    def __init__(self, module):
        self.module = module
        names = [a.name for a in module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in names else {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float(), **self.kwargs)


def load_inception_extractor(weights_path: str | os.PathLike, device: str | torch.device = "cpu"):
    """An Inception feature extractor from a local file (never downloaded).

    Accepted files: (1) a TorchScript module (e.g. ``inception-2015-12-05.pt``), needs nothing else;
    (2) torch-fidelity's InceptionV3 state dict (``weights-inception-2015-12-05-6726825d.pth``),
    needs ``pip install torch-fidelity`` (imported only here). The file is unpickled: load only
    files you trust. Returns a callable uint8 [B, 3, 299, 299] -> features [B, D].
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights file {path} does not exist (it is never downloaded)")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these files use
            warnings.simplefilter("ignore", DeprecationWarning)
            return _TorchScriptExtractor(torch.jit.load(str(path), map_location=device).eval())
    except RuntimeError:
        pass  # not TorchScript: try torch-fidelity's state-dict format below
    try:
        # optional: only Inception state dicts need torch-fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError(f"{path} is not a TorchScript file; reading an Inception state dict needs "
                        f"torch-fidelity (pip install torch-fidelity)") from None
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(path))
    except Exception as e:  # wrong keys or a foreign file: the user's file, not a bug here
        raise UserError(f"could not load {path} as torch-fidelity Inception weights: {e}") from None
    return model.to(device)


@torch.no_grad()
def inception_features(images: torch.Tensor, extractor, batch_size: int = 50,
                       device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Features [N, D] (float64) of images in [-1, 1] from an extractor taking uint8 [B, 3, 299, 299]."""
    feats = []
    n_batches = math.ceil(len(images) / batch_size)
    with progress_bar(progress, "Inception features", n_batches) as advance:
        for start in range(0, len(images), batch_size):
            out = extractor(to_inception_input(images[start:start + batch_size]).to(device))
            out = out[0] if isinstance(out, (tuple, list)) else out  # torch-fidelity returns a tuple
            feats.append(out.reshape(len(out), -1).double().cpu())
            advance()
    return torch.cat(feats).numpy()


def inception_fid(samples: torch.Tensor, real: torch.Tensor,
                  weights_path: str | os.PathLike | None = None,  # local file, see load_inception_extractor
                  extractor=None,                       # or callable uint8 [B,3,299,299] -> [B,D]; wins
                  batch_size: int = 50,                 # images per forward pass
                  device: str | torch.device = "cpu",   # where the extractor runs
                  progress: bool = False) -> float:     # rich progress bar over batches
    """FID between two image sets in [-1, 1] in an Inception feature space (2048-d pool3 by default).

    Images are resized to 299x299 (bilinear) and grey ones replicated to RGB before extraction, so
    on small images the value is comparable within this toolkit rather than to published FIDs.
    """
    if extractor is None:
        if weights_path is None:
            raise UserError("Inception FID needs a local weights file (weights_path) or an extractor")
        extractor = load_inception_extractor(weights_path, device)
    if len(samples) < 2 or len(real) < 2:
        raise UserError("Inception FID needs at least 2 images in each set")
    mu1, s1 = feature_stats(inception_features(samples, extractor, batch_size, device, progress))
    mu2, s2 = feature_stats(inception_features(real, extractor, batch_size, device, progress))
    return frechet_distance(mu1, s1, mu2, s2)
