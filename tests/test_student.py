"""The one-step training loop: every method trains, resume is exact, DiffRatio never runs the teacher."""

import json

import pytest
import torch

import train.student.loop as student
from probe.core.errors import UserError
from probe.core.models import build_unet, load_model
from probe.core.runs import load_state, read_metrics
from train.student.loop import StudentConfig, train_student
from train.student.methods import METHODS
from train.student.methods.diffratio import DiffRatioJS
from train.student.ratio_net import load_ratio_net


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=str(teacher), steps=3, batch=8, checkpoint_every=2, log_every=1, eval_every=0,
                lr_g=1e-3, lr_aux=1e-3, seed=1)
    return StudentConfig(**{**base, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_saves(tiny_teacher, tmp_path, method):
    run = train_student(_cfg(tmp_path / method, tiny_teacher, method=method), progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("loss_g", "loss_aux", "grad_norm_g"))
        assert r["skipped_g"] == r["skipped_aux"] == 0
    state = load_state(run)
    teacher = load_model(tiny_teacher)
    start = teacher.unet.state_dict()
    gen_unet = {k[len("unet."):]: v for k, v in state["generator"].items() if k.startswith("unet.")}
    assert any(not torch.equal(start[k], v) for k, v in gen_unet.items())
    gen = load_model(run)
    assert gen.kind == "generator" and gen.info["sigma_init"] == 2.5 and gen.info["method"]["method"] == method
    assert gen.generator(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    if METHODS[method].aux_dir == "ratio":
        ratio = load_ratio_net(run / "ratio")
        assert torch.allclose(ratio.head.linear.weight, state["aux"]["head.linear.weight"])
        assert "acc_real" in rows[-1] and "acc_fake" in rows[-1]
    else:
        fake = load_model(run / "fake")
        assert any(not torch.equal(start[k], v) for k, v in fake.unet.state_dict().items())
    assert (run / "samples.png").exists() and (run / "samples" / "step-000002.png").exists()
    assert json.loads((run / "config.json").read_text())["config"]["method"] == method


@pytest.mark.parametrize("method", ["diffratio-js", "sid"])
def test_resume_is_exact(tiny_teacher, tmp_path, method):
    full = train_student(_cfg(tmp_path / "full", tiny_teacher, method=method, steps=5), progress=False)
    # killed after step 3; the last checkpoint is step 2, so step 3 is replayed from the saved RNG
    cut = _cfg(tmp_path / "cut", tiny_teacher, method=method, steps=5)
    train_student(cut, progress=False, stop_after=3)
    assert load_state(tmp_path / "cut")["step"] == 2
    train_student(cut, resume=True, progress=False)
    a, b = load_state(full), load_state(tmp_path / "cut")
    for part in ("generator", "aux"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["ema"]["net"]:
        assert torch.equal(a["ema"]["net"][k], b["ema"]["net"][k]), k
    def logged(run):  # everything but wall-clock time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]

    assert logged(full) == logged(tmp_path / "cut")


def _patched_loader(monkeypatch):
    """load_model whose teacher denoiser and UNet raise as soon as they are evaluated."""
    real_load = student.load_model

    def boom(*a, **k):
        raise RuntimeError("the teacher was evaluated")

    def load(path, device="cpu"):
        loaded = real_load(path, device)
        loaded.denoiser.forward = boom
        loaded.unet.forward = boom
        return loaded

    monkeypatch.setattr(student, "load_model", load)


def test_diffratio_never_evaluates_the_teacher(tiny_teacher, tmp_path, monkeypatch):
    _patched_loader(monkeypatch)
    for method in ("diffratio-js", "gan"):
        run = train_student(_cfg(tmp_path / method, tiny_teacher, method=method), progress=False)
        assert load_state(run)["step"] == 3
    with pytest.raises(RuntimeError, match="teacher was evaluated"):  # the patch does bite score distillation
        train_student(_cfg(tmp_path / "vsd", tiny_teacher, method="vsd"), progress=False)


def test_nonfinite_gradients_skip_the_step(tiny_teacher, tmp_path, monkeypatch):
    class Poisoned(DiffRatioJS):
        name = "poisoned"

        def generator_loss(self, fake, rng):
            loss, stats = super().generator_loss(fake, rng)
            return loss * float("nan"), stats

    monkeypatch.setitem(METHODS, "poisoned", Poisoned)
    run = train_student(_cfg(tmp_path / "p", tiny_teacher, method="poisoned"), progress=False)
    rows = read_metrics(run)
    assert [r["skipped_g"] for r in rows] == [1, 2, 3] and rows[-1]["skipped_aux"] == 0
    start = load_model(tiny_teacher).unet.state_dict()
    gen = load_state(run)["generator"]
    assert all(torch.equal(start[k[len("unet."):]], v) for k, v in gen.items() if k.startswith("unet."))


def test_quality_is_evaluated_on_a_fixed_z(tiny_teacher, tmp_path, fake_evaluator):
    seen = fake_evaluator.seen
    run = train_student(_cfg(tmp_path / "e", tiny_teacher, eval_every=2, eval_samples=16, steps=4), progress=False)
    evals = [r for r in read_metrics(run) if "eval_fd" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(s.shape == (16, 1, 8, 8) for s in seen)
    assert len(seen) == 3  # steps 0, 2, 4; eval.json reuses step 4's scores (same weights, same z)
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == 4 and final["fd"] == pytest.approx(evals[-1]["eval_fd"])  # same z, same weights
    assert final["memorisation"] == {"nn_ratio_pixel": 1.0}
    gen = load_model(run)
    z = torch.randn((64, 1, 8, 8), generator=torch.Generator().manual_seed(0))[:16]  # the loop's eval z
    with torch.no_grad():
        assert torch.allclose(gen.generator(z), seen[-1], atol=1e-6)


def test_ddpm_teacher_with_explicit_data(tmp_path):
    torch.manual_seed(0)
    build_unet(8, 1, "test").save_pretrained(tmp_path / "ddpm")
    with pytest.raises(UserError, match="--data"):
        train_student(_cfg(tmp_path / "r0", tmp_path / "ddpm"), progress=False)
    run = train_student(_cfg(tmp_path / "r", tmp_path / "ddpm", data="digits", steps=2), progress=False)
    gen = load_model(run)
    assert gen.denoiser.parameterisation == "ddpm" and gen.dataset == "digits"
    assert load_ratio_net(run / "ratio").inputs.parameterisation == "ddpm"


def test_user_errors(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        train_student(_cfg(tmp_path / "a", tiny_teacher, method="dmd"), progress=False)
    with pytest.raises(UserError, match="ratio network"):
        train_student(_cfg(tmp_path / "b", tiny_teacher, ratio_net="resnet"), progress=False)
    with pytest.raises(UserError, match="shapes has 3x16x16"):
        train_student(_cfg(tmp_path / "c", tiny_teacher, data="shapes"), progress=False)
    with pytest.raises(UserError, match="init spec"):
        train_student(_cfg(tmp_path / "d", tiny_teacher, init="nonsense"), progress=False)
    assert not (tmp_path / "a").exists()


def test_ema_half_life_ramps_up_like_edm():
    cfg = StudentConfig(out="x", teacher="x", batch=64, ema_halflife_images=5000, ema_rampup=0.05)
    assert student.ema_halflife(cfg, 1) == pytest.approx(64 * 0.05)
    assert student.ema_halflife(cfg, 10_000) == 5000
    fixed = StudentConfig(out="x", teacher="x", ema_halflife_images=5000, ema_rampup=0.0)
    assert student.ema_halflife(fixed, 1) == 5000
    default = StudentConfig(out="x", teacher="x")  # 20000 images, reached after 20000 / (0.1 x 64) = 3125 steps
    assert student.ema_halflife(default, 1000) == pytest.approx(6400) and student.ema_halflife(default, 4000) == 20000
