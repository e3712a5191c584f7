"""Ablation grids: checked before training, run end to end on tiny models, resumable, summarised."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.ablation_summary import aggregate
from probe.core.errors import UserError
from probe.pipeline import run_ablation
from train.ablation.grid import AGG_METRICS, AblationConfig, check_grid, grid_path, load_grid, prereq_order
from train.initspec import CATEGORIES


def _recording(calls, stop_first=None):
    """A train function that records (run, resume) and can stop one run early (a simulated kill)."""
    from train.student.loop import train_student

    def train(cfg, resume, progress):
        name = cfg.out.rsplit("/", 1)[-1]
        calls.append((name, resume))
        stop = 1 if stop_first and name.startswith(stop_first) and not resume else None
        return train_student(cfg, resume=resume, progress=progress, stop_after=stop)

    return train


def test_quick_grid_end_to_end_and_resume(tmp_path):
    out = tmp_path / "abl"
    calls = []
    # first pass: the "band" run is killed after one step (before its first checkpoint); the other
    # jobs go on, the summary shows what there is, and the launch names the unfinished job
    with pytest.raises(UserError, match=r"1 job failed \(band__diffratio-js__s0\) and 1 could not start"):
        run_ablation(AblationConfig(config="quick", out=str(out)), progress=False, train_fn=_recording(calls, "band"))
    assert [c[1] for c in calls] == [False, False, False]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.init) == ["full", "band", "regressed"]
    assert list(summary.status) == ["done", "partial", "done"]
    for kind in ("teacher", "band_teacher", "regressed"):
        assert (out / "prereq" / kind / "model.json").exists()
    assert json.loads((out / "prereq" / "regressed" / "model.json").read_text())["kind"] == "generator"

    # second pass: only the half-finished run trains, and it is resumed
    calls.clear()
    run_ablation(AblationConfig(config="quick", out=str(out)), progress=False, train_fn=_recording(calls))
    assert calls == [("band__diffratio-js__s0", True)]
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.status == "done").all()

    # third pass: nothing left to do
    calls.clear()
    run_ablation(AblationConfig(config="quick", out=str(out)), progress=False, train_fn=_recording(calls))
    assert calls == []

    # an edited grid (one contrast dropped) trains nothing again but redoes the verdict, which was out of date
    edited = tmp_path / "quick-edited.toml"
    edited.write_text(Path(grid_path("quick")).read_text().split("[contrasts.regressed-vs-full]")[0])
    run_ablation(AblationConfig(config=str(edited), out=str(out)), progress=False, train_fn=_recording(calls))
    assert calls == []
    assert [c["name"] for c in json.loads((out / "verdict.json").read_text())["contrasts"]] == [
        "full-vs-reference", "band-vs-full"]
    run_ablation(AblationConfig(config="quick", out=str(out)), progress=False, train_fn=_recording(calls))
    assert calls == [] and "regressed-vs-full" in (out / "verdict.txt").read_text()

    # summary rows agree with each run's own files
    for _, r in summary.iterrows():
        final = json.loads((out / "runs" / r.run / "eval.json").read_text())
        assert r.fd_final == pytest.approx(final["fd"]) and r.recall_final == pytest.approx(final["recall"])
        lines = (out / "runs" / r.run / "metrics.jsonl").read_text().split("\n")[:-1]
        fds = [row["eval_fd"] for row in map(json.loads, lines) if "eval_fd" in row]
        assert r.fd_best == pytest.approx(min(fds))
        assert sum(r[f"init_frac_{c}"] for c in CATEGORIES) == pytest.approx(1.0)
    assert summary.set_index("init").loc["full", "init_frac_teacher"] == 1.0
    assert summary.set_index("init").loc["band", "init_frac_other"] == 1.0
    regressed = summary.set_index("init").loc["regressed"]
    assert 0 < regressed.init_frac_shuffled < 0.01
    assert regressed.init_frac_other == pytest.approx(1 - regressed.init_frac_shuffled)

    curves = pd.read_csv(out / "curves.csv")
    assert set(curves.metric) >= {"fd", "precision", "recall"} and set(curves.step) == {0, 2}
    drift = curves[curves.metric == "cka"]  # feature drift (train/student/drift.py), on by default
    assert set(drift.init) == {"full", "band", "regressed"} and set(drift.sigma) == {0.0, 0.5, 2.5}
    assert drift[(drift.init == "full") & (drift.step == 0)].value.sub(1).abs().max() < 1e-5
    agg = pd.read_csv(out / "aggregate.csv")
    assert set(agg.init) == {"full", "band", "regressed"} and (agg[agg.metric.isin(AGG_METRICS)].n == 1).all()
    ref = json.loads((out / "reference.json").read_text())
    assert ref["sampler"] == "heun-2" and ref["n"] == 64
    assert (out / "verdict.txt").read_text().startswith("Verdict")
    # the declared contrasts: one seed each, so nothing is decided; the CKA match is measured at step 0
    v = json.loads((out / "verdict.json").read_text())
    assert [c["name"] for c in v["contrasts"]] == ["full-vs-reference", "band-vs-full", "regressed-vs-full"]
    assert v["schema"] == 2 and all(c["verdict"] in ("inconclusive", "refused") for c in v["contrasts"])
    assert v["contrasts"][2]["match"]["property"] == "cka_start" and v["contrasts"][2]["match"]["arm"] is not None
    # learning-curve and step-0 columns; the teacher init's step-0 features are the teacher's own
    s = summary.set_index("init")
    assert {"fd_at_2", "fd_auc", "steps_to_150pct", "steps_to_110pct", "plateau", "cka_start",
            "cka_start_s2.5"} <= set(s.columns)
    assert s.loc["full", "cka_start"] == pytest.approx(1.0, abs=1e-6) and s.cka_start.between(-1, 1).all()
    assert (s.fd_at_2 == s.fd_final).all()
    step0 = pd.read_csv(out / "cka_step0.csv")
    assert set(step0.run) == set(summary.run) and set(step0.sigma) == {0.0, 2.5}

    # features: teacher vs each student on the same inputs
    cka = pd.read_csv(out / "cka_teacher_student.csv")
    assert set(cka.init) == {"full", "band", "regressed"} and set(cka.layer) == {"down_blocks.1", "mid_block"}
    assert set(cka.sigma) == {0.0, 2.5} and cka.cka.notna().all()
    probes = pd.read_csv(out / "probes.csv")
    assert set(probes.init) == {"(teacher)", "full", "band", "regressed"}
    assert probes.accuracy.between(0, 1).all()


def _write(tmp_path, text):
    p = tmp_path / "grid.toml"
    p.write_text(text)
    return str(p)


BASE = """
teacher = "@t"
methods = ["diffratio-js"]
seeds = [0]
[student]
eval_every = 2
[inits]
full = "teacher"
[prereq.t]
kind = "teacher"
preset = "test"
"""


@pytest.mark.parametrize("change, message", [
    (("[inits]\nfull = \"teacher\"", "[inits]\nfull = \"keep:down_blcks.*\""), "'down_blcks.*' matches no module"),
    (("[inits]\nfull = \"teacher\"", "[inits]\nfull = \"from:@nowhere\""), "'@nowhere'"),
    (("[inits]\nfull = \"teacher\"", "[inits]\nfull = { spec = \"teacher\", group = \"best\" }"),
     "unknown group 'best'"),
    (("eval_every = 2", "eval_every = 0"), "eval_every must be > 0"),
    (("eval_every = 2", "eval_every = 2\nlearning_rate = 1"), "unknown option 'learning_rate'"),
    (("eval_every = 2", "eval_every = 2\nseed = 1"), "'seed' is set by the grid"),
    (("\"diffratio-js\"", "\"diffratio-xx\""), "unknown method 'diffratio-xx'"),
    (("preset = \"test\"", "preset = \"test\"\nwidth = 3"), r"\[prereq.t\]: unknown option 'width'"),
    (("kind = \"teacher\"", "kind = \"student\""), "kind = \"teacher\" or \"regress\""),
    (("seeds = [0]", "seeds = [0]\nsteps = 3"), "unknown key 'steps'"),
    (("teacher = \"@t\"", "teacher = \"@u\""), "names no \\[prereq.u\\]"),
])
def test_invalid_grids_are_refused_before_training(tmp_path, change, message):
    text = BASE.replace(*change)
    assert text != BASE
    with pytest.raises(UserError, match=message):
        check_grid(load_grid(_write(tmp_path, text)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prerequisite_of_another_architecture_is_refused_before_training(tmp_path):
    text = (BASE.replace('full = "teacher"', 'full = "teacher"\nband = "from:@b"')
            + '[prereq.b]\nkind = "teacher"\npreset = "tiny"\n')
    with pytest.raises(UserError, match=r"init 'band': @b does not fit the teacher: tensor 'conv_in.weight'"):
        check_grid(load_grid(_write(tmp_path, text)), tmp_path / "out")
    check_grid(load_grid(_write(tmp_path, text.replace('"tiny"', '"test"'))), tmp_path / "out")


def test_prerequisite_order_overrides_and_shipped_grids(tmp_path):
    assert prereq_order({"r": {"teacher": "@t"}, "t": {}}) == ["t", "r"]
    with pytest.raises(UserError, match="cycle"):
        prereq_order({"a": {"teacher": "@b"}, "b": {"teacher": "@a"}})
    grid = load_grid("quick", AblationConfig(config="quick", out="x", teacher=str(tmp_path), steps=7, seeds=(3, 4)))
    assert grid.teacher == str(tmp_path) and "teacher" not in grid.prereqs
    assert grid.external == {"teacher": str(tmp_path)} and grid.student["steps"] == 7 and grid.seeds == [3, 4]
    assert prereq_order(grid.prereqs, grid.external) == ["band_teacher", "regressed"]
    paper = load_grid("paper")
    refs = check_grid(paper, tmp_path / "paper")   # every spec and contrast valid on the tiny teacher's architecture
    assert set(refs) == {"teacher", "band_teacher", "single_teacher", "regressed", "matched", "transplanted"}
    assert paper.prereqs["single_teacher"]["sigma_range"] == [2.5, 2.5]
    specs = {e.spec for e in paper.inits}
    for row in ("teacher", "random", "reinit:conv_in,conv_out,time_embedding", "reinit:conv_in,conv_out",
                "reinit:time_embedding", "shuffle", "from:@band_teacher", "from:@single_teacher", "from:@regressed",
                "from:@matched", "from:@transplanted"):
        assert row in specs
    assert paper.seeds == [0, 1, 2] and paper.methods == ["diffratio-js"]
    seeds = {e.label: paper.seeds_of(e) for e in paper.inits}   # 5 seeds for the arms of the headline contrasts
    assert all(len(seeds[a]) == 5 for a in ("full", "random", "band", "single", "io-reinit", "matched", "transplanted"))
    assert sum(map(len, seeds.values())) == 50
    null = next(e for e in paper.inits if e.label == "null-signal")
    assert null.student == {"null_signal": "shuffle", "plateau_tol": 0.0} and null.spec == "teacher"
    # every arm is in a declared contrast; the mapping-held-fixed ones declare their match on step-0 FD
    contrasts = {c.name: c for c in paper.contrasts}
    arms = {c.arm for c in paper.contrasts} | {c.versus for c in paper.contrasts} - {"reference"}
    assert {e.label for e in paper.inits} == arms
    for name in ("band-vs-full", "single-vs-full", "regressed-vs-full", "matched-vs-full"):
        assert contrasts[name].match["property"] == "fd_start"
    assert not contrasts["regressed-vs-full"].in_claim and contrasts["full-vs-reference"].claim == "1"
    partial = load_grid(str(Path(grid_path("paper")).with_name("paper-partial.toml")))
    check_grid(partial, tmp_path / "partial")
    assert {e.spec for e in partial.inits} >= {"keep:down_blocks.*", "keep:up_blocks.*", "keep:mid_block"}
    # paper-digits: the same arms, seeds and contrasts on digits (the grid reports/ablation-paper ran)
    digits = load_grid("paper-digits")
    check_grid(digits, tmp_path / "paper-digits")
    assert {e.label: e.spec for e in digits.inits} == {e.label: e.spec for e in paper.inits}
    assert {c.name for c in digits.contrasts} == set(contrasts)
    assert paper.prereqs["teacher"]["data"] == "scenes" and digits.prereqs["teacher"]["data"] == "digits"
    # paper-short: the headline arms of paper, same specs and contrasts, at a budget that fits 2 cores
    short = load_grid("paper-short")
    check_grid(short, tmp_path / "paper-short")
    assert {e.label: e.spec for e in short.inits} == {e.label: e.spec for e in paper.inits if e.label in
                                                      {"full", "random", "matched", "transplanted", "null-signal"}}
    for c in short.contrasts:
        assert (c.arm, c.versus, c.match, c.predicted, c.claim, c.in_claim) == (
            contrasts[c.name].arm, contrasts[c.name].versus, contrasts[c.name].match, contrasts[c.name].predicted,
            contrasts[c.name].claim, contrasts[c.name].in_claim)
    assert short.prereqs["teacher"] == paper.prereqs["teacher"] and short.student["steps"] < paper.student["steps"]
    # scenes-long: paper-short's arms but the null-signal control run on, with paper's 5 seeds for the
    # transplant contrast; every other setting is paper-short's
    long = load_grid("scenes-long")
    check_grid(long, tmp_path / "scenes-long")
    assert {e.label: e.spec for e in long.inits} == {e.label: e.spec for e in short.inits
                                                     if e.label in {"full", "random", "transplanted", "matched"}}
    assert [c.name for c in long.contrasts] == ["random-vs-full", "matched-vs-full", "transplanted-vs-random",
                                                "transplanted-vs-random-tail"]
    for c in long.contrasts[:3]:
        assert (c.arm, c.versus, c.match, c.predicted, c.claim, c.in_claim) == (
            contrasts[c.name].arm, contrasts[c.name].versus, contrasts[c.name].match, contrasts[c.name].predicted,
            contrasts[c.name].claim, contrasts[c.name].in_claim)
    assert long.contrasts[3].metric == "fd_tail" and not long.contrasts[3].in_claim
    assert {k: v for k, v in long.student.items() if k != "steps"} == {k: v for k, v in short.student.items()
                                                                        if k != "steps"}
    assert long.prereqs == {k: short.prereqs[k] for k in long.prereqs}
    long_seeds = {e.label: long.seeds_of(e) for e in long.inits}
    assert long_seeds["transplanted"] == long_seeds["random"] == seeds["transplanted"] == [0, 1, 2, 3, 4]
    assert long_seeds["full"] == long_seeds["matched"] == [0, 1, 2]
    assert long.student["steps"] > short.student["steps"]
    for name in ("demo", "demo-quick", "methods", "random-js"):
        grid = load_grid(str(Path(grid_path("paper")).with_name(f"{name}.toml")))
        assert not grid.contrasts or {c.arm for c in grid.contrasts} <= {e.label for e in grid.inits}


def test_aggregate_matches_its_definition():
    rng = np.random.default_rng(0)
    rows = [dict(init=i, init_group="other", method="m", status="done", fd_final=v, fd_best=v - 1,
                 precision_final=0.5, recall_final=0.5, coverage_final=1.0)
            for i in ("a", "b") for v in rng.normal(10, 2, 6)]
    rows.append(dict(init="a", init_group="other", method="m", status="partial", fd_final=1e6, fd_best=1e6,
                     precision_final=0, recall_final=0, coverage_final=0))
    df = pd.DataFrame(rows)
    agg = aggregate(df).set_index(["init", "metric"])
    for init in ("a", "b"):
        v = df[(df.init == init) & (df.status == "done")].fd_final
        row = agg.loc[(init, "fd_final")]
        assert row.n == 6 and row["mean"] == pytest.approx(v.mean()) and row["std"] == pytest.approx(v.std(ddof=1))
        assert row.ci_low < row["mean"] < row.ci_high
        assert row.ci_high - row.ci_low < 4 * v.std(ddof=1) / np.sqrt(6) * 1.96


def test_regressed_generator_fits_the_teachers_samples_and_resumes_exactly(tiny_teacher, tmp_path):
    import torch

    from probe.core.edm import heun_sample
    from probe.core.models import load_model
    from probe.core.runs import load_state, read_metrics
    from train.regress import RegressConfig, is_finished, regress_generator

    def cfg(out, **kw):
        return RegressConfig(out=str(out), teacher=str(tiny_teacher), n_pairs=16, n_val=8, sample_steps=2, steps=12,
                             batch=8, lr=3e-3, lr_warmup=1, checkpoint_every=4, log_every=4, eval_samples=0, **kw)

    full = regress_generator(cfg(tmp_path / "full"), progress=False)
    regress_generator(cfg(tmp_path / "cut"), progress=False, stop_after=6)   # killed; last checkpoint at 4
    assert not is_finished(tmp_path / "cut")
    cut = regress_generator(cfg(tmp_path / "cut"), resume=True, progress=False)
    assert is_finished(full, 12) and is_finished(cut, 12)
    a, b = load_state(full), load_state(cut)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    # the pairs are the teacher's deterministic Heun samples of the cached latents
    pairs = torch.load(full / "pairs.pt", weights_only=False)
    teacher = load_model(tiny_teacher)
    # (batched float32 convolutions differ in the last bits from a batch of 4)
    assert torch.allclose(pairs["x"][:4], heun_sample(teacher.denoiser, pairs["z"][:4], 2), rtol=1e-4, atol=1e-3)
    gen = load_model(full)
    assert gen.kind == "generator" and gen.generator.sigma_init == 2.5 and gen.info["init"] == "random"
    val = [r["val_mse"] for r in read_metrics(full) if "val_mse" in r]
    assert val[-1] < val[0]          # regression makes progress on held-out pairs


def test_step0_features_rebuild_the_students_initial_weights_exactly(tiny_teacher, tmp_path):
    """analysis/step0.py rebuilds each run's init instead of reading it: it must equal what the loop starts from."""
    import torch

    from probe.core.models import load_model
    from probe.core.runs import load_state
    from train.init import initialise_generator
    from train.student.loop import StudentConfig, train_student

    for spec, seed in (("random", 3), ("reinit:conv_in,conv_out", 1)):
        out = train_student(StudentConfig(out=str(tmp_path / f"{seed}"), teacher=str(tiny_teacher), init=spec,
                                          seed=seed, steps=0, batch=8, eval_every=0), progress=False)
        saved = load_state(out)["generator"]
        rebuilt = initialise_generator(spec, load_model(tiny_teacher), seed)[0].state_dict()
        assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
