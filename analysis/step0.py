"""Step-0 feature similarity: CKA to the teacher of every student's initial weights, before any step.

The student loop does not keep its step-0 weights, but ``train.init.initialise_generator`` is
deterministic in (spec, teacher, seed) and leaves the global RNG alone, so the analysis rebuilds
each run's initial generator exactly as ``train.student.loop`` does, extracts its features as a
denoiser on the same noisy inputs as the teacher's (``features/teacher.h5``, the grid's [extract]
options) and writes debiased linear CKA per layer and sigma to ``cka_step0.csv``. Runs whose
initial weights are identical (teacher or ``from:`` inits, whatever the seed) are extracted once.
``step0_columns`` turns the table into the summary's ``cka_start`` (mean over layers and sigmas) and
``cka_start_s<sigma>`` (mean over layers) columns. Nothing here trains; the model written for the
extraction is deleted afterwards (its features stay in ``features/step0/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cka import cka_table
from probe.core.errors import UserError
from probe.core.models import load_model, model_sha256, save_model
from probe.features.extract import extract_features
from probe.features.store import FeatureStore
from train.ablation.run import run_name, teacher_path
from train.init import initialise_generator
from train.initspec import resolve_refs

TABLE = "cka_step0.csv"
KEYS = ["run", "init", "init_spec", "method", "seed"]


def _extract(model, path: Path, args: dict) -> Path:
    try:  # a finished file of the same model and options is reused, a partial one resumed
        return extract_features(model, out=str(path), **args)
    except UserError as e:
        if "holds another extraction" not in str(e):
            raise
        return extract_features(model, out=str(path), overwrite=True, **args)


def extract_args(grid, teacher: str, progress: bool = False) -> dict:
    """The extraction options of the grid's feature files (the same as analysis.ablation_summary's)."""
    opts = grid.extract
    data = grid.data
    if not data:
        info = Path(teacher) / "model.json"
        data = json.loads(info.read_text()).get("dataset") if info.exists() else None
    if not data:
        raise UserError(f"{teacher} does not record its data set; set data = ... in the grid")
    return dict(data=data, layers=tuple(opts["layers"]), sigmas=tuple(opts["sigmas"]), progress=progress,
                n_samples=int(opts["n_samples"]), split=opts["split"], noise_seed=int(opts["noise_seed"]),
                batch=int(opts["batch"]), source="denoiser", device=grid.student.get("device", "auto"))


def step0_cka(out, grid, refs: dict, progress: bool = False) -> Path | None:
    """Write ``cka_step0.csv`` for every started run of the grid; returns its path (None: no started run).

    Rows of an earlier call are reused when the run's init spec, seed, teacher and options are unchanged.
    """
    out = Path(out)
    planned = [(e, m, s) for e in grid.inits for m in grid.methods for s in grid.seeds_of(e)
               if (out / "runs" / run_name(e.label, m, s) / "config.json").exists()]
    if not planned:
        return None
    teacher_dir = teacher_path(grid, refs)
    teacher = load_model(teacher_dir)
    args = extract_args(grid, teacher_dir, progress)
    options = json.dumps({**{k: v for k, v in args.items() if k not in ("progress", "device")},
                          "teacher_sha256": teacher.sha256()}, sort_keys=True, default=list)
    fdir = out / "features"
    (fdir / "step0").mkdir(parents=True, exist_ok=True)
    table = out / TABLE
    old = pd.read_csv(table) if table.exists() else pd.DataFrame(columns=KEYS + ["options", "weights_sha256"])
    t_path = _extract(teacher_dir, fdir / "teacher.h5", args)
    str_refs = {k: str(v) for k, v in refs.items()}
    sigma_init = float(grid.student.get("sigma_init", 2.5))   # recorded with the model only; features use sigmas
    frames: list[pd.DataFrame] = []
    by_sha: dict[str, pd.DataFrame] = {}  # weights sha256 -> the CKA rows of those weights
    with FeatureStore.open(t_path) as t_store:
        for entry, method, seed in planned:
            name = run_name(entry.label, method, seed)
            spec = resolve_refs(entry.spec, str_refs)
            prev = old[(old["run"] == name) & (old["init_spec"] == spec) & (old["seed"] == seed)
                       & (old["options"] == options)]
            if len(prev):
                frames.append(prev)
                by_sha.setdefault(prev["weights_sha256"].iloc[0], prev)
                continue
            net, _ = initialise_generator(spec, teacher, seed)
            sha = model_sha256(net.unet)
            if sha not in by_sha:
                model_dir = fdir / "step0" / f"model-{sha[:16]}"
                save_model(model_dir, net, "generator", args["data"], sigma_init=sigma_init)
                path = _extract(str(model_dir), fdir / "step0" / f"{sha[:16]}.h5", args)
                # the features are kept, the weights are rebuilt on demand
                shutil.rmtree(model_dir, ignore_errors=True)
                with FeatureStore.open(path) as s_store:
                    cka = cka_table(t_store, s_store, mode="pair", estimator="debiased", n_perm=0)
                by_sha[sha] = (cka.rename(columns={"layer_a": "layer", "sigma_a": "sigma"})
                               [["layer", "sigma", "cka", "estimator", "n"]].assign(weights_sha256=sha))
            rows = by_sha[sha][["layer", "sigma", "cka", "estimator", "n", "weights_sha256"]]
            frames.append(rows.assign(run=name, init=entry.label, init_spec=spec, method=method, seed=seed,
                                      options=options))
    result = pd.concat(frames, ignore_index=True)
    front = KEYS + ["layer", "sigma", "cka"]
    result = result[front + [c for c in result.columns if c not in front]]
    tmp = table.with_suffix(".csv.tmp")
    result.to_csv(tmp, index=False)
    tmp.replace(table)
    return table


def step0_columns(out) -> dict:
    """{run: {"cka_start": mean CKA over layers and sigmas, "cka_start_s<sigma>": mean over layers}}
    from ``cka_step0.csv``; empty when the grid has none."""
    table = Path(out) / TABLE
    if not table.exists():
        return {}
    df = pd.read_csv(table)
    result = {}
    for run, g in df.groupby("run", sort=False):
        row = {"cka_start": float(np.nanmean(g["cka"]))}
        for sigma, gs in g.groupby("sigma"):
            row[f"cka_start_s{float(sigma):g}"] = float(np.nanmean(gs["cka"]))
        result[run] = row
    return result
