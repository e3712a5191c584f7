"""Linear CKA of two feature matrices: the numeric core of ``analysis.cka``, kept here (layer 2) so that
training (layer 3, ``train/student/drift.py``) can measure feature similarity with the same code.

X is [n, d], Y is [n, e], rows are the same inputs. With column-centred Xc, Yc and the linear kernels
K = Xc Xc^T, L = Yc Yc^T, everything is computed in feature space, without n x n matrices:

- tr(K L) = ||Xc^T Yc||_F^2 (``cross_fro2``), the diagonal of K = squared row norms (``row_sq_norms``);
- biased linear CKA (Kornblith et al. 2019) = tr(K L) / sqrt(tr(K K) tr(L L));
- debiased linear CKA = the same ratio of unbiased HSIC estimates (Song et al. 2012, eq. 5,
  ``hsic_u_from_terms``); the toolkit's default, since the biased form is inflated at small n.

Numerics: features are centred in float64 before any product (``centre``), so a large common offset cannot
eat the float32 mantissa. Float32/float16 inputs then do their matrix products in float32 over blocks of
rows, summed in float64; float64 inputs stay float64 throughout.
"""

from __future__ import annotations

import numpy as np

from probe.core.errors import UserError

BLOCK_ROWS = 16384  # rows per matmul block: float32 partial sums stay short, float64 sums across blocks
NORM_ROWS = 1024    # rows per float64 block of the row norms: small blocks reuse freed memory, while
                    # large fresh allocations page-fault on every call (0.6 s instead of 0.04 s at 50k x 1024)


