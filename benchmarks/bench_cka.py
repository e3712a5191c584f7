"""Time the debiased linear CKA: feature-space form vs the straightforward Gram form, side by side.

1. N=50,000 x D=1,024 float32 features (target < 5 s on two cores) with the toolkit's
   ``debiased_linear_cka`` (float64 centring, float32 block products summed in float64), and the
   same data cast to float64 first (all-float64 BLAS) to show what the float32 products save and
   that both agree.
2. At N=10,000 (n x n float64 Grams, 800 MB each): the direct Gram-form estimator of Song et al.
   (``hsic_unbiased`` on K = X X^T, L = Y Y^T) against the fast form on the same rows, with the
   difference of the two values.

Timings are the best of ``--repeats`` runs, because the machine may be shared.
Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_cka.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from analysis.cka import debiased_linear_cka, hsic_unbiased


def best_time(fn, repeats: int):
    """(best wall seconds, CPU seconds of that run summed over threads, value)."""
    runs, value = [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(runs)
    return wall, cpu, value


def gram_form_debiased(X: np.ndarray, Y: np.ndarray) -> float:
    """The textbook route: float64 n x n linear kernels, then Song et al.'s estimator three times."""
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    K, L = X @ X.T, Y @ Y.T
    return hsic_unbiased(K, L) / np.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--n-gram", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.n, args.d), dtype=np.float32) + 3.0  # an offset, as real activations have
    Y = (0.3 * X[:, ::-1] + rng.standard_normal((args.n, args.d), dtype=np.float32)).astype(np.float32)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load avg {os.getloadavg()[0]:.1f}")
    t_fast, c_fast, v_fast = best_time(lambda: debiased_linear_cka(X, Y), args.repeats)
    print(f"fast debiased CKA, N={args.n} D={args.d} float32: {t_fast:.2f} s wall ({c_fast:.2f} s CPU)  "
          f"value {v_fast:.6f}")
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    t_64, c_64, v_64 = best_time(lambda: debiased_linear_cka(X64, Y64), args.repeats)
    print(f"fast debiased CKA, same numbers in float64:   {t_64:.2f} s wall ({c_64:.2f} s CPU)  "
          f"value {v_64:.6f}  |diff| {abs(v_fast - v_64):.2e}")
    del X64, Y64

    m = args.n_gram
    Xs, Ys = X[:m], Y[:m]
    t_gram, c_gram, v_gram = best_time(lambda: gram_form_debiased(Xs, Ys), 1)
    t_small, c_small, v_small = best_time(lambda: debiased_linear_cka(Xs, Ys), args.repeats)
    print(f"Gram-form debiased CKA (float64), N={m}:      {t_gram:.2f} s wall ({c_gram:.2f} s CPU)  "
          f"value {v_gram:.6f}")
    print(f"fast debiased CKA, N={m}:                     {t_small:.2f} s wall ({c_small:.2f} s CPU)  "
          f"value {v_small:.6f}  |diff| {abs(v_gram - v_small):.2e}  speed-up x{t_gram / t_small:.0f}")
    print(f"load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
