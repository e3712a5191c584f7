"""Time the CKA command's path (``cka_table`` on two feature stores) against a plain NumPy reference.

For each N (default 10,000 and 50,000) two row-aligned stores of one D=1,024 float32 layer are
written (Y = 0.3 X[:, ::-1] + noise, with a common offset of 3, as real activations have). Then,
interleaved and best of ``--repeats``:

- ours:      ``cka_table(a, b, mode="pair", estimator="debiased", n_perm=...)``, what ``probe cka``
             runs (reading the stores included);
- reference: the same estimator written plainly in float64 NumPy (Song et al. 2012 unbiased HSIC
             in feature space): read both arrays with h5py, centre, ||Xc^T Yc||^2, ||Xc^T Xc||^2,
             ||Yc^T Yc||^2; its permutation null recomputes only the cross term per shuffle (the
             self terms do not change when Y's rows are shuffled), with the very same permutations.

Printed for each figure: ours, the reference, their ratio, the values (they must agree) and the
BLAS thread count (threadpoolctl). ``--write`` replaces the bench_cka section of RESULTS.md.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_cka.py --write
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
from threadpoolctl import threadpool_info

from analysis.cka import cka_table
from probe.features.store import FORMAT, FORMAT_VERSION, FeatureStore

NAME = "bench_cka"
LAYER = "mid_block"


def write_store(path: str, features: np.ndarray, model: str) -> None:
    """One layer, one sigma, chunked like ``probe extract`` writes (256 rows), no compression."""
    n, d = features.shape
    with h5py.File(path, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, complete=True, model=model,
                       model_sha256="0" * 64, dataset="synthetic", split="test", pooling="mean",
                       noise_seed=0, created_utc="2024-01-01T00:00:00Z", toolkit_version="bench")
        f["sigmas"] = np.array([0.0])
        f["labels"] = np.full(n, -1, np.int64)
        f["sample_ids"] = np.arange(n, dtype=np.int64)
        g = f.create_group("features", track_order=True)
        g.create_dataset(LAYER, data=features[None], chunks=(1, 256, d))


def _hsic_u(cross: float, ab: float, sa: float, sb: float, n: int) -> float:
    """Song et al. (2012) eq. 5 for linear kernels of column-centred features (zero-diagonal form)."""
    return (cross - ab + sa * sb / ((n - 1) * (n - 2)) - 2.0 * ab / (n - 2)) / (n * (n - 3))


def reference(path_a: str, path_b: str, perms) -> tuple[float, np.ndarray]:
    """Plain float64 debiased linear CKA and its permutation null, straight from the formula."""
    with h5py.File(path_a) as fa, h5py.File(path_b) as fb:
        X = fa["features"][LAYER][0].astype(np.float64)
        Y = fb["features"][LAYER][0].astype(np.float64)
    n = X.shape[0]
    X -= X.mean(axis=0)
    Y -= Y.mean(axis=0)
    a, b = np.einsum("ij,ij->i", X, X), np.einsum("ij,ij->i", Y, Y)
    hxx = _hsic_u(float(np.sum((X.T @ X) ** 2)), a @ a, a.sum(), a.sum(), n)
    hyy = _hsic_u(float(np.sum((Y.T @ Y) ** 2)), b @ b, b.sum(), b.sum(), n)
    scale = np.sqrt(hxx * hyy)
    value = _hsic_u(float(np.sum((X.T @ Y) ** 2)), a @ b, a.sum(), b.sum(), n) / scale
    null = [_hsic_u(float(np.sum((X.T @ Y[p]) ** 2)), a @ b[p], a.sum(), b.sum(), n) / scale for p in perms]
    return value, np.array(null)


def ours(path_a: str, path_b: str, n_perm: int):
    with FeatureStore.open(path_a) as a, FeatureStore.open(path_b) as b:
        df = cka_table(a, b, mode="pair", estimator="debiased", n_perm=n_perm, seed=0)
    return float(df.cka.iloc[0]), float(df.null_mean.iloc[0])


def cli(path_a: str, path_b: str, n_perm: int, tmp: str) -> float:
    """Wall seconds of `probe cka A B` in a fresh interpreter (start-up, imports, CSV included)."""
    cmd = [sys.executable, "-c", "from probe.cli import main; main()", "cka", path_a, path_b,
           "--out", os.path.join(tmp, "cka.csv"), "--n-perm", str(n_perm)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def the_perms(n: int, n_perm: int):
    """The permutations cka_table draws for its first cell (seed 0, cell index 0)."""
    rng = np.random.default_rng([0, 0])
    return [rng.permutation(n) for _ in range(n_perm)]


def blas_threads() -> str:
    info = [f"{i.get('internal_api')} {i.get('version')}: {i.get('num_threads')} threads"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(info) or "unknown"


def run(n: int, d: int, n_perms, repeats: int, tmp: str, with_cli: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32) + 3.0
    Y = (0.3 * X[:, ::-1] + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)
    pa, pb = os.path.join(tmp, f"a{n}.h5"), os.path.join(tmp, f"b{n}.h5")
    write_store(pa, X, "A")
    write_store(pb, Y, "B")
    t_gemm = []
    for _ in range(repeats):  # one float32 n x d x d product: the least one null shuffle can cost
        t0 = time.perf_counter()
        X.T @ Y
        t_gemm.append(time.perf_counter() - t0)
    del X, Y
    rows = []
    for n_perm in n_perms:
        perms = the_perms(n, n_perm)
        t_ours, t_ref = [], []
        for _ in range(repeats):  # interleaved, so a busy spell on the shared machine hits both
            t0 = time.perf_counter()
            v_ours, null_ours = ours(pa, pb, n_perm)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            v_ref, null_ref = reference(pa, pb, perms)
            t_ref.append(time.perf_counter() - t0)
        null_ref_mean = float(null_ref.mean()) if n_perm else float("nan")
        t_cli = cli(pa, pb, n_perm, tmp) if with_cli else float("nan")
        row = dict(n=n, d=d, n_perm=n_perm, ours=min(t_ours), ref=min(t_ref), cli=t_cli, gemm=min(t_gemm), value=v_ours,
                   diff=abs(v_ours - v_ref), null_diff=abs(null_ours - null_ref_mean) if n_perm else float("nan"))
        rows.append(row)
        print(f"N={n} D={d} n_perm={n_perm:2d}: ours {row['ours']:.2f} s  reference {row['ref']:.2f} s  "
              f"ratio {row['ours'] / row['ref']:.2f}  CLI {t_cli:.2f} s  value {v_ours:.6f}  |diff| {row['diff']:.1e}  "
              f"null-mean |diff| {row['null_diff']:.1e}  (load avg {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def section(args, rows, threads: str, loads) -> str:
    lines = [f"<!-- {NAME}:start -->",
             "## Debiased linear CKA through `cka_table` vs a plain NumPy reference (`benchmarks/bench_cka.py`)", "",
             f"Two row-aligned stores, one float32 layer, D = {args.d}, Y = 0.3 X[:, ::-1] + noise, offset 3; "
             "uncompressed HDF5, 256-row chunks. *Ours* = `cka_table(a, b, mode=\"pair\", estimator=\"debiased\")` "
             "(what `probe cka` runs; reading the stores included); *CLI* = `probe cka A B --out x.csv "
             "--n-perm ...` in a fresh interpreter, one run (start-up and imports included). "
             "*Reference* = the same estimator in plain "
             "float64 NumPy (h5py read, centre, three d x d products; its null recomputes only the cross term "
             "per shuffle, with the same permutations). "
             f"Best of {args.repeats} interleaved runs, wall seconds. BLAS: {threads}. "
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs "
             f"(load average {min(loads):.1f}-{max(loads):.1f}).", "",
             "| N | D | null shuffles | ours s | reference s (same null) | ours / reference | "
             "ours / reference without null | CLI s | CLI / reference without null | CKA | abs. diff | "
             "null-mean abs. diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bare = next(q["ref"] for q in rows if q["n"] == r["n"] and q["n_perm"] == 0)
        null_diff = "-" if np.isnan(r["null_diff"]) else f"{r['null_diff']:.1e}"
        lines.append(f"| {r['n']:,} | {r['d']:,} | {r['n_perm']} | {r['ours']:.2f} | {r['ref']:.2f} | "
                     f"**{r['ours'] / r['ref']:.2f}** | **{r['ours'] / bare:.2f}** | {r['cli']:.2f} | "
                     f"{r['cli'] / bare:.2f} | {r['value']:.6f} | {r['diff']:.1e} | {null_diff} |")
    lines += ["", "Goal (issue 17): ours <= 1.2 x the reference without the null, and <= 2 x it with the null "
              "included (column 'ours / reference without null').", ""]
    for r in rows:
        if r["n_perm"]:
            bare = next(q for q in rows if q["n"] == r["n"] and q["n_perm"] == 0)
            floor = bare["ours"] + r["n_perm"] * r["gemm"]
            lines.append(f"- N = {r['n']:,}: one float32 {r['n']:,} x {r['d']} x {r['d']} product takes "
                         f"{r['gemm']:.2f} s, and each shuffle needs one (only the cross term changes; the self "
                         f"terms are reused), so ours without null + {r['n_perm']} products = {floor:.2f} s = "
                         f"{floor / bare['ref']:.2f} x the reference without null is the floor of this path "
                         f"with {r['n_perm']} exact shuffles.")
    lines += ["",
              f"Measured {time.strftime('%Y-%m-%d')}.", f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000", help="comma-separated N")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--n-perm", type=int, default=10,
                        help="shuffles of the 'with null' runs (default of probe cka)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-cli", action="store_true", help="skip timing the `probe cka` command itself")
    parser.add_argument("--write", action="store_true", help="replace the bench_cka section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    threads = blas_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; BLAS {threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rows, loads = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows += run(n, args.d, (0, args.n_perm), args.repeats, tmp, not args.no_cli)
            loads.append(os.getloadavg()[0])
    text = section(args, rows, threads, loads)
    print(text)
    if args.write:
        from results_md import write_section  # benchmarks/ is on sys.path when a script runs

        write_section(NAME, text)


if __name__ == "__main__":
    main()
