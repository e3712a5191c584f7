"""Grid options that shape the plan without training: per-arm seed lists and --scale."""

import pytest

from probe.core.errors import UserError
from train.ablation.grid import AblationConfig, load_grid, scale_steps
from train.ablation.jobs import plan_grid
from train.regress import RegressConfig
from train.student.loop import StudentConfig
from train.teacher import TEACHER_STEPS

GRID = """
teacher = "@teacher"
methods = ["diffratio-js"]
seeds = [0, 1, 2]

[student]
steps = 40
eval_every = 10

[inits]
full = { spec = "teacher", group = "teacher", seeds = [0, 1, 2, 3, 4] }
random = { spec = "random", group = "random" }

[prereq.teacher]
kind = "teacher"
data = "digits"
preset = "test"
steps = 20

[prereq.regressed]
kind = "regress"
teacher = "@teacher"
"""


def _write(tmp_path, text=GRID):
    p = tmp_path / "g.toml"
    p.write_text(text)
    return str(p)


def _students(plan):
    return sorted(j.name for j in plan.jobs if j.kind == "student")


def test_an_arm_may_run_more_seeds_than_the_grid(tmp_path):
    plan = plan_grid(AblationConfig(config=_write(tmp_path), out=str(tmp_path / "out")))
    names = _students(plan)
    assert [n for n in names if n.startswith("full__")] == [f"full__diffratio-js__s{s}" for s in range(5)]
    assert [n for n in names if n.startswith("random__")] == [f"random__diffratio-js__s{s}" for s in range(3)]
    # --seeds gives every arm the same list, the arm's own included
    again = plan_grid(AblationConfig(config=_write(tmp_path), out=str(tmp_path / "out"), seeds=(7,)))
    assert _students(again) == ["full__diffratio-js__s7", "random__diffratio-js__s7"]


@pytest.mark.parametrize("bad", ["[]", "[1, 1]", "[-1]", "3", '["a"]', "[true]"])
def test_bad_arm_seeds_are_refused(tmp_path, bad):
    text = GRID.replace("seeds = [0, 1, 2, 3, 4]", f"seeds = {bad}")
    with pytest.raises(UserError, match="seeds must be a non-empty list of distinct non-negative integers"):
        load_grid(_write(tmp_path, text))


def test_scale_multiplies_every_step_count_defaults_included(tmp_path):
    base = load_grid(_write(tmp_path))
    big = load_grid(_write(tmp_path), AblationConfig(config="", out="x", scale=4))
    assert big.student["steps"] == 160 and big.student["eval_every"] == 40        # proportions kept
    assert big.student["checkpoint_every"] == 4 * StudentConfig.checkpoint_every  # a default, scaled too
    assert big.prereqs["teacher"]["steps"] == 80
    assert big.prereqs["regressed"]["steps"] == 4 * RegressConfig.steps
    assert big.seeds == base.seeds and [e.seeds for e in big.inits] == [e.seeds for e in base.inits]
    # a teacher that leaves steps out trains its data set's default (2400 on scenes), and that is scaled
    scenes = GRID.replace('data = "digits"\npreset = "test"\nsteps = 20', 'data = "scenes"\npreset = "test"')
    assert "steps = 20" not in scenes
    big = load_grid(_write(tmp_path, scenes), AblationConfig(config="", out="x", scale=2))
    assert big.prereqs["teacher"]["steps"] == 2 * TEACHER_STEPS["scenes"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="scale must be an integer >= 1"):
            scale_steps(base, bad)


def test_reference_churn_scores_the_teacher_with_the_stochastic_sampler(tmp_path, tiny_teacher):
    """reference_churn > 0: the teacher's own figure uses EDM's stochastic sampler, is cached under a key
    that names the churn (a deterministic figure is not reused for it), and the verdict names the sampler."""
    import json

    from analysis.verdict import _sampler_words, _steps
    from train.ablation.run import compute_reference, reference_config, reference_done

    base = GRID.replace('teacher = "@teacher"', f'teacher = "{tiny_teacher}"').split("[prereq.teacher]")[0]
    # 4 steps: sigmas 80, 9.7, 0.47, 0.002; the middle two are inside the churn window [0.05, 50]
    plain = load_grid(_write(tmp_path, base.replace("seeds = [0, 1, 2]\n", "seeds = [0]\nreference_steps = 4\n")))
    assert plain.reference_churn == 0.0
    churned = load_grid(_write(tmp_path, base.replace(
        "seeds = [0, 1, 2]\n", "seeds = [0]\nreference_steps = 4\nreference_churn = 5\n")))
    assert churned.reference_churn == 5.0
    out = tmp_path / "out"
    out.mkdir()
    c0, c5 = (reference_config(g, out, {}) for g in (plain, churned))
    c0["n_samples"] = c5["n_samples"] = 16
    r0 = compute_reference(c0, progress=False)
    assert r0["sampler"] == "heun-4" and "churn" not in r0["key"]   # keys cached before the option stay valid
    assert reference_done(c0) and not reference_done(c5)             # the deterministic figure is not reused
    r5 = compute_reference(c5, progress=False)
    assert r5["sampler"].startswith("heun-4-churn5[") and r5["key"]["churn"] == 5.0 and r5["fd"] != r0["fd"]
    assert json.loads((out / "reference.json").read_text())["sampler"] == r5["sampler"]
    assert _steps(r5["sampler"]) == 4 and _steps("heun-18") == 18
    assert _sampler_words({"sampler": r5["sampler"], "steps": 4}).startswith("EDM's stochastic sampler heun-4-churn5")
    assert _sampler_words({"sampler": "heun-18", "steps": 18}) == "18 Heun steps"


@pytest.mark.parametrize("bad, match", [("-1", "reference_churn must be a finite number >= 0, got -1"),
                                        ("inf", "reference_churn must be a finite number >= 0, got inf"),
                                        ('"5"', "must be a number"), ("true", "must be a number")])
def test_bad_reference_churn_is_refused(tmp_path, bad, match):
    from train.ablation.grid import check_grid

    text = GRID.replace("seeds = [0, 1, 2]\n", f"seeds = [0, 1, 2]\nreference_churn = {bad}\n")
    with pytest.raises(UserError, match=match):
        check_grid(load_grid(_write(tmp_path, text)), tmp_path / "out")