def check_pair(X, Y, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """X and Y as arrays, refused (UserError) unless both are 2-D with the same number of rows >= min_rows."""
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise UserError(f"features must be 2-D [samples, dims], got shapes {X.shape} and {Y.shape}")
    if X.shape[0] != Y.shape[0]:
        raise UserError(f"X and Y must hold the same samples (rows): {X.shape[0]} vs {Y.shape[0]}")
    if X.shape[0] < min_rows:
        why = " (the unbiased HSIC divides by n-3)" if min_rows >= 4 else ""
        raise UserError(f"CKA needs at least {min_rows} samples{why}, got n={X.shape[0]}")
    return X, Y


def matmul_dtype(X: np.ndarray):
    return np.float32 if X.dtype in (np.float16, np.float32) else np.float64


def centre(X: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Column-centred features in the matmul dtype; the mean is accumulated in float64.

    For float32 the float64 mean is split into a float32 head and tail and subtracted in two steps:
    each step rounds at the scale of the centred value, so the result matches float64 centring
    followed by a cast (within an ulp) at a quarter of the memory traffic. ``overwrite`` centres a
    float32/float64 array in place (the caller's own copy, e.g. just read from a store).
    """
    mean = np.mean(X, axis=0, dtype=np.float64)
    in_place = overwrite and X.dtype == matmul_dtype(X) and X.flags.writeable
    if matmul_dtype(X) == np.float64:
        return np.subtract(X, mean, out=X) if in_place else np.subtract(X, mean, dtype=np.float64)
    head = mean.astype(np.float32)
    tail = (mean - head).astype(np.float32)
    out = np.subtract(X, head, out=X) if in_place else np.subtract(X, head, dtype=np.float32)
    out -= tail
    return out


def row_sq_norms(Xc: np.ndarray) -> np.ndarray:
    """Squared row norms in float64 [n]: the diagonal of the centred linear kernel."""
    out = np.empty(Xc.shape[0], dtype=np.float64)
    for start in range(0, Xc.shape[0], NORM_ROWS):
        block = Xc[start:start + NORM_ROWS].astype(np.float64)
        out[start:start + NORM_ROWS] = np.einsum("ij,ij->i", block, block)
    return out


def cross_fro2(Xc: np.ndarray, Yc: np.ndarray, form: str = "auto", perm=None) -> float:
    """||Xc^T Yc[perm]||_F^2 = tr(K L) for linear kernels, in feature space or via n x n Grams.

    ``perm`` (a row order of Yc, for the permutation null) is applied block by block, so no
    shuffled copy of Yc is ever made; np.take gathers rows ~5x faster than fancy indexing.
    """
    n, d = Xc.shape
    e = Yc.shape[1]
    if form == "auto":
        form = "feature" if d * e <= n * (d + e) else "gram"
    if form == "gram":
        x64 = Xc.astype(np.float64)  # n is small here: float64 is cheap
        y64 = (Yc if perm is None else np.take(Yc, perm, axis=0)).astype(np.float64)
        return float(np.vdot(x64 @ x64.T, y64 @ y64.T))
    if form != "feature":
        raise UserError(f"unknown CKA form {form!r} (use auto, feature or gram)")
    G = np.zeros((d, e), dtype=np.float64)
    same = Xc is Yc and perm is None  # lets numpy use the symmetric rank-k update (half the flops)
    for start in range(0, n, BLOCK_ROWS):
        xb = Xc[start:start + BLOCK_ROWS]
        if same:
            yb = xb
        elif perm is None:
            yb = Yc[start:start + BLOCK_ROWS]
        else:
            yb = np.take(Yc, perm[start:start + BLOCK_ROWS], axis=0)
        G += xb.T @ yb
    return float(np.vdot(G, G))


def hsic_u_from_terms(fro2: float, ab: float, sum_a: float, sum_b: float, n: int) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) for column-centred linear kernels.

    With K = Xc Xc^T and K~ = K with zero diagonal: tr(K~ L~) = ||Xc^T Yc||^2 - a.b, and centring
    gives K 1 = 0, so K~ 1 = -a and 1^T K~ 1 = -sum(a). Nothing n x n is ever formed.
    """
    return (fro2 - ab + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (n * (n - 3))


def cka_ratio(num: float, den_x: float, den_y: float) -> float:
    """num / sqrt(den_x den_y); NaN when a side has no variance (the similarity is undefined)."""
    den = den_x * den_y
    return float(num / np.sqrt(den)) if den > 0 else float("nan")


def linear_cka_from_terms(cross: float, fro2_x: float, fro2_y: float, a: np.ndarray, b: np.ndarray,
                          debiased: bool) -> float:
    """Linear CKA from its sufficient statistics: cross = ||Xc^T Yc||^2, fro2_* = ||Xc^T Xc||^2 and
    ||Yc^T Yc||^2, a / b = squared row norms of Xc / Yc (row-aligned with the cross term)."""
    if not debiased:
        return cka_ratio(cross, fro2_x, fro2_y)  # the 1/(n-1)^2 of HSIC cancels
    n = a.shape[0]
    hxy = hsic_u_from_terms(cross, float(a @ b), a.sum(), b.sum(), n)
    hxx = hsic_u_from_terms(fro2_x, float(a @ a), a.sum(), a.sum(), n)
    hyy = hsic_u_from_terms(fro2_y, float(b @ b), b.sum(), b.sum(), n)
    return cka_ratio(hxy, hxx, hyy)


def _linear(X, Y, form: str, debiased: bool) -> float:
    xc, yc = centre(X), centre(Y)
    return linear_cka_from_terms(cross_fro2(xc, yc, form), cross_fro2(xc, xc, form), cross_fro2(yc, yc, form),
                                 row_sq_norms(xc), row_sq_norms(yc), debiased)


def linear_cka(X, Y, *,
               form: str = "auto",   # "feature" (d x e products) | "gram" (n x n) | "auto" (the cheaper)
               ) -> float:
    """Biased linear CKA (Kornblith et al. 2019) of X [n, d] and Y [n, e]."""
    X, Y = check_pair(X, Y)
    return _linear(X, Y, form, debiased=False)


def debiased_linear_cka(X, Y, *,
                        form: str = "auto",   # "feature" | "gram" | "auto" (the cheaper); same value
                        ) -> float:
    """Linear CKA from the unbiased HSIC estimator (default estimator of the toolkit); needs n >= 4."""
    X, Y = check_pair(X, Y, min_rows=4)
    return _linear(X, Y, form, debiased=True)
