"""What a finished (or half-finished) grid shows: summary, curves, aggregate, features and the verdict.

Reads the run directories that ``train.ablation.run`` writes and never trains anything. Writes
``summary.csv`` (one row per run), ``curves.csv`` (tidy: run, step, metric, value; the feature-drift rows,
metric "cka", also fill layer and sigma), ``aggregate.csv``
(mean, std, bootstrap CI per init x method x metric; ``memorisation.json`` caches the copy check of
runs whose eval.json predates it, see ``run_memorisation``), ``verdict.json`` / ``verdict.txt`` (the declared
contrasts, analysis/verdict.py) and, when the grid asks for features, ``features/*.h5``,
``cka_teacher_student.csv``, ``probes.csv``, ``cka_step0.csv`` (CKA to the teacher of every student's
step-0 init, analysis/step0.py) and ``attribution.json`` / ``attribution.txt`` (analysis/attribution.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.attribution import attribute, attribution_ready
from analysis.cka import cka_table
from analysis.linear import probe_table
from analysis.step0 import step0_cka, step0_columns
from analysis.verdict import Verdict, mean_ci, verdict
from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import read_metrics, write_json
from probe.features.extract import extract_features
from probe.features.store import FeatureStore
from train.ablation.grid import AGG_METRICS, CURVE_METRICS, Grid, _fields
from train.ablation.run import init_sources, run_name, student_status, teacher_path
from train.student.drift import parse_key as drift_key
from train.student.loop import StudentConfig, one_step_samples

# -------------------------------------------------------------------------------- tables
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)     # fd_at_<step>: the evaluation steps nearest these fractions of the budget
THRESHOLDS = {"steps_to_150pct": 1.5, "steps_to_110pct": 1.1}   # x the teacher's own FD (reference.json)
PLATEAU_TAIL = 0.25                     # plateau rule: the last quarter of the evaluations (at least two) ...
PLATEAU_FLOOR_SD = 2.0                  # ... span at most this many floor standard deviations
TREND_TAIL = 0.5                        # fd_trend: a straight line through the last half of the evaluations
# memorisation of the final samples (probe.quality.memorisation): column -> (space, figure)
MEMO_COLUMNS = {"nn_ratio_pixel": ("pixel", "nn_ratio"), "nn_ratio_features": ("features", "nn_ratio"),
                "copy_share_pixel": ("pixel", "copy_share"), "copy_share_features": ("features", "copy_share")}


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Beside the target, then renamed: a reader (the status view, a report) never sees half a table.
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval_fd" in r]


def budget_steps(steps: int, eval_every: int) -> list[int]:
    """Evaluation steps nearest 25 / 50 / 100% of the budget (ties go to the later step), without repeats."""
    if steps <= 0 or eval_every <= 0:
        return []
    schedule = sorted(set(range(eval_every, steps + 1, eval_every)) | {steps})
    out = []
    for f in BUDGET_FRACTIONS:
        best = min(schedule, key=lambda s: (abs(s - f * steps), -s))
        if best not in out:
            out.append(best)
    return out


def curve_figures(fds: list, steps: int, eval_every: int, reference_fd: float = float("nan"),
                  floor_std: float = float("nan"),
                  stopped_at: int | None = None,   # step where the run stopped at its plateau; None = ran on
                  ) -> dict:
    """Learning-curve columns of one run from its [(step, FD)] evaluations (docs/verdict.md).

    A run stopped early at its plateau (StudentConfig.plateau_tol) holds its last FD to the budget at
    every ``eval_every`` step: the stop rule says its evaluations stayed within the tolerance, so it is
    compared with runs that went on at the same budget instead of getting NaN columns.

    fd_at_<s>        FD at the evaluation steps of ``budget_steps`` (NaN where the run has none yet)
    fd_auc           area under FD against log10(1 + step) from step 0 to the budget, divided by the
                     width log10(1 + steps): a mean FD over log-steps (NaN unless the curve spans both)
    steps_to_150pct  first evaluation step with FD <= 1.5 x the teacher's own FD; NaN = not reached
    steps_to_110pct  the same at 1.1 x (NaN also when the teacher's figure is unknown)
    fd_tail          mean FD over the last quarter of the evaluations after step 0 (at least two), the
                     plateau rule's tail: an end-of-run figure less at the mercy of one evaluation than
                     fd_final when a curve still swings (NaN unless the run reached the budget)
    plateau          1 when the last quarter of the evaluations after step 0 (at least two) span
                     <= 2 x the floor's standard deviation, 0 when not, NaN when it cannot be told
    plateau_spread   that span (max - min), FD units
    fd_trend         change in FD over the last half of the evaluations after step 0 (at least three) on a
                     least-squares line: < 0 = still improving; NaN unless the run reached the budget
    fd_trend_se      its standard error from the line's residuals, so that a curve that swings without
                     a direction (|fd_trend| <= 2 x fd_trend_se) is told from one still moving
    """
    curve = sorted({int(s): float(v) for s, v in fds if v is not None and math.isfinite(v)}.items())
    if stopped_at is not None and curve and curve[-1][0] == int(stopped_at) < steps and eval_every > 0:
        held = range(int(stopped_at) + eval_every, steps + eval_every, eval_every)
        curve += [(min(s, steps), curve[-1][1]) for s in held]
    at = dict(curve)
    row = {f"fd_at_{s}": at.get(s, np.nan) for s in budget_steps(steps, eval_every)}
    span = [(s, v) for s, v in curve if s <= steps]
    if span and span[0][0] == 0 and span[-1][0] >= steps and len(span) > 1:
        x = np.log10(1.0 + np.array([s for s, _ in span], float))
        y = np.array([v for _, v in span])
        row["fd_auc"] = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / x[-1])
    else:
        row["fd_auc"] = np.nan
    for col, k in THRESHOLDS.items():
        hit = [s for s, v in curve if v <= k * reference_fd] if math.isfinite(reference_fd) else []
        row[col] = float(hit[0]) if hit else np.nan
    after = [v for s, v in span if s > 0]
    n_tail = max(2, math.ceil(PLATEAU_TAIL * len(after)))
    if span and span[-1][0] >= steps and len(after) >= n_tail:
        tail = after[-n_tail:]
        row["fd_tail"] = float(np.mean(tail))
        row["plateau_spread"] = float(max(tail) - min(tail))
        row["plateau"] = (float(row["plateau_spread"] <= PLATEAU_FLOOR_SD * floor_std) if math.isfinite(floor_std)
                          else np.nan)
    else:
        row["fd_tail"], row["plateau_spread"], row["plateau"] = np.nan, np.nan, np.nan
    row["fd_trend"], row["fd_trend_se"] = _trend([(s, v) for s, v in span if s > 0], steps)
    return row


def _trend(curve: list[tuple[int, float]], steps: int) -> tuple[float, float]:
    """(change over the window, its standard error) of a least-squares line through the last half of ``curve``.

    The plateau rule asks for a band of 2 floor stds, which a curve far above the teacher's figure that
    swings by hundreds never meets; the trend says whether such a curve is still moving or only swinging.
    """
    tail = curve[-max(3, math.ceil(TREND_TAIL * len(curve))):]
    if not curve or curve[-1][0] < steps or len(tail) < 3:
        return np.nan, np.nan
    x = np.array([s for s, _ in tail], float)
    y = np.array([v for _, v in tail], float)
    width = x[-1] - x[0]
    # by hand, not scipy's linregress: that gives a NaN error for a flat line (a run held at its plateau), 0 here
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se_slope = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return float(slope * width), float(se_slope * width)


def with_curve_figures(summary: pd.DataFrame, steps: int, eval_every: int, reference: dict | None) -> pd.DataFrame:
    """The learning-curve columns of ``curve_figures`` recomputed from a summary's ``fd_curve`` column
    (for tables written before those columns existed; the runs themselves are not read)."""
    reference = reference or {}
    ref_fd = float(reference.get("fd", np.nan))
    floor_std = float((reference.get("floor") or {}).get("fd_std", np.nan))
    figures = [curve_figures(json.loads(c) if isinstance(c, str) else [], steps, eval_every, ref_fd, floor_std)
               for c in summary["fd_curve"]]
    extra = pd.DataFrame.from_records(figures, index=summary.index)
    return pd.concat([summary.drop(columns=[c for c in extra.columns if c in summary.columns]), extra], axis=1)


def memorisation_columns(m: dict | None) -> dict:
    """The ``MEMO_COLUMNS`` of one memorisation record (``{"pixel": {...}, "features": {...}}``); NaN when absent."""
    m = m or {}
    return {col: float((m.get(space) or {}).get(key, np.nan)) for col, (space, key) in MEMO_COLUMNS.items()}


def final_samples(run_dir: Path, n: int, seed: int) -> torch.Tensor:
    """The n samples a finished student run's final evaluation scored: its saved (EMA) generator on the
    latents the training loop draws for evaluation (train/student/loop.py: ``z_eval``, seed ``eval_seed``),
    on the CPU (a run trained on a GPU differs only by round-off)."""
    model = load_model(run_dir, "cpu")
    if model.generator is None:
        raise UserError(f"{run_dir} holds no one-step generator")
    shape = (max(n, 64), model.channels, model.resolution, model.resolution)  # drawn as the loop draws them
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        return one_step_samples(model.generator.denoiser, model.generator.sigma_init, z, "cpu")


class MemorisationCache:
    """The copy check of runs whose eval.json does not record it (runs trained before it existed),
    computed once from the run's final generator and kept in ``<grid>/memorisation.json`` under the
    generator's weights hash and the evaluator's settings, so a rerun of the analysis does not redo it.
    One QualityEvaluator per (data set, n, seed) is shared by all runs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            self.entries = {}  # a damaged cache is recomputed, never trusted
        self.evaluators: dict = {}
        self.changed = False

    def evaluator(self, dataset: str, n: int, seed: int):
        from probe.quality.metrics import QualityEvaluator  # loads (or trains) the metric classifier

        if (dataset, n, seed) not in self.evaluators:
            self.evaluators[(dataset, n, seed)] = QualityEvaluator(dataset, n_samples=n, seed=seed)
        return self.evaluators[(dataset, n, seed)]

    def get(self, name: str, run_dir: Path, final: dict) -> dict | None:
        ev = final.get("evaluator") or {}
        if not ev.get("dataset") or not ev.get("n_samples"):
            return None  # an eval.json without its evaluator settings: nothing to reproduce
        dataset, n, seed = ev["dataset"], int(ev["n_samples"]), int(ev.get("seed", 0))
        key = {"model_sha256": load_model(run_dir, "cpu").sha256(), "dataset": dataset, "n": n, "seed": seed,
               "classifier": Path(str(ev.get("classifier_path", ""))).stem}
        entry = self.entries.get(name)
        if entry is not None and entry.get("key") == key:
            return entry["memorisation"]
        result = self.evaluator(dataset, n, seed).memorisation(final_samples(run_dir, n, seed))
        self.entries[name] = {"key": key, "memorisation": result}
        self.changed = True
        return result

    def save(self) -> None:
        if self.changed:
            write_json(self.path, self.entries)
            self.changed = False


def run_memorisation(run_dir: Path, final: dict, cache: MemorisationCache | None = None) -> dict | None:
    """The memorisation record of a finished run: eval.json's own (``memorisation``, written at the end of
    training) when it has one, else computed from the saved generator through ``cache``; None without either."""
    if final.get("memorisation"):
        return final["memorisation"]
    if cache is None:
        return None
    try:
        return cache.get(Path(run_dir).name, Path(run_dir), final)
    except (UserError, OSError):  # a run that no longer loads: NaN columns, the tables are still written
        return None


def summarise_run(run_dir: Path, steps: int,
                  eval_every: int = 0,         # the grid's evaluation interval (0 = no fd_at_<step> columns)
                  reference: dict | None = None,  # reference.json: the teacher's FD and the floor
                  memo: MemorisationCache | None = None,  # computes the copy check eval.json lacks; None = NaN
                  ) -> tuple[dict, list[dict]]:
    """(summary row, tidy curve rows) of one student run."""
    rows = _eval_rows(run_dir)
    status = student_status(run_dir, steps)
    final = json.loads((run_dir / "eval.json").read_text()) if status == "done" else (rows[-1] if rows else {})
    get = (lambda k: final.get(k, np.nan)) if status == "done" else (lambda k: final.get(f"eval_{k}", np.nan))
    fds = [(r["step"], r["eval_fd"]) for r in rows if r.get("eval_fd") is not None and math.isfinite(r["eval_fd"])]
    best = min(fds, key=lambda t: t[1]) if fds else (np.nan, np.nan)
    reference = reference or {}
    stopped_at = (final.get("stopped_early") or {}).get("step") if status == "done" else None
    row = {"status": status, "steps_done": rows[-1]["step"] if rows else 0,
           "fd_final": get("fd"), "fd_best": best[1], "fd_best_step": best[0],
           "precision_final": get("precision"), "recall_final": get("recall"), "coverage_final": get("coverage"),
           **memorisation_columns(run_memorisation(run_dir, final, memo) if status == "done" else None),
           "fd_start": rows[0]["eval_fd"] if rows and rows[0]["step"] == 0 else np.nan,
           **curve_figures(fds, steps, eval_every, float(reference.get("fd", np.nan)),
                           float((reference.get("floor") or {}).get("fd_std", np.nan)), stopped_at),
           "stopped_at": np.nan if stopped_at is None else stopped_at,
           "cka_start": np.nan,   # step-0 feature similarity: filled by write_tables from cka_step0.csv
           "seconds": final.get("seconds", rows[-1].get("seconds", np.nan) if rows else np.nan),
           "fd_curve": json.dumps([[s, round(v, 6)] for s, v in fds]), **init_sources(run_dir)}
    curve = [{"step": r["step"], "metric": m, "value": r[f"eval_{m}"]} for r in rows for m in CURVE_METRICS
             if f"eval_{m}" in r]
    # feature drift logged at the same evaluations (train/student/drift.py): metric "cka", per layer and sigma
    curve += [{"step": r["step"], "metric": "cka", "layer": key[0], "sigma": key[1], "value": v}
              for r in rows for k, v in r.items() if (key := drift_key(k)) is not None]
    return row, curve


def aggregate(summary: pd.DataFrame,
              n_boot: int = 2000,   # bootstrap resamples of each mean
              seed: int = 0,        # bootstrap seed
              ) -> pd.DataFrame:
    """Tidy mean, std and bootstrap 95% CI per (init, init_group, method, metric) over finished runs."""
    done = summary[summary["status"] == "done"]
    curve_cols = [c for c in summary.columns
                  if c in ("fd_start", "cka_start", "fd_auc", "fd_tail", "plateau", "fd_trend")
                  or c.startswith(("fd_at_", "steps_to_"))]
    records = []
    for (init, group, method), g in done.groupby(["init", "init_group", "method"], sort=False):
        memo_cols = [c for c in MEMO_COLUMNS if c in g.columns]
        for metric in [m for m in AGG_METRICS if m in g.columns] + memo_cols + curve_cols:
            v = g[metric].to_numpy(float)
            v = v[np.isfinite(v)]
            lo, hi = mean_ci(v, n_boot, seed)
            records.append(dict(init=init, init_group=group, method=method, metric=metric, n=int(v.size),
                                mean=float(v.mean()) if v.size else np.nan,
                                std=float(v.std(ddof=1)) if v.size > 1 else np.nan, ci_low=lo, ci_high=hi))
    return pd.DataFrame.from_records(records, columns=["init", "init_group", "method", "metric", "n", "mean", "std",
                                                      "ci_low", "ci_high"])


def write_tables(out: Path, grid: Grid, refs: dict) -> pd.DataFrame:
    """summary.csv, curves.csv and aggregate.csv from the run directories; returns the summary."""
    steps = int(grid.student.get("steps", _fields(StudentConfig)["steps"].default))
    eval_every = int(grid.student.get("eval_every", _fields(StudentConfig)["eval_every"].default))
    ref_path = out / "reference.json"
    reference = json.loads(ref_path.read_text()) if ref_path.exists() else None
    start = step0_columns(out)   # {run: {"cka_start": .., "cka_start_s<sigma>": ..}} when step-0 features exist
    rows, curves = [], []
    memo = MemorisationCache(out / "memorisation.json")
    for entry in grid.inits:
        for method in grid.methods:
            for seed in grid.seeds_of(entry):
                name = run_name(entry.label, method, seed)
                run_dir = out / "runs" / name
                keys = {"run": name, "init": entry.label, "init_spec": entry.spec, "init_group": entry.group,
                        "method": method, "seed": seed}
                row, curve = summarise_run(run_dir, steps, eval_every, reference, memo)
                row.update(start.get(name, {}))
                rows.append({**keys, **row, "run_dir": str(run_dir)})
                curves += [{**keys, **c} for c in curve]
    memo.save()
    summary = pd.DataFrame.from_records(rows)
    _write_csv(summary, out / "summary.csv")
    _write_csv(pd.DataFrame.from_records(curves, columns=["run", "init", "init_spec", "init_group", "method", "seed",
                                                          "step", "metric", "value", "layer", "sigma"]),
               out / "curves.csv")
    _write_csv(aggregate(summary), out / "aggregate.csv")
    return summary


# ------------------------------------------------------------------------------ features
def run_ablation_features(out: Path, grid: Grid, refs: dict, summary: pd.DataFrame, progress: bool = False) -> None:
    """Features of the teacher and of every finished student, as denoisers on the same inputs.

    Writes ``features/teacher.h5`` and ``features/<run>.h5`` (same data, sigmas and noise seed, so
    rows align), ``cka_teacher_student.csv`` (debiased linear CKA per layer and sigma, teacher vs
    student) and, when ``[extract] probes`` is true, ``probes.csv`` (linear-probe accuracy of the
    label per layer and sigma, for the teacher and each student).
    """
    opts = grid.extract
    fdir = Path(out) / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    device = grid.student.get("device", "auto")
    teacher = teacher_path(grid, refs)
    data = grid.data or _dataset_of(teacher)

    def features(model, name: str) -> Path:
        args = dict(data=data, layers=tuple(opts["layers"]), sigmas=tuple(opts["sigmas"]), out=str(fdir / f"{name}.h5"),
                    progress=progress, n_samples=int(opts["n_samples"]), split=opts["split"],
                    noise_seed=int(opts["noise_seed"]), batch=int(opts["batch"]), source="denoiser", device=device)
        try:  # a finished file of the same model and options is reused, a partial one resumed
            return extract_features(model, **args)
        except UserError as e:
            # the file is this directory's own derived data: when the model was trained further or the
            # [extract] options changed, replace it instead of refusing as `probe extract` does for users
            if "holds another extraction" not in str(e):
                raise
            return extract_features(model, overwrite=True, **args)

    t_path = features(teacher, "teacher")
    cka_rows, probe_rows = [], []
    keys = ["run", "init", "init_group", "method", "seed"]
    with FeatureStore.open(t_path) as t_store:
        if opts["probes"]:
            probe_rows.append(probe_table(t_store, targets=["label"]).assign(
                run="teacher", init="(teacher)", init_group="reference", method="", seed=-1))
        for _, r in summary[summary["status"] == "done"].iterrows():
            path = features(r["run_dir"], r["run"])
            with FeatureStore.open(path) as s_store:
                table = cka_table(t_store, s_store, mode="pair", estimator="debiased", n_perm=10)
                columns = ["layer", "sigma", "cka", "null_mean", "null_p95", "n_perm", "estimator", "n"]
                cka_rows.append(table.rename(columns={"layer_a": "layer", "sigma_a": "sigma"})[columns]
                                .assign(**{k: r[k] for k in keys}))
                if opts["probes"]:
                    probe_rows.append(probe_table(s_store, targets=["label"]).assign(**{k: r[k] for k in keys}))
    front = keys + ["layer", "sigma"]
    if cka_rows:
        cka = pd.concat(cka_rows, ignore_index=True)
        _write_csv(cka[front + [c for c in cka.columns if c not in front]], Path(out) / "cka_teacher_student.csv")
    if probe_rows:
        probes = pd.concat(probe_rows, ignore_index=True)
        _write_csv(probes[front + [c for c in probes.columns if c not in front]], Path(out) / "probes.csv")


def _dataset_of(model_path: str) -> str:
    info = Path(model_path) / "model.json"
    name = json.loads(info.read_text()).get("dataset") if info.exists() else None
    if not name:
        raise UserError(f"{model_path} does not record its data set; set data = ... in the grid")
    return name


def analyse_grid(out: Path, grid: Grid, refs: dict, progress: bool = False) -> Verdict:
    """Tables, features (when the grid asks for them) and the verdict of a grid directory."""
    out = Path(out)
    if grid.features:   # step-0 CKA to the teacher first: write_tables puts it into summary.csv
        step0_cka(out, grid, refs, progress=progress)
    summary = write_tables(out, grid, refs)
    if grid.features:
        run_ablation_features(out, grid, refs, summary, progress=progress)
    ref_path = out / "reference.json"
    reference = json.loads(ref_path.read_text()) if ref_path.exists() else None
    result = verdict(summary, reference=reference, contrasts=grid.contrasts or None)
    write_json(out / "verdict.json", result.to_dict())
    _write_text(out / "verdict.txt", result.text() + "\n")
    if attribution_ready(summary):
        fit = attribute(summary)
        write_json(out / "attribution.json", fit.to_dict())
        _write_text(out / "attribution.txt", fit.text() + "\n")
    return result
