"""Teacher training: a killed run resumed ends with exactly the weights of an uninterrupted run."""

import pytest
import torch

from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import load_state
from train.teacher import TeacherConfig, train_teacher


def _cfg(out, **kw):
    return TeacherConfig(out=str(out), preset="test", steps=6, batch=8, checkpoint_every=2, eval_samples=0,
                         sample_steps=2, **kw)


def test_resume_is_exact(tmp_path):
    full = train_teacher(_cfg(tmp_path / "full"), progress=False)
    # killed after step 3: the last checkpoint is step 2, so resuming replays step 3 from saved RNG state
    train_teacher(_cfg(tmp_path / "cut"), progress=False, stop_after=3)
    assert load_state(tmp_path / "cut")["step"] == 2
    cut = train_teacher(_cfg(tmp_path / "cut"), resume=True, progress=False)
    a, b = load_state(full), load_state(cut)
    assert a["step"] == b["step"] == 6
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    for k in a["ema"]["net"]:
        assert torch.equal(a["ema"]["net"][k], b["ema"]["net"][k]), k
    assert (full / "samples.png").exists()
    assert load_model(full).sha256() == load_model(cut).sha256()


def test_parameters_move_and_outputs_are_saved(tmp_path):
    run = train_teacher(_cfg(tmp_path / "r"), progress=False)
    torch.manual_seed(0)
    from probe.core.models import build_unet

    init = build_unet(8, 1, "test").state_dict()
    trained = load_state(run)["net"]
    assert any(not torch.equal(init[k], trained["unet." + k]) for k in init)
    assert (run / "config.json").exists() and (run / "metrics.jsonl").exists() and (run / "unet").is_dir()


def test_existing_run_is_not_overwritten(tmp_path):
    train_teacher(_cfg(tmp_path / "r"), progress=False, stop_after=2)
    with pytest.raises(UserError, match="--resume"):
        train_teacher(_cfg(tmp_path / "r"), progress=False)
    with pytest.raises(UserError, match="different config"):
        train_teacher(_cfg(tmp_path / "r", lr=1.0), resume=True, progress=False)


def test_default_steps_depend_on_the_data_and_are_recorded(tmp_path):
    from train.teacher import DEFAULT_TEACHER_STEPS, TEACHER_STEPS

    assert TeacherConfig(out=str(tmp_path / "a"), data="scenes").steps == TEACHER_STEPS["scenes"]
    assert TeacherConfig(out=str(tmp_path / "b"), data="digits").steps == DEFAULT_TEACHER_STEPS
    assert TeacherConfig(out=str(tmp_path / "c"), data="scenes", steps=7).steps == 7  # an explicit count wins
    with pytest.raises(UserError, match="steps"):
        TeacherConfig(out=str(tmp_path / "d"), steps=0)
    # the CLI's help states the same numbers (it reads defaults without importing the trainers)
    from pathlib import Path

    cli = (Path(__file__).resolve().parents[1] / "probe" / "cli.py").read_text()
    assert f"{TEACHER_STEPS['scenes']} on scenes, else {DEFAULT_TEACHER_STEPS}" in cli


def test_learning_rate_warms_up_holds_and_cools_down():
    from train.teacher import TeacherConfig, learning_rate

    plain = TeacherConfig(out="x", steps=1000, lr=1e-3, lr_warmup=100, lr_cooldown=0.0)
    assert learning_rate(plain, 0) == pytest.approx(1e-5) and learning_rate(plain, 99) == pytest.approx(1e-3)
    assert learning_rate(plain, 999) == pytest.approx(1e-3)  # constant to the end without a cool-down
    cool = TeacherConfig(out="x", steps=1000, lr=1e-3, lr_warmup=100)
    assert cool.lr_cooldown == 0.25  # the default: the last quarter of the steps
    assert learning_rate(cool, 749) == pytest.approx(1e-3) and learning_rate(cool, 750) == pytest.approx(1e-3)
    assert learning_rate(cool, 875) == pytest.approx(5e-4) and learning_rate(cool, 999) == pytest.approx(4e-6)
    with pytest.raises(UserError, match="lr_cooldown must be a finite number >= 0 and < 1"):
        TeacherConfig(out="x", lr_cooldown=1.0)
