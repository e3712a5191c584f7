"""The matched mapping-only control: ``probe train regress --target-fd`` stops when the regressed
generator's FD reaches a target, records the curve and labels a run that never got there."""

import json

import pytest

from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import read_metrics, run_status
from train.regress import RegressConfig, one_step, parse_tolerance, regress_generator, target_status, tolerance_value

BUDGET, EVERY = 6, 2


def _cfg(teacher, out, **kw):
    return RegressConfig(out=str(out), teacher=str(teacher), n_pairs=16, n_val=8, sample_steps=2, steps=BUDGET,
                         batch=8, lr=3e-3, lr_warmup=1, checkpoint_every=4, log_every=2, eval_samples=64,
                         target_every=EVERY, **kw)


@pytest.fixture(scope="module")
def unreached(tiny_teacher, tmp_path_factory):
    """A run whose target (FD 1e-6, no slack) no generator reaches: it trains its whole budget."""
    out = tmp_path_factory.mktemp("target") / "unreached"
    return regress_generator(_cfg(tiny_teacher, out, target_fd=1e-6, target_tolerance=0.0), progress=False)


def test_an_unreachable_target_runs_the_whole_budget_and_is_labelled(unreached):
    result = json.loads((unreached / "regress.json").read_text())
    t = result["target"]
    assert t["status"] == "not reached" and t["stop_step"] == BUDGET == result["steps"]
    assert [p["step"] for p in t["curve"]] == list(range(0, BUDGET + 1, EVERY))   # step 0 and every EVERY steps
    assert t["fd_reached"] == t["curve"][-1]["fd"] == result["fd"]               # the final model's FD
    # the label travels with the model and its quality figure, so a grid cannot use it unnoticed
    assert load_model(unreached).info["target"]["status"] == "not reached"
    assert json.loads((unreached / "eval.json").read_text())["target"]["status"] == "not reached"
    fds = [(r["step"], r["eval_fd"]) for r in read_metrics(unreached) if "eval_fd" in r]
    assert fds == [(p["step"], p["fd"]) for p in t["curve"]]
    assert run_status(unreached, BUDGET) == "done"


def test_a_reachable_target_stops_at_the_first_evaluation_that_meets_it(tiny_teacher, unreached, tmp_path):
    curve = json.loads((unreached / "regress.json").read_text())["target"]["curve"]
    inner = [p for p in curve if 0 < p["step"] < BUDGET]
    target = min(p["fd"] for p in inner)
    assert curve[0]["fd"] > target, "the random init already meets the target: the test needs another budget"
    first = next(p for p in curve if p["fd"] <= target)   # the same seed draws the same steps: same curve

    run = regress_generator(_cfg(tiny_teacher, tmp_path / "hit", target_fd=target, target_tolerance=0.0),
                            progress=False)
    t = json.loads((run / "regress.json").read_text())["target"]
    assert t["status"] == "matched" and t["stop_step"] == first["step"] < BUDGET
    assert t["curve"] == [p for p in curve if p["step"] <= first["step"]]
    assert t["fd_reached"] == pytest.approx(target)
    assert run_status(run, BUDGET) == "done"            # stopped early, yet finished: the grid skips it
    # the saved model is the generator that was scored: re-scoring it gives the FD reached
    from probe.quality.metrics import QualityEvaluator
    from train.regress import eval_latents

    gen = load_model(run)
    samples = one_step(gen.denoiser, 2.5, eval_latents(gen.denoiser, 64, 0)[:64], "cpu")
    assert QualityEvaluator(gen.dataset, n_samples=64, seed=0).evaluate(samples)["fd"] == pytest.approx(target)


