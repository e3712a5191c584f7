"""The feature transplant: internal features trained towards the teacher's, the output layer left alone,
exact resume, and a grid that builds a transplanted (and a target-FD regressed) generator as prerequisites."""

import json

import pandas as pd
import pytest
import torch
from _grid import TINY_STUDENT, TINY_TEACHER, run_grid

from probe.core.errors import UserError
from probe.core.models import load_model
from probe.core.runs import load_state, read_metrics, run_status
from train.initspec import fresh_state
from train.transplant import TransplantConfig, transplant_features


def _cfg(teacher, out, **kw):
    values = {"steps": 12, "batch": 8, "n_val": 16, "sigmas": (0.5, 2.5), "lr": 3e-3, "lr_warmup": 1,
              "checkpoint_every": 4, "log_every": 2, "eval_samples": 0, **kw}
    return TransplantConfig(out=str(out), teacher=str(teacher), **values)


@pytest.mark.parametrize("loss", ["regression", "cka"])
def test_transplant_lowers_the_feature_loss_and_never_touches_the_output_layer(tiny_teacher, tmp_path, loss):
    run = transplant_features(_cfg(tiny_teacher, tmp_path / loss, loss=loss, seed=3), progress=False)
    r = json.loads((run / "transplant.json").read_text())
    assert r["loss_after"] < r["loss_before"]          # on the held-out images, not the training batches
    assert set(r["layers"]) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert len(r["per_layer_sigma"]) == len(r["layers"]) * 2
    # the output layer gets no gradient from internal features: it is exactly the random init of this seed
    # (the "random" arm's); everything upstream of the matched layers moved
    gen = load_model(run)
    random_init = fresh_state(gen.unet.config, 3)
    final = gen.unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        assert torch.equal(final[name], random_init[name])
    assert {"conv_out", "conv_norm_out"} == set(r["untouched"])
    assert not torch.equal(final["conv_in.weight"], random_init["conv_in.weight"])
    assert not torch.equal(final["mid_block.resnets.0.conv1.weight"], random_init["mid_block.resnets.0.conv1.weight"])
    assert gen.kind == "generator" and gen.info["init"] == "random" and gen.info["loss"] == loss
    assert gen.generator is not None and gen.generator.sigma_init == 2.5
    rows = [row for row in read_metrics(run) if "val_regression" in row]
    assert [row["step"] for row in rows] == [0, 4, 8, 12]


def test_transplant_resumes_exactly_after_a_kill(tiny_teacher, tmp_path):
    full = transplant_features(_cfg(tiny_teacher, tmp_path / "full"), progress=False)
    transplant_features(_cfg(tiny_teacher, tmp_path / "cut"), progress=False, stop_after=6)  # checkpoint at 4
    assert run_status(tmp_path / "cut", 12) == "partial"
    cut = transplant_features(_cfg(tiny_teacher, tmp_path / "cut"), resume=True, progress=False)
    a, b = load_state(full), load_state(cut)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert json.loads((full / "transplant.json").read_text())["loss_after"] == \
        json.loads((cut / "transplant.json").read_text())["loss_after"]


def test_transplant_refuses_the_output_layer(tiny_teacher, tmp_path):
    with pytest.raises(UserError, match="network's output"):
        _cfg(tiny_teacher, tmp_path / "a", layers=("conv_out",))
    with pytest.raises(UserError, match="network's output layer"):   # a glob that reaches it
        transplant_features(_cfg(tiny_teacher, tmp_path / "b", layers=("conv_*",)), progress=False)
    with pytest.raises(UserError, match="unknown loss"):
        _cfg(tiny_teacher, tmp_path / "c", loss="l1")
    assert not (tmp_path / "b").exists()


GRID = """
teacher = "@teacher"
methods = ["diffratio-js"]
seeds = [0]
features = false
reference_steps = 0
""" + TINY_STUDENT + """
[inits]
full         = { spec = "teacher", group = "teacher" }
transplanted = { spec = "from:@transplanted", group = "features" } # features only, output layer random
# (an arm "from:@matched" would start from the regressed generator; the prerequisite is built anyway)

[prereq.teacher]
""" + TINY_TEACHER + """

[prereq.matched]
kind = "regress"
teacher = "@teacher"
n_pairs = 16
n_val = 8
sample_steps = 2
steps = 4
batch = 8
checkpoint_every = 2
log_every = 1
eval_samples = 64
target_fd = "teacher"
target_every = 2

[prereq.transplanted]
kind = "transplant"
teacher = "@teacher"
sigmas = [0.5, 2.5]
steps = 4
batch = 8
n_val = 16
checkpoint_every = 2
log_every = 1
eval_samples = 64
"""


def test_grid_with_transplant_and_target_fd_prerequisites_end_to_end(tmp_path):
    out = run_grid(tmp_path, GRID)
    s = pd.read_csv(out / "summary.csv").set_index("init")
    assert list(s.index) == ["full", "transplanted"] and (s.status == "done").all()
    assert s.fd_final.notna().all()
    # the target "teacher" is the full arm's step-0 FD, and a prerequisite's own FD is its student's
    # step-0 FD: the same evaluator, latents and weights
    target = json.loads((out / "prereq" / "matched" / "regress.json").read_text())["target"]
    assert target["teacher_fd"] == pytest.approx(s.loc["full", "fd_start"], rel=1e-6)
    assert target["status"] in ("matched", "missed", "not reached")                  # always labelled
    transplant = json.loads((out / "prereq" / "transplanted" / "transplant.json").read_text())
    assert transplant["fd"] == pytest.approx(s.loc["transplanted", "fd_start"], rel=1e-6)
    assert "conv_out" in transplant["untouched"]
    assert "transplant" in (out / "logs" / "prereq.transplanted.log").read_text()


def test_probe_train_transplant_command(tiny_teacher, tmp_path):
    import contextlib
    import io

    from probe.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["train", "transplant", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "p"), "--steps", "2",
              "--batch", "4", "--n-val", "8", "--sigmas", "1,2.5", "--layers", "mid_block", "--eval-samples", "0"])
    assert "untouched: " in out.getvalue() and f"from:{tmp_path / 'p'}" in out.getvalue()
    r = json.loads((tmp_path / "p" / "transplant.json").read_text())
    assert r["layers"] == ["mid_block"] and r["sigmas"] == [1.0, 2.5]
    assert {"conv_out", "up_blocks.0", "up_blocks.1"} <= set(r["untouched"])   # downstream of mid_block
