"""The CLI: user errors end with one readable line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest


def run_probe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "probe.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args,fragment", [
    (["train", "teacher", "--data", "imagenet", "--out", "{tmp}/t"], "unknown data set"),
    (["train", "teacher", "--data", "folder:{tmp}/img6", "--out", "{tmp}/t"], "not divisible"),
    (["eval", "{tmp}/missing"], "does not exist"),
    (["eval", "{tmp}"], "neither a toolkit run directory"),
])
def test_user_errors_exit_2(tmp_path, args, fragment):
    from PIL import Image

    (tmp_path / "img6").mkdir()
    for i in range(4):  # 6x6 images: the 3-level UNet needs a multiple of 4
        Image.new("L", (6, 6), 40 * i).save(tmp_path / "img6" / f"{i}.png")
    assert_user_error(run_probe(*[a.format(tmp=tmp_path) for a in args]), fragment)


def test_eval_of_a_diffusers_ddpm_pipeline(tmp_path):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    from probe.core.models import build_unet

    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet(8, 1, "test"), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    r = run_probe("eval", tmp_path / "pipe", "--data", "digits", "--n-samples", "200", "--steps", "3",
                  "--out", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    assert "real-vs-real floor" in r.stdout and "heun-3" in r.stdout
    import json

    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["fd"] > result["floor"]["fd"]  # an untrained model is far worse than real data