def test_a_target_passed_between_two_evaluations_keeps_the_closer_one_and_says_missed(tiny_teacher, unreached,
                                                                                       tmp_path):
    curve = json.loads((unreached / "regress.json").read_text())["target"]["curve"]
    pick = None
    for k in range(1, len(curve)):   # a fall from k-1 to k, with the target a quarter of the way down
        a, b = curve[k - 1]["fd"], curve[k]["fd"]
        target = a - 0.25 * (a - b)
        if b < a and all(p["fd"] > target for p in curve[:k]):
            pick = (k, target)
            break
    assert pick is not None, "no falling step in the tiny curve: the test needs another budget"
    k, target = pick
    run = regress_generator(_cfg(tiny_teacher, tmp_path / "miss", target_fd=target, target_tolerance=0.0),
                            progress=False)
    t = json.loads((run / "regress.json").read_text())["target"]
    assert t["status"] == "missed"                                   # neither evaluation is within 0 of it
    assert t["stop_step"] == curve[k - 1]["step"] and t["fd_reached"] == curve[k - 1]["fd"]   # the closer one
    assert [p["step"] for p in t["curve"]] == [p["step"] for p in curve[:k + 1]]
    # the model kept is the earlier evaluation's EMA generator: re-scoring it gives its FD
    from probe.quality.metrics import QualityEvaluator
    from train.regress import eval_latents

    gen = load_model(run)
    samples = one_step(gen.denoiser, 2.5, eval_latents(gen.denoiser, 64, 0)[:64], "cpu")
    assert QualityEvaluator(gen.dataset, n_samples=64, seed=0).evaluate(samples)["fd"] == pytest.approx(t["fd_reached"])
    assert json.loads((run / "eval.json").read_text())["fd"] == pytest.approx(t["fd_reached"])


def test_target_rules_and_refusals():
    assert target_status(10.0, 10.0, 0.0) == "matched" and target_status(9.0, 10.0, 2.0) == "matched"
    assert target_status(7.0, 10.0, 2.0) == "overshot" and target_status(12.5, 10.0, 2.0) == "above"
    assert tolerance_value("floor", 600.0, 1.25) == 2.5 and tolerance_value("10%", 600.0, 1.25) == pytest.approx(60.0)
    assert tolerance_value(3.0, 600.0, 1.25) == 3.0
    assert parse_tolerance("10%") == "10%" and parse_tolerance("4") == 4.0 and parse_tolerance("floor") == "floor"
    with pytest.raises(UserError, match="target_tolerance must be"):
        parse_tolerance("ten")
    with pytest.raises(UserError, match="eval_samples > 0"):
        RegressConfig(out="x", teacher="t", target_fd=5.0, eval_samples=0)
    with pytest.raises(UserError, match="target_fd must be"):
        RegressConfig(out="x", teacher="t", target_fd="best")
    with pytest.raises(UserError, match="target_tolerance must be"):
        RegressConfig(out="x", teacher="t", target_fd=5.0, target_tolerance=-1.0)
    assert not RegressConfig(out="x", teacher="t").targeting and RegressConfig(out="x", teacher="t",
                                                                                target_fd="teacher").targeting


def test_a_grid_refuses_a_target_fd_measured_unlike_the_students(tiny_teacher, tmp_path):
    from train.ablation.grid import check_grid, load_grid

    grid = f"""
teacher = "{tiny_teacher}"
methods = ["diffratio-js"]
seeds = [0]
[student]
steps = 2
eval_every = 2
eval_samples = 64
[inits]
matched = "from:@matched"
[prereq.matched]
kind = "regress"
teacher = "{tiny_teacher}"
target_fd = "teacher"
eval_samples = 100
"""
    (tmp_path / "g.toml").write_text(grid)
    with pytest.raises(UserError, match=r"\[prereq.matched\] target_fd: eval_samples = 100 but \[student\] uses 64"):
        check_grid(load_grid(str(tmp_path / "g.toml")), tmp_path / "out")
    (tmp_path / "g.toml").write_text(grid.replace("eval_samples = 100", "eval_samples = 64"))
    check_grid(load_grid(str(tmp_path / "g.toml")), tmp_path / "out")   # the same settings pass


def test_a_target_run_killed_and_resumed_gives_the_same_curve(tiny_teacher, unreached, tmp_path):
    import torch

    from probe.core.runs import load_state

    cfg = _cfg(tiny_teacher, tmp_path / "cut", target_fd=1e-6, target_tolerance=0.0)
    regress_generator(cfg, progress=False, stop_after=5)          # last checkpoint at step 4
    assert run_status(tmp_path / "cut", BUDGET) == "partial"
    run = regress_generator(cfg, resume=True, progress=False)
    a, b = (json.loads((d / "regress.json").read_text())["target"] for d in (unreached, run))
    assert a["curve"] == b["curve"] and b["status"] == "not reached"
    sa, sb = load_state(unreached), load_state(run)
    assert all(torch.equal(sa["ema"]["net"][k], sb["ema"]["net"][k]) for k in sa["ema"]["net"])
    def evals(d):   # wall-clock seconds differ between the two runs; every figure must not
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(d) if "eval_fd" in r]

    assert evals(run) == evals(unreached)
