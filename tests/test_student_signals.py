"""Student-loop signals: per-sigma classifier accuracy, the null-signal control, the plateau early stop."""

import json
import math

import pytest
import torch

from probe.core.errors import UserError
from probe.core.runs import load_state, read_manifest, read_metrics, run_status
from train.student.loop import (
    PLATEAU_MIN_EVALS,
    Accumulator,
    StudentConfig,
    plateau_reached,
    train_student,
)
from train.student.losses import TALLY, bucket_accuracies, bucket_tallies, sigma_bucket_edges


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=str(teacher), steps=4, batch=8, checkpoint_every=2, log_every=1, eval_every=0,
                lr_g=1e-3, lr_aux=1e-3, seed=1)
    return StudentConfig(**{**base, **kw})


def _logged(run):  # every row but its wall-clock time
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]


# ------------------------------------------------------------------------- sigma buckets
def test_bucket_edges_are_log_spaced_and_tallies_count_each_bucket():
    edges = sigma_bucket_edges(0.002, 80.0)
    assert len(edges) == 5 and edges[0] == pytest.approx(0.002) and edges[-1] == pytest.approx(80.0)
    ratios = [b / a for a, b in zip(edges[:-1], edges[1:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)   # equal steps in log sigma
    sigma = torch.tensor([0.003, 0.01, 1.0, 1.0, 80.0])          # buckets 0, 0, 2, 2, 3 (sigma_max in the last)
    l_fake = torch.tensor([2.0, -1.0, 0.0, 3.0, 1.0])            # right, wrong, tie, right, right
    l_real = torch.tensor([-1.0, -1.0, 1.0, -2.0, 0.5])          # right, right, wrong, right, wrong
    t = bucket_tallies(sigma, l_fake, l_real, edges)
    assert [t[f"{TALLY}n_b{k}"] for k in range(4)] == [2, 0, 2, 1]
    assert [t[f"{TALLY}fake_b{k}"] for k in range(4)] == [1, 0, 1.5, 1]   # the tie counts half
    assert [t[f"{TALLY}real_b{k}"] for k in range(4)] == [2, 0, 1, 0]
    acc = bucket_accuracies({k[len(TALLY):]: v for k, v in t.items()})
    assert acc["n_b1"] == 0 and "acc_b1" not in acc                       # an empty bucket has no accuracy
    assert acc["acc_real_b0"] == 1.0 and acc["acc_fake_b0"] == 0.5 and acc["acc_b0"] == 0.75
    assert acc["acc_b2"] == pytest.approx((1.5 / 2 + 1 / 2) / 2)


def test_interval_accuracy_is_total_right_over_total_rows_when_a_bucket_is_empty_in_some_steps():
    steps = [  # (rows of each class in bucket 0, real rows right, fake rows right) per step
        (2, 2, 2), (0, 0, 0), (6, 3, 0)]
    acc = Accumulator()
    for n, r, f in steps:
        acc.add(loss_aux=0.5, **{f"{TALLY}n_b0": n, f"{TALLY}real_b0": r, f"{TALLY}fake_b0": f})
    state = acc.state_dict()
    row = acc.pop()
    assert row["loss_aux"] == 0.5 and row["n_b0"] == 8
    assert row["acc_real_b0"] == 5 / 8 and row["acc_fake_b0"] == 2 / 8 and row["acc_b0"] == 7 / 16
    mean_of_means = sum(r / n for n, r, _ in steps if n) / 2
    assert row["acc_real_b0"] != mean_of_means   # what averaging step means would have logged (0.75)
    assert Accumulator(state).pop() == row       # the checkpointed accumulator gives the same row


# --------------------------------------------------------------------- null-signal control
def test_null_signal_shuffle_stays_at_chance_while_off_separates(tiny_teacher, tmp_path):
    """A random-init generator against digits: with its labels, the classifier separates the two within a
    few steps in every populated sigma bucket; with shuffled labels, the same loop stays at chance."""
    kw = dict(steps=24, batch=32, log_every=12, lr_aux=5e-3, lr_g=1e-7, sigma_max=1.0, init="random", seed=0,
              checkpoint_every=100)
    last = {}
    for ns in ("off", "shuffle"):
        run = train_student(_cfg(tmp_path / ns, tiny_teacher, null_signal=ns, **kw), progress=False)
        rows = read_metrics(run)
        assert [r["step"] for r in rows] == [12, 24]
        for r in rows:  # counts are totals over the interval: every generated row lands in one bucket
            assert sum(r[f"n_b{k}"] for k in range(4)) == kw["batch"] * kw["log_every"]
        last[ns] = rows[-1]
        assert json.loads((run / "model.json").read_text())["method"]["null_signal"] == ns
    populated = [k for k in range(4) if last["off"][f"n_b{k}"] >= 100]
    assert len(populated) >= 2, last["off"]
    for k in populated:
        n = last["shuffle"][f"n_b{k}"]
        chance = 3 * math.sqrt(0.25 / (2 * n))   # 3 binomial standard deviations of a balanced accuracy
        assert abs(last["shuffle"][f"acc_b{k}"] - 0.5) < max(chance, 0.06), (k, last["shuffle"])
        assert last["off"][f"acc_b{k}"] > 0.5 + 3 * chance, (k, last["off"])
    assert abs(last["shuffle"]["loss_aux"] - math.log(2)) < abs(last["off"]["loss_aux"] - math.log(2))


def test_null_signal_options_are_checked(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="unknown null signal 'labels'"):
        _cfg(tmp_path / "a", tiny_teacher, null_signal="labels")
    with pytest.raises(UserError, match="method vsd has none"):
        _cfg(tmp_path / "b", tiny_teacher, method="vsd", null_signal="shuffle")
    _cfg(tmp_path / "c", tiny_teacher, method="gan", null_signal="shuffle")   # the GAN's discriminator can be


def test_bucket_counts_are_totals_over_uneven_micro_batches(tiny_teacher, tmp_path):
    """batch 7 as 2 micro-batches (3 and 4 rows, loss weights 6/7 and 8/7): counts are not weighted."""
    run = train_student(_cfg(tmp_path / "r", tiny_teacher, steps=2, batch=7, accum=2), progress=False)
    for r in read_metrics(run):
        assert sum(r[f"n_b{k}"] for k in range(4)) == 7
        assert all(0 <= r[f"acc_b{k}"] <= 1 for k in range(4) if r[f"n_b{k}"])


def test_resume_is_exact_mid_interval_with_buckets_and_shuffled_labels(tiny_teacher, tmp_path):
    kw = dict(steps=6, log_every=3, checkpoint_every=2, null_signal="shuffle")
    full = train_student(_cfg(tmp_path / "full", tiny_teacher, **kw), progress=False)
    cut = _cfg(tmp_path / "cut", tiny_teacher, **kw)
    train_student(cut, progress=False, stop_after=5)   # last checkpoint at step 4: mid-interval accumulator
    assert load_state(tmp_path / "cut")["acc"]["count"] == 1
    train_student(cut, resume=True, progress=False)
    a, b = load_state(full), load_state(tmp_path / "cut")
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
    assert _logged(full) == _logged(tmp_path / "cut") and "acc_b2" in _logged(full)[-1]


def test_grid_arm_can_set_the_null_signal(tiny_teacher, tmp_path):
    from train.ablation.grid import check_grid, load_grid
    from train.ablation.run import student_config

    def grid(arm_student):
        text = (f'teacher = "{tiny_teacher}"\nmethods = ["diffratio-js"]\nseeds = [0]\nreference_steps = 0\n'
                f'[student]\nsteps = 2\nbatch = 8\neval_every = 1\n'
                f'[inits]\nfull = "teacher"\nnull-signal = {{ spec = "teacher", student = {{ {arm_student} }} }}\n')
        path = tmp_path / "grid.toml"
        path.write_text(text)
        return load_grid(str(path))

    g = grid('null_signal = "shuffle"')
    refs = check_grid(g, tmp_path / "out")
    cfgs = {e.label: student_config(g, e, "diffratio-js", 0, tmp_path / "out", refs) for e in g.inits}
    assert cfgs["full"].null_signal == "off" and cfgs["null-signal"].null_signal == "shuffle"
    assert cfgs["null-signal"].steps == cfgs["full"].steps == 2
    with pytest.raises(UserError, match="unknown null signal"):
        check_grid(grid('null_signal = "on"'), tmp_path / "out")
    with pytest.raises(UserError, match="'steps' is the same for every arm"):
        grid("steps = 5")
    with pytest.raises(UserError, match="unknown option 'nulll'"):
        check_grid(grid('nulll = "shuffle"'), tmp_path / "out")
    # an arm called "null" would come back from summary.csv as a missing value (pandas): refused by name
    (tmp_path / "na.toml").write_text(f'teacher = "{tiny_teacher}"\nmethods = ["diffratio-js"]\nseeds = [0]\n'
                                      '[inits]\nnull = "teacher"\n')
    with pytest.raises(UserError, match="reads back as a missing value"):
        load_grid(str(tmp_path / "na.toml"))


# ---------------------------------------------------------------------------- plateau
def _curve(fds, every=100):
    return [(i * every, fd) for i, fd in enumerate(fds)]


def test_plateau_rule_on_made_up_curves():
    flat_tail = _curve([600, 80, 40, 25, 21, 20.4, 20.1, 19.9, 20.2, 20.0, 19.8, 20.1, 20.0, 19.9, 20.1, 20.0])
    stop = plateau_reached(flat_tail, tol=0.5)
    assert stop is not None and stop["step"] == 1500 and stop["evaluations"] == 4 and stop["from_step"] == 1200
    assert stop["fd_max_deviation"] <= 0.5 and stop["fd_mean"] == pytest.approx(20.0)
    assert plateau_reached(flat_tail, tol=0.05) is None             # tighter than the tail's spread
    assert plateau_reached(flat_tail, tol=0.0) is None              # 0 = off
    assert plateau_reached(flat_tail, tol=0.5, min_steps=1600) is None
    descent = _curve([600 - 15 * i for i in range(30)])             # a steady fall: never a plateau
    assert plateau_reached(descent, tol=0.5) is None and plateau_reached(descent, tol=20.0) is None
    converging = [20 + 580 * 0.7 ** i for i in range(40)]           # falls ever more slowly towards 20
    first = next(i for i in range(1, 41) if plateau_reached(_curve(converging[:i]), tol=0.5))
    assert converging[first - 1] < 20.5 and converging[first - 4] - converging[first - 1] <= 1.0
    # the window is a fraction of the curve: 4 flat points after a long fall are not enough at n = 20
    late = _curve([600 - 30 * i for i in range(16)] + [100, 100, 100, 100])
    assert plateau_reached(late, tol=1.0) is None and plateau_reached(late, tol=1.0, window=0.2)["evaluations"] == 4
    assert plateau_reached(_curve([20, 20, 20]), tol=1.0) is None   # fewer than PLATEAU_MIN_EVALS
    assert plateau_reached(_curve([20] * PLATEAU_MIN_EVALS), tol=1.0) is not None  # a flat start is a plateau
    assert plateau_reached(_curve([20, 20, float("nan"), 20, 20]), tol=1.0) is None


def test_plateau_options_are_checked(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="needs eval_every > 0"):
        _cfg(tmp_path / "a", tiny_teacher, plateau_tol=1.0, eval_every=0)
    with pytest.raises(UserError, match="plateau_window"):
        _cfg(tmp_path / "b", tiny_teacher, plateau_window=1.5, eval_every=1)
    with pytest.raises(UserError, match="plateau_tol"):
        _cfg(tmp_path / "c", tiny_teacher, plateau_tol=-1.0, eval_every=1)


@pytest.fixture
def fake_evaluator(fake_evaluator):
    """The shared fake evaluator (tests/conftest.py) with "FD" = 100 x mean |x|."""
    fake_evaluator.scale = 100.0
    return fake_evaluator


def test_a_run_stops_at_its_plateau_and_a_resume_trains_no_further(tiny_teacher, tmp_path, fake_evaluator):
    kw = dict(steps=12, eval_every=1, eval_samples=16, log_every=3, checkpoint_every=5, lr_g=1e-5, plateau_tol=1.0)
    free = train_student(_cfg(tmp_path / "free", tiny_teacher, **{**kw, "plateau_tol": 0.0}), progress=False)
    evals = [(r["step"], r["eval_fd"]) for r in read_metrics(free) if "eval_fd" in r]
    # where the rule says the same curve stops (the run is deterministic); a small lr keeps the FD flat
    expect = next(s for i, (s, _) in enumerate(evals) if s < 12 and plateau_reached(evals[:i + 1], 1.0))
    assert expect < 12
    cfg = _cfg(tmp_path / "stop", tiny_teacher, **kw)
    run = train_student(cfg, progress=False)
    rows = read_metrics(run)
    assert load_state(run)["step"] == expect and load_state(run)["stopped"]["step"] == expect
    assert rows[-1]["stopped_early"] == 1 and rows[-1]["step"] == expect
    assert any(r["step"] == expect and "loss_g" in r for r in rows)   # the short last interval is logged
    assert [r for r in _logged(run) if "eval_fd" in r] == [r for r in _logged(free) if "eval_fd" in r][:expect + 1]
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == expect and final["stopped_early"]["step"] == expect
    assert final["stopped_early"]["rule"].startswith("stop at an evaluation")
    assert read_manifest(run)["finished"] == {"steps": 12, "stopped_early": final["stopped_early"]}
    assert run_status(run, 12) == "done"
    before = _logged(run)
    train_student(StudentConfig(**{**cfg.__dict__, "steps": 20}), resume=True, progress=False)   # a bigger budget
    assert load_state(run)["step"] == expect and _logged(run) == before and run_status(run, 20) == "done"
    # killed before the stop, resumed: the same stop (the evaluations so far come back from the log)
    cut = _cfg(tmp_path / "cut", tiny_teacher, **kw)
    train_student(cut, progress=False, stop_after=expect - 1)
    train_student(cut, resume=True, progress=False)
    assert load_state(tmp_path / "cut")["stopped"] == load_state(run)["stopped"] and _logged(tmp_path / "cut") == before


def test_cli_passes_the_new_options(tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from probe.cli import app

    args = ["train", "student", "--teacher", str(tiny_teacher), "--steps", "2", "--batch", "8", "--eval-every", "0"]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "s"), "--null-signal", "shuffle",
                                             "--plateau-window", "0.5", "--ema-halflife", "8000",
                                             "--ema-rampup", "0.05"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "s" / "config.json").read_text())["config"]
    assert config["null_signal"] == "shuffle" and config["plateau_window"] == 0.5
    assert config["ema_halflife_images"] == 8000 and config["ema_rampup"] == 0.05
    assert "n_b0" in read_metrics(tmp_path / "s")[-1]
    bad = CliRunner().invoke(app, args + ["--out", str(tmp_path / "t"), "--null-signal", "labels"])
    assert isinstance(bad.exception, UserError) and "unknown null signal 'labels'" in str(bad.exception)
