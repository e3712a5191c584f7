"""The CKA family: how similar are two sets of features computed on the same inputs?

Estimators (X is [n, d], Y is [n, e], rows are the same inputs):

- ``linear_cka``           biased linear CKA (Kornblith et al. 2019).
- ``debiased_linear_cka``  linear CKA from the unbiased HSIC estimator (Song et al. 2012); the default,
                           because the biased form is inflated at small n (independent random features
                           score ~0.9 at n=64, d=512). Computed in feature space, without n x n Grams.
- ``minibatch_cka``        unbiased HSIC averaged over aligned minibatches (Nguyen et al. 2021), streams.
- ``rbf_cka``              Gaussian-kernel CKA, bandwidth = factor x median pairwise distance, the median
                           taken as Kornblith et al. do (all n^2 distances, zero diagonal included) or
                           over the off-diagonal pairs only (``bandwidth=``, see BANDWIDTH_RULES).
- ``cknna``                centered kernel nearest-neighbour alignment (Huh et al. 2024): unbiased HSIC of
                           linear kernels restricted to mutual k-nearest-neighbour pairs, as their
                           reference code computes it.
- ``permutation_null``     the same estimator with the rows of Y shuffled: what "no relation" scores.
- ``cka_table``            tidy DataFrame over (layer, sigma) pairs of one or two feature stores.

The linear core (centring, the feature-space products, the unbiased HSIC terms, ``linear_cka`` and
``debiased_linear_cka``) lives in ``probe.features.similarity`` so that training can use it too; this
module re-exports it and builds the estimators, nulls and tables on top.

Numerics: features are centred in float64 before any product (CKNNA excepted: it takes the features
as given, as published), so a large common offset cannot eat the float32 mantissa. Float32/float16
inputs then do their matrix products in float32 over blocks of rows, summed in float64 (half the
time of float64 BLAS; the centred float32 values carry all the information the stored float32
features had). Float64 inputs stay float64 throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from probe.core.errors import UserError
from probe.core.progress import progress_bar
from probe.features.similarity import centre as _centre
from probe.features.similarity import check_pair as _check_pair
from probe.features.similarity import cka_ratio as _ratio
from probe.features.similarity import cross_fro2 as _cross_fro2
from probe.features.similarity import debiased_linear_cka, linear_cka, linear_cka_from_terms
from probe.features.similarity import hsic_u_from_terms as _hsic_u_from_terms
from probe.features.similarity import row_sq_norms as _row_sq_norms
from probe.features.store import FeatureStore, check_aligned

ESTIMATORS = ("debiased", "linear", "minibatch", "rbf", "cknna")
MODES = ("pair", "layers", "sigmas")
ESTIMATOR_TITLES = {
    "debiased": "debiased linear CKA (unbiased HSIC)",
    "linear": "linear CKA (biased)",
    "minibatch": "minibatch linear CKA (unbiased HSIC)",
    "rbf": "RBF CKA",
    "cknna": "CKNNA",
}
# How the RBF bandwidth's median distance is taken; the first is the default.
BANDWIDTH_RULES = {
    "kornblith": "median of all n^2 squared distances, zero diagonal included (Kornblith et al. 2019)",
    "offdiag": "median of the n(n-1)/2 off-diagonal squared distances",
}


class RbfCka(NamedTuple):
    cka: float
    bandwidth_x: float
    bandwidth_y: float


class NullDistribution(NamedTuple):
    mean: float
    p95: float
    values: np.ndarray


# ------------------------------------------------------------------------------------------ basics

@dataclass
class _LinearState:
    """Everything linear CKA needs from one side; row permutations only touch ``xc`` and ``a``."""
    xc: np.ndarray   # centred features [n, d] (float32 or float64)
    a: np.ndarray    # squared row norms = diagonal of the centred linear kernel, float64 [n]
    fro2: float      # ||Xc^T Xc||_F^2 = tr(K K)


class _LinearSummary(NamedTuple):
    """The self terms of a ``_LinearState``: what is kept when its centred features are dropped."""
    a: np.ndarray
    fro2: float


def _self_terms(xc: np.ndarray, form: str = "auto") -> tuple[np.ndarray, float]:
    """(squared row norms, ||Xc^T Xc||_F^2): the per-side work, a d x d product, done once per side."""
    return _row_sq_norms(xc), _cross_fro2(xc, xc, form)


def _linear_state(X: np.ndarray, form: str = "auto", known: _LinearState | _LinearSummary | None = None,
                  overwrite: bool = False) -> _LinearState:
    """Centre X; take the self terms from ``known`` (the same features prepared before) if given."""
    xc = _centre(np.asarray(X), overwrite)
    a, fro2 = (known.a, known.fro2) if known is not None else _self_terms(xc, form)
    return _LinearState(xc, a, fro2)


def hsic_unbiased(K, L) -> float:
    """Unbiased HSIC of two n x n kernel matrices, straight from Song et al. (2012) eq. 5 (O(n^2)):
    [tr(K~ L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2 1'K~L~1/(n-2)] / (n(n-3)), K~ = K with zero diagonal.
    Written with the transposes of eq. 5, so it also holds for non-symmetric (masked) kernels."""
    K = np.array(K, dtype=np.float64)
    L = np.array(L, dtype=np.float64)
    n = K.shape[0]
    if n < 4:
        raise UserError(f"the unbiased HSIC needs at least 4 samples, got n={n}")
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    k1, l1 = K.sum(axis=0), L.sum(axis=1)  # 1'K~ and L~1, so that k1 @ l1 = 1'K~L~1
    value = np.vdot(K, L.T) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 * (k1 @ l1) / (n - 2)
    return float(value / (n * (n - 3)))


# ------------------------------------------------------------------------------------ estimators
# Each estimator is prepare(X) -> state and score(state_x, state_y, perm=None) -> float, so that a
# permutation null and a layer x layer table reuse the per-side work (the d x d self products).
# summary(state) is the small part of a state worth keeping when its big arrays are dropped
# (None: nothing); prepare(X, known=that summary) then skips the per-side products.

class _Estimator:
    def prepare(self, X, known=None, overwrite: bool = False):
        raise NotImplementedError

    def summary(self, state):
        return None


class _LinearEstimator(_Estimator):
    def __init__(self, debiased: bool, form: str = "auto"):
        self.debiased, self.form = debiased, form

    def prepare(self, X, known=None, overwrite: bool = False) -> _LinearState:
        return _linear_state(X, self.form, known, overwrite)

    def summary(self, state: _LinearState) -> _LinearSummary:
        return _LinearSummary(state.a, state.fro2)

    def score(self, sx: _LinearState, sy: _LinearState, perm=None) -> float:
        # A row shuffle of Y changes only the cross term: the self terms (fro2, a) are reused.
        b = sy.a if perm is None else np.take(sy.a, perm)
        cross = _cross_fro2(sx.xc, sy.xc, self.form, perm)
        return linear_cka_from_terms(cross, sx.fro2, sy.fro2, sx.a, b, self.debiased)


@dataclass
class _RbfState:
    kernel: np.ndarray  # centred Gaussian kernel (biased) or the raw kernel (debiased), float64 [n, n]
    bandwidth: float


def _sq_dists(X: np.ndarray) -> np.ndarray:
    xc = _centre(X).astype(np.float64)
    a = np.einsum("ij,ij->i", xc, xc)
    d2 = a[:, None] + a[None, :] - 2.0 * (xc @ xc.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _check_bandwidth_rule(rule: str) -> str:
    if rule not in BANDWIDTH_RULES:
        raise UserError(f"unknown RBF bandwidth rule {rule!r} (choose from {', '.join(BANDWIDTH_RULES)})")
    return rule


class _RbfEstimator(_Estimator):
    """K_ij = exp(-|x_i - x_j|^2 / (2 bandwidth^2)), bandwidth = sigma_factor * sqrt(median d^2).

    Rule "kornblith" is the reference notebook's gram_rbf(x, threshold) (Kornblith et al. 2019,
    "Similarity of Neural Network Representations Revisited"): np.median over the full n x n
    squared-distance matrix, its n zeros on the diagonal included, and threshold = sigma_factor.
    Rule "offdiag" takes the median over distinct pairs only (slightly larger bandwidth).
    """

    def __init__(self, sigma_factor: float = 1.0, debiased: bool = False, bandwidth: str = "kornblith"):
        self.sigma_factor, self.debiased = float(sigma_factor), debiased
        self.rule = _check_bandwidth_rule(bandwidth)

    def prepare(self, X, known=None, overwrite: bool = False) -> _RbfState:
        d2 = _sq_dists(np.asarray(X))
        n = d2.shape[0]
        median_sq = np.median(d2) if self.rule == "kornblith" else np.median(d2[np.triu_indices(n, 1)])
        bandwidth = self.sigma_factor * float(np.sqrt(median_sq))
        if bandwidth <= 0:
            return _RbfState(np.zeros_like(d2), bandwidth)  # all points identical: no signal
        K = np.exp(d2 / (-2.0 * bandwidth**2))
        if not self.debiased:
            K -= K.mean(axis=0, keepdims=True)
            K -= K.mean(axis=1, keepdims=True)  # H K H
        return _RbfState(K, bandwidth)

    def _hsic(self, K, L) -> float:
        return hsic_unbiased(K, L) if self.debiased else float(np.vdot(K, L))

    def score(self, sx: _RbfState, sy: _RbfState, perm=None) -> float:
        L = sy.kernel if perm is None else sy.kernel[np.ix_(perm, perm)]
        return _ratio(self._hsic(sx.kernel, L), self._hsic(sx.kernel, sx.kernel), self._hsic(L, L))


@dataclass
class _KnnState:
    """One side of CKNNA: each row's k neighbours in its linear kernel K = X X^T, and a self term."""
    idx: np.ndarray   # [n, k] columns j != i with the k largest K_ij (ties: lower j first), ascending j
    val: np.ndarray   # [n, k] those K_ij, float64
    self_term: float  # HSIC_u(K o M, K o M) with M this side's own top-k mask


def _hsic_u_sparse(rows_a, cols_a, a, rows_b, cols_b, b, n: int) -> float:
    """Song et al. (2012) eq. 5 for two n x n zero-diagonal matrices given as (row, col, value) lists,
    each (row, col) at most once; neither needs to be symmetric (k-NN masks are not):
    [tr(A B) + (1'A1)(1'B1)/((n-1)(n-2)) - 2 (1'A B 1)/(n-2)] / (n(n-3))."""
    # tr(A B) = sum_ij A_ij B_ji: match A's (i, j) with B's (j, i) through flat keys
    _, ia, ib = np.intersect1d(rows_a * n + cols_a, cols_b * n + rows_b, assume_unique=True, return_indices=True)
    trace = float(a[ia] @ b[ib])
    a_colsum = np.bincount(cols_a, weights=a, minlength=n)  # A' 1
    b_rowsum = np.bincount(rows_b, weights=b, minlength=n)  # B 1
    value = trace + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * float(a_colsum @ b_rowsum) / (n - 2)
    return float(value / (n * (n - 3)))


def _top_k_kernel(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, val) of the k largest off-diagonal entries of each row of x x^T, in blocks of rows.

    Ties at the k-th value go to the lower column index, so the neighbour sets are deterministic
    (torch.topk in the reference leaves tie order unspecified; continuous features have no ties).
    """
    n = x.shape[0]
    idx = np.empty((n, k), dtype=np.int64)
    val = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, 1024):  # never the whole n x n kernel at once
        rows = np.arange(start, min(start + 1024, n))
        K = x[rows] @ x.T
        K[np.arange(rows.size), rows] = -np.inf
        kth = -np.partition(-K, k - 1, axis=1)[:, k - 1:k]   # the k-th largest value of each row
        above = K > kth
        tied = K == kth
        need = k - above.sum(axis=1, keepdims=True)           # how many tied columns to take
        keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
        cols = np.nonzero(keep)[1].reshape(rows.size, k)      # exactly k per row, ascending
        idx[rows], val[rows] = cols, np.take_along_axis(K, cols, axis=1)
    return idx, val


class _CknnaEstimator(_Estimator):
    """CKNNA exactly as published with the Platonic Representation Hypothesis (Huh et al. 2024;
    reference implementation ``AlignmentMetrics.cknna`` in github.com/minyoungg/platonic-rep,
    metrics.py, with its defaults unbiased=True, distance_agnostic=False):

    - linear kernels K = X X^T, L = Y Y^T of the features as given (no centring: the unbiased HSIC
      centres implicitly; the paper's pipeline L2-normalises rows before calling it);
    - M_K[i, j] = 1 if j is among the k largest K[i, :] with the diagonal excluded; M_L likewise;
    - cross term HSIC_u(K o M_K o M_L, L o M_K o M_L), the mutual k-NN pairs of both spaces;
      self terms HSIC_u(K o M_K, K o M_K) and HSIC_u(L o M_L, L o M_L), each with its own mask;
    - HSIC_u is Song et al. (2012) eq. 5 literally, tr(K~ L~) and 1'K~L~1 (the masked kernels are
      not symmetric, so the transposes matter);
    - CKNNA = cross / (sqrt(self_K * self_L) + eps). The reference uses eps = 1e-6 as a guard;
      the default here is 0, so the value does not depend on the scale of the features (on
      L2-normalised rows the guard moves the value by ~2e-4; pass eps=1e-6 to reproduce it).
    Ties at the k-th neighbour go to the lower index (torch.topk leaves their order unspecified).

    Only the n*k masked entries are stored: a row permutation of Y (the null) permutes L's
    neighbour lists and changes only the cross term; the self terms are computed once.
    """

    def __init__(self, k: int = 10, eps: float = 0.0):
        self.k, self.eps = int(k), float(eps)

    def prepare(self, X, known=None, overwrite: bool = False) -> _KnnState:
        x = np.asarray(X, dtype=np.float64)
        n, k = x.shape[0], self.k
        if not 1 <= k < n:
            raise UserError(f"CKNNA needs 1 <= k < n, got k={k}, n={n}")
        idx, val = _top_k_kernel(x, k)
        rows = np.repeat(np.arange(n), k)
        cols, v = idx.ravel(), val.ravel()
        return _KnnState(idx, val, _hsic_u_sparse(rows, cols, v, rows, cols, v, n))

    def score(self, sx: _KnnState, sy: _KnnState, perm=None) -> float:
        if perm is None:
            idx_y, val_y = sy.idx, sy.val
        else:  # row i of Y[perm] is old row perm[i]; old neighbour j is new row inverse[j]
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(perm.size)
            idx_y, val_y = inverse[sy.idx[perm]], sy.val[perm]
        n = sx.idx.shape[0]
        # (i, a, b) with sx.idx[i, a] == idx_y[i, b]: j = that column is a neighbour of i in both spaces
        i, a, b = np.nonzero(sx.idx[:, :, None] == idx_y[:, None, :])
        cols = sx.idx[i, a]
        cross = _hsic_u_sparse(i, cols, sx.val[i, a], i, cols, val_y[i, b], n)
        if self.eps == 0.0:
            return _ratio(cross, sx.self_term, sy.self_term)
        return float(cross / (np.sqrt(sx.self_term * sy.self_term) + self.eps))


def _make_estimator(name: str, **options):
    if name == "debiased":
        return _LinearEstimator(True, options.get("form", "auto"))
    if name == "linear":
        return _LinearEstimator(False, options.get("form", "auto"))
    if name == "rbf":
        return _RbfEstimator(options.get("sigma_factor", 1.0), options.get("debiased", False),
                             options.get("bandwidth", "kornblith"))
    if name == "cknna":
        return _CknnaEstimator(options.get("k", 10), options.get("eps", 0.0))
    raise UserError(f"unknown CKA estimator {name!r} (choose from {', '.join(ESTIMATORS)})")


# ---------------------------------------------------------------------------------- public API
# linear_cka and debiased_linear_cka are probe.features.similarity's (imported above): one implementation
# for the analysis and for the drift measured during training (train/student/drift.py).

def _minibatch_sums(batches_x: Iterable, batches_y: Iterable, n_perm: int = 0, seed: int | Sequence[int] = 0):
    """Sum unbiased HSIC terms over aligned batches; also the cross term with rows shuffled inside
    each batch ``n_perm`` times (self terms do not change under a permutation)."""
    rng = np.random.default_rng(seed)
    est = _LinearEstimator(True)
    hxy = hxx = hyy = 0.0
    null = np.zeros(n_perm)
    used = 0
    for xb, yb in zip(batches_x, batches_y, strict=True):
        xb, yb = _check_pair(xb, yb, min_rows=1)
        if xb.shape[0] < 4:
            continue  # unbiased HSIC is undefined below 4 rows (a short last batch)
        sx, sy = est.prepare(xb), est.prepare(yb)
        n = xb.shape[0]
        hxy += _hsic_u_from_terms(_cross_fro2(sx.xc, sy.xc), float(sx.a @ sy.a), sx.a.sum(), sy.a.sum(), n)
        hxx += _hsic_u_from_terms(sx.fro2, float(sx.a @ sx.a), sx.a.sum(), sx.a.sum(), n)
        hyy += _hsic_u_from_terms(sy.fro2, float(sy.a @ sy.a), sy.a.sum(), sy.a.sum(), n)
        for j in range(n_perm):
            p = rng.permutation(n)
            b = sy.a[p]
            null[j] += _hsic_u_from_terms(_cross_fro2(sx.xc, sy.xc, perm=p), float(sx.a @ b), sx.a.sum(), b.sum(), n)
        used += 1
    if used == 0:
        raise UserError("minibatch CKA got no batch with at least 4 rows")
    return hxy, hxx, hyy, null


def minibatch_cka(batches_x: Iterable, batches_y: Iterable) -> float:
    """Minibatch CKA (Nguyen et al. 2021): mean unbiased HSIC over aligned batches, ratio at the end.

    ``batches_x`` / ``batches_y`` are iterables of aligned [b, d] / [b, e] blocks, e.g.
    ``store.iter_rows(layer, s, 1024, seed=0)`` for both stores. Batches under 4 rows are skipped.
    """
    hxy, hxx, hyy, _ = _minibatch_sums(batches_x, batches_y)
    return _ratio(hxy, hxx, hyy)


def rbf_cka(X, Y, *,
            sigma_factor: float = 1.0,         # bandwidth = this x median pairwise distance
            debiased: bool = False,            # unbiased HSIC instead of Kornblith's biased one
            bandwidth: str = "kornblith",      # how the median is taken: "kornblith" | "offdiag"
            ) -> RbfCka:
    """Gaussian-kernel CKA; bandwidth = ``sigma_factor`` x sqrt(median squared pairwise distance).

    ``bandwidth="kornblith"`` (default) takes the median over all n^2 entries, zero diagonal
    included, as Kornblith et al.'s reference gram_rbf(x, threshold=sigma_factor) does;
    ``"offdiag"`` over distinct pairs only. Returns (cka, bandwidth_x, bandwidth_y). Biased HSIC as
    in Kornblith et al. unless ``debiased``. Builds n x n kernels: keep n to a few thousand.
    """
    X, Y = _check_pair(X, Y, min_rows=4 if debiased else 2)
    est = _RbfEstimator(sigma_factor, debiased, bandwidth)
    sx, sy = est.prepare(X), est.prepare(Y)
    return RbfCka(est.score(sx, sy), sx.bandwidth, sy.bandwidth)


def cknna(X, Y, *,
          k: int = 10,       # neighbours per sample, 1 <= k < n
          eps: float = 0.0,  # added to the denominator; the reference implementation uses 1e-6
          ) -> float:
    """Centered kernel nearest-neighbour alignment with ``k`` neighbours (Huh et al. 2024, "The
    Platonic Representation Hypothesis"), computed as their reference ``metrics.cknna`` does; see
    ``_CknnaEstimator`` for the exact definition. Linear kernels of X and Y as given; needs n >= 4.
    """
    X, Y = _check_pair(X, Y, min_rows=4)
    est = _CknnaEstimator(k, eps)
    return est.score(est.prepare(X), est.prepare(Y))


_BY_FUNCTION: dict[Callable, str] = {linear_cka: "linear", debiased_linear_cka: "debiased", rbf_cka: "rbf",
                                     cknna: "cknna"}


def permutation_null(estimator: str | Callable, X, Y,
                     n_perm: int = 100,   # number of row shuffles of Y
                     seed: int = 0,       # seed of the shuffles
                     **options,           # passed on to the estimator (form, k, eps, sigma_factor, debiased, bandwidth)
                     ) -> NullDistribution:
    """Scores of ``estimator`` with the rows of Y shuffled ``n_perm`` times: the no-relation baseline.

    ``estimator`` is a name from ESTIMATORS (minus "minibatch"), one of this module's functions, or
    any ``f(X, Y) -> float``. Returns (mean, 95th percentile, all values). The per-side work of the
    built-in estimators is done once and reused for every permutation.
    """
    X, Y = _check_pair(X, Y)
    name = estimator if isinstance(estimator, str) else _BY_FUNCTION.get(estimator, estimator)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(X.shape[0]) for _ in range(n_perm)]
    if isinstance(name, str):
        est = _make_estimator(name, **options)
        sx, sy = est.prepare(X), est.prepare(Y)
        values = np.array([est.score(sx, sy, p) for p in perms])
    else:
        values = np.array([float(np.asarray(name(X, Y[p], **options)).ravel()[0]) for p in perms])
    return _null_summary(values)


def _null_summary(values: np.ndarray) -> NullDistribution:
    if values.size == 0:
        return NullDistribution(float("nan"), float("nan"), values)
    return NullDistribution(float(np.mean(values)), float(np.percentile(values, 95)), values)


# ------------------------------------------------------------------------------------ the table

class _StateCache:
    """Prepared per-side states of one estimator, prepared once per (store, layer, sigma).

    Whole states (with the centred features, the big part) are kept least-recently-used within a
    memory budget. The estimator's small summary of every state (linear: row norms and
    ||Xc^T Xc||^2) is kept for good, so a state dropped for memory comes back by reloading and
    centring only, never by recomputing its d x d product. ``prepared`` / ``reloaded`` count both.
    """

    def __init__(self, est: _Estimator, budget_bytes: int):
        self.est, self.budget = est, budget_bytes
        self.items: dict = {}      # key -> (whole state, bytes), least recently used first
        self.summaries: dict = {}  # key -> the estimator's summary of that state
        self.prepared = self.reloaded = 0

    def get(self, key, load):
        if key in self.items:
            self.items[key] = self.items.pop(key)  # mark as recently used
            return self.items[key][0]
        known = self.summaries.get(key)
        state = self.est.prepare(load(), known=known, overwrite=True)  # the loaded array is ours to centre
        if known is None:
            self.prepared += 1
            self.summaries[key] = self.est.summary(state)
        else:
            self.reloaded += 1
        size = sum(v.nbytes for v in vars(state).values() if isinstance(v, np.ndarray))
        self.items[key] = (state, size)
        while len(self.items) > 1 and sum(s for _, s in self.items.values()) > self.budget:
            self.items.pop(next(iter(self.items)))
        return state


def _comparisons(mode: str, layers_a, layers_b, sigma_idx, symmetric: bool):
    """(layer_a, s_a, layer_b, s_b) tuples to compute; with one store, each unordered pair once."""
    out = []
    if mode == "pair":
        return [(la, s, la, s) for la in layers_a for s in sigma_idx]
    if mode == "layers":
        for s in sigma_idx:
            for i, la in enumerate(layers_a):
                for j, lb in enumerate(layers_b):
                    if not symmetric or j >= i:
                        out.append((la, s, lb, s))
        return out
    for la in layers_a:
        for i, sa in enumerate(sigma_idx):
            for j, sb in enumerate(sigma_idx):
                if not symmetric or j >= i:
                    out.append((la, sa, la, sb))
    return out


def _resolve_layers(store: FeatureStore, layers) -> list[str]:
    return list(store.layers) if layers is None else [store.check_layer(name) for name in layers]


def cka_table(store_a: FeatureStore,
              store_b: FeatureStore | None = None,  # second, row-aligned store (model B); needed for "pair"
              mode: str = "pair",                   # "pair" | "layers" | "sigmas", see below
              estimator: str = "debiased",          # one of ESTIMATORS
              layers=None,                          # layer names to use; default all (shared ones for "pair")
              sigmas=None,                          # sigma values to use; default all stored
              n_perm: int = 10,                     # row shuffles for the permutation null per cell; 0 = none
              seed: int = 0,                        # shuffles, row subsets and minibatch order
              progress: bool = False,               # show a rich progress bar
              *,
              batch_rows: int = 1024,               # rows per minibatch (estimator="minibatch")
              max_rows: int = 5000,                 # rbf / cknna: seeded subset of at most this many rows (n x n)
              k: int = 10,                          # neighbours for cknna
              sigma_factor: float = 1.0,            # rbf bandwidth = median distance x this
              bandwidth: str = "kornblith",         # rbf: how that median is taken, a key of BANDWIDTH_RULES
              cache_bytes: int = 2 << 30,           # memory for prepared per-(layer, sigma) states, bytes
              ) -> pd.DataFrame:
    """Tidy table of CKA values between (layer, sigma) feature sets.

    mode "pair":   same layer and sigma in two row-aligned stores (models A and B).
    mode "layers": every layer against every layer at each sigma (within A, or A against B).
    mode "sigmas": every sigma against every sigma within each layer (within A, or A against B).
    ``layers`` / ``sigmas`` restrict to names / sigma values. Columns: mode, estimator, model_a,
    layer_a, sigma_a, model_b, layer_b, sigma_b, cka, null_mean, null_p95, n_perm, n, bandwidth_a,
    bandwidth_b, bandwidth_rule, sigma_factor (rbf only), k (cknna only), seed.
    """
    if mode not in MODES:
        raise UserError(f"unknown CKA mode {mode!r} (choose from {', '.join(MODES)})")
    if estimator not in ESTIMATORS:
        raise UserError(f"unknown CKA estimator {estimator!r} (choose from {', '.join(ESTIMATORS)})")
    if mode == "pair" and store_b is None:
        raise UserError("CKA mode 'pair' compares two models: give a second feature file")
    symmetric = store_b is None
    store_b = store_a if store_b is None else store_b
    if not symmetric:
        check_aligned(store_a, store_b)
    layers_a = _resolve_layers(store_a, layers)
    if mode == "pair" and layers is None:
        layers_a = [name for name in layers_a if name in store_b.layers]
        if not layers_a:
            raise UserError(f"{store_a.path} and {store_b.path} share no layer names")
    layers_b = layers_a if mode != "layers" else _resolve_layers(store_b, layers)
    for name in layers_a if mode != "layers" else []:
        store_b.check_layer(name)
    sigma_idx = list(range(len(store_a.sigmas))) if sigmas is None else [store_a.sigma_index(s) for s in sigmas]

    n = store_a.n_samples
    rows = None
    if estimator in ("rbf", "cknna") and n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    n_used = n if rows is None else rows.size
    if n_used < 4:
        raise UserError(f"CKA needs at least 4 samples, {store_a.path} has {n_used}")

    rbf = estimator == "rbf"
    if rbf:
        _check_bandwidth_rule(bandwidth)
    est = None if estimator == "minibatch" else _make_estimator(estimator, k=k, sigma_factor=sigma_factor,
                                                                  bandwidth=bandwidth)
    cache = None if est is None else _StateCache(est, cache_bytes)

    def state(store, which, layer, s):
        assert cache is not None  # called only for the estimators that prepare states (not "minibatch")
        return cache.get((which, layer, s), lambda: store.load(layer, s, rows))

    # One store: each unordered pair once, then mirrored; CKNNA is not symmetric, so both orders.
    mirror = symmetric and estimator != "cknna"
    todo = _comparisons(mode, layers_a, layers_b, sigma_idx, mirror)
    records = []
    with progress_bar(len(todo), f"CKA ({estimator}, {mode})", enabled=progress) as advance:
        for index, (la, sa, lb, sb) in enumerate(todo):
            perm_seed = [seed, index]
            if est is None:
                batches_a = store_a.iter_rows(la, sa, batch_rows, seed=seed)
                batches_b = store_b.iter_rows(lb, sb, batch_rows, seed=seed)
                hxy, hxx, hyy, null_num = _minibatch_sums(batches_a, batches_b, n_perm, seed=perm_seed)
                scale = np.sqrt(hxx * hyy) if hxx * hyy > 0 else np.nan
                value, null = _ratio(hxy, hxx, hyy), _null_summary(null_num / scale)
                bw = (np.nan, np.nan)
            else:
                sx, sy = state(store_a, "a", la, sa), state(store_b, "b" if not symmetric else "a", lb, sb)
                rng = np.random.default_rng(perm_seed)
                value = est.score(sx, sy)
                null = _null_summary(np.array([est.score(sx, sy, rng.permutation(n_used)) for _ in range(n_perm)]))
                bw = (sx.bandwidth, sy.bandwidth) if estimator == "rbf" else (np.nan, np.nan)
            row = dict(mode=mode, estimator=estimator, model_a=store_a.name, layer_a=la,
                       sigma_a=float(store_a.sigmas[sa]), model_b=store_b.name, layer_b=lb,
                       sigma_b=float(store_b.sigmas[sb]), cka=value, null_mean=null.mean,
                       null_p95=null.p95, n_perm=n_perm, n=n_used, bandwidth_a=bw[0], bandwidth_b=bw[1],
                       bandwidth_rule=bandwidth if rbf else None, sigma_factor=sigma_factor if rbf else np.nan,
                       k=k if estimator == "cknna" else np.nan, seed=seed)
            records.append(row)
            if mirror and (la, sa) != (lb, sb):  # mirror the unordered pair
                records.append({**row, "layer_a": lb, "sigma_a": row["sigma_b"], "layer_b": la,
                                "sigma_b": row["sigma_a"], "bandwidth_a": bw[1], "bandwidth_b": bw[0]})
            advance(1, info=f"{la} σ={store_a.sigmas[sa]:g}")
    return pd.DataFrame.from_records(records)
