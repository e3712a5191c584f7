"""The CLI's contract: every default comes from the config (or function) it stands for, and every
bad input ends with exit code 2, exactly one line on stderr and nothing created.

The table and the property test call ``probe.cli.main`` in this process (the entry point's own
function: same parsing, same error handling) to stay fast; test_cli.py and a few cases below run
the installed entry point as a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _cli import run_probe
from _store_fixture import random_features, write_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe.cli import app, main

# ------------------------------------------------------------------------------- defaults
# command -> (where its defaults live, {option name: field name} where they differ)
SOURCES = {
    "train teacher": ("train.teacher:TeacherConfig", {"ema_halflife": "ema_halflife_images"}),
    "train student": ("train.student.loop:StudentConfig", {"ema_halflife": "ema_halflife_images"}),
    "train regress": ("train.regress:RegressConfig", {}),
    "train transplant": ("train.transplant:TransplantConfig", {}),
    "train ablation": ("train.ablation.grid:AblationConfig|train.ablation.launch:LaunchConfig",
                       {"time": "time_min", "gpus_per_job": "gpus", "cpus_per_job": "cpus",
                        "submitit_cluster": "cluster"}),
    "report": ("analysis.report:ReportConfig", {}),
    "demo": ("probe.demo:DemoConfig", {}),
    "eval": ("probe.quality.evaluate:EvalConfig", {}),
    "extract": ("probe.features.extract:ExtractConfig", {}),
    "linear": ("analysis.linear:probe_table", {}),
    "cka": ("analysis.cka:cka_table", {"file_b": "store_b"}),
    "umap": ("analysis.umap_view:umap_panels", {}),
    "layers": ("probe.features.hooks:list_layers", {"depth": "max_depth"}),
}
# Options whose text form stands for a field in another shape: their CLI default must be None,
# which means "the config's (or function's) own default".
CONVERTED = {"layers": "text 'a,b' -> a tuple / list", "sigmas": "text 'a,b' -> a tuple / list",
             "targets": "text list", "sigma_range": "text 'LO,HI' -> (lo, hi)", "seeds": "text '0,1' -> a tuple",
             "mode": "cka: None = pair with two files, layers with one",
             "target_fd": "regress: text, a number or 'teacher'"}
# Options of the call that are no setting of the config (the only other exceptions).
EXTRAS = {"resume", "overwrite", "fig", "csv", "grid", "out",
          "health", "model",  # eval: --health DATA replaces the (then optional) model argument
          "status", "config"}  # train ablation: --status OUT replaces --config/--out


def _commands(group=None, prefix=""):
    import typer

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path + " ")
        else:
            yield path, cmd


def _source_defaults(source: str) -> dict:
    """Field (or keyword) defaults of "module:Name", or of several joined with "|" (a command that fills
    two configs, e.g. the grid and its launcher)."""
    if "|" in source:
        return {k: v for part in source.split("|") for k, v in _source_defaults(part).items()}
    module, owner = source.split(":")
    obj = getattr(importlib.import_module(module), owner)
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(obj)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


def _same(cli_value, field_value) -> bool:
    if isinstance(cli_value, Path):
        cli_value = str(cli_value)
    if isinstance(field_value, float) or isinstance(cli_value, float):
        return cli_value is not None and field_value is not None and math.isclose(cli_value, field_value)
    return cli_value == field_value and type(cli_value) is type(field_value)


def test_every_command_is_covered_by_this_test():
    assert {path for path, _ in _commands()} == set(SOURCES)


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_cli_defaults_are_the_config_defaults(command):
    source, renames = SOURCES[command]
    fields = _source_defaults(source)
    checked = []
    for param in dict(_commands())[command].params:
        if param.name == "help" or param.required:
            continue
        field = renames.get(param.name, param.name)
        flag = f"probe {command} --{param.name.replace('_', '-')}"
        if param.name in CONVERTED:
            assert param.default is None, f"{flag}: a converted option defaults to None (= the config's default)"
        elif field in fields:
            assert _same(param.default, fields[field]), \
                f"{flag}: CLI default {param.default!r} != {source}.{field} = {fields[field]!r}"
            checked.append(param.name)
        else:
            assert param.name in EXTRAS, f"{flag} stands for no field of {source}; map it or list it in EXTRAS"
    assert checked  # every command has defaults, and they come from its source


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_help_texts_survive_rich_markup(command):
    # typer renders help through rich, which reads "[...]" as a style tag and drops it without a word
    # ("Optimiser steps [default: 2400 on scenes, else 1600]." was shown as "Optimiser steps .")
    from rich.text import Text

    for param in dict(_commands())[command].params:
        text = getattr(param, "help", None)
        if text:
            assert Text.from_markup(text).plain == text, f"probe {command} --{param.name}: help loses {text!r}"


def test_the_drifts_of_issue_13_are_settled():
    from probe.quality.evaluate import EvalConfig
    from train.student.loop import StudentConfig

    cmds = dict(_commands())
    eval_every = next(p for p in cmds["train student"].params if p.name == "eval_every")
    device = next(p for p in cmds["eval"].params if p.name == "device")
    assert eval_every.default == StudentConfig.eval_every == 100   # quality curves by default, as the CLI had
    assert device.default == EvalConfig.device == "auto"            # like every other command


# --------------------------------------------------------------------------- bad inputs
def run_main(argv) -> tuple[int, str, str]:
    """``probe ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def listing(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher):
    """Valid inputs the bad calls refer to: a teacher, a feature file, a file where a dir is expected."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    write_store(d / "f.h5", random_features(rng, n=60), sigmas=[0.0, 1.0], labels=np.arange(60) % 3)
    (d / "afile").write_text("not a directory")
    grids = {
        "bad-syntax": "teacher = \n",
        "extract-n": _grid(tiny_teacher, features="true", extract="[extract]\nn_samples = -1\n"),
        "extract-sigmas": _grid(tiny_teacher, features="true", extract="[extract]\nsigmas = [0.0, nan]\n"),
        "student-lr": _grid(tiny_teacher, student="lr_g = nan\n"),
        "student-steps": _grid(tiny_teacher, steps="-1"),
        "student-float-steps": _grid(tiny_teacher, steps="2.5"),
        "init-spec": _grid(tiny_teacher, inits='x = "keep:nosuch.*"\n'),
        "seeds": _grid(tiny_teacher, seeds="[-1]"),
        "prereq-lr": _grid(tiny_teacher, prereq='[prereq.b]\nkind = "teacher"\npreset = "test"\nlr = -1\n'),
    }
    for name, text in grids.items():
        (d / f"{name}.toml").write_text(text)
    return {"teacher": str(tiny_teacher), "f": str(d / "f.h5"), "afile": str(d / "afile"), "dir": str(d)}


def _grid(teacher, features="false", extract="", student="", inits='x = "teacher"\n', seeds="[0]", prereq="",
          steps="1"):
    return (f'teacher = "{teacher}"\nmethods = ["diffratio-js"]\nseeds = {seeds}\nfeatures = {features}\n'
            f"reference_steps = 0\n[student]\nsteps = {steps}\nbatch = 8\neval_every = 1\neval_samples = 100\n{student}"
            f"[inits]\n{inits}{extract}{prereq}")


T = ["train", "teacher", "--out", "{tmp}/t", "--preset", "test", "--steps", "2", "--batch", "8", "--eval-samples", "0"]
S = ["train", "student", "--teacher", "{teacher}", "--out", "{tmp}/s", "--steps", "1", "--batch", "8"]
R = ["train", "regress", "--teacher", "{teacher}", "--out", "{tmp}/r", "--steps", "1", "--n-pairs", "8"]
TP = ["train", "transplant", "--teacher", "{teacher}", "--out", "{tmp}/p", "--steps", "1", "--batch", "4"]
A = ["train", "ablation", "--out", "{tmp}/a"]
EX = ["extract", "{teacher}", "--out", "{tmp}/x.h5", "--n-samples", "8"]
EV = ["eval", "{teacher}", "--steps", "1"]
CKA = ["cka", "{f}", "--out", "{tmp}/c.csv"]
UM = ["umap", "{f}", "--out", "{tmp}/u.png"]
LIN = ["linear", "{f}", "--out", "{tmp}/p.csv"]

# name -> (argv, a fragment of the one line on stderr)
BAD = {
    # train teacher: numbers
    "teacher steps negative": (T + ["--steps", "-5"], "steps must be an integer >= 1, got -5"),
    "teacher steps zero": (T + ["--steps", "0"], "steps must be an integer >= 1, got 0"),
    "teacher steps not a number": (T + ["--steps", "abc"], "Invalid value for '--steps'"),
    "teacher steps float": (T + ["--steps", "2.5"], "Invalid value for '--steps'"),
    "teacher batch zero": (T + ["--batch", "0"], "batch must be an integer >= 1"),
    "teacher accum zero": (T + ["--accum", "0"], "accum must be an integer >= 1"),
    "teacher lr negative": (T + ["--lr", "-1"], "lr must be a finite number > 0, got -1"),
    "teacher lr nan": (T + ["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    "teacher lr inf": (T + ["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    "teacher ema half-life negative": (T + ["--ema-halflife", "-1"], "ema_halflife_images must be a finite number > 0"),
    "teacher ema ramp-up negative": (T + ["--ema-rampup", "-0.1"], "ema_rampup must be a finite number >= 0"),
    "student ema half-life zero": (S + ["--ema-halflife", "0"], "ema_halflife_images must be a finite number > 0"),
    "student ema ramp-up nan": (S + ["--ema-rampup", "nan"], "ema_rampup must be a finite number >= 0"),
    "teacher checkpoint every zero": (T + ["--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1"),
    "teacher sample steps zero": (T + ["--sample-steps", "0"], "sample_steps must be an integer >= 1"),
    "teacher eval samples negative": (T + ["--eval-samples", "-1"], "eval_samples must be an integer >= 0"),
    "teacher eval samples too few": (T + ["--eval-samples", "2"], "eval_samples must be 0 (skip) or an integer >= 4"),
    "teacher seed negative": (T + ["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    "teacher seed too large": (T + ["--seed", str(2 ** 64)], "seed must be an integer below 2**63"),
    "teacher sigma range reversed": (T + ["--sigma-range", "2,1"], "sigma_range must be two numbers LO,HI"),
    "teacher sigma range zero": (T + ["--sigma-range", "0,1"], "sigma_range must be a finite number > 0, got 0"),
    "teacher sigma range nan": (T + ["--sigma-range", "nan,1"], "sigma_range must be a finite number > 0, got nan"),
    "teacher sigma range one value": (T + ["--sigma-range", "1"], "--sigma-range takes 'LO,HI'"),
    "teacher sigma range text": (T + ["--sigma-range", "a,b"], "--sigma-range expects a comma-separated list"),
    # train teacher: names and paths
    "teacher unknown data set": (T + ["--data", "imagenet"], "unknown data set"),
    "teacher missing image folder": (T + ["--data", "folder:{tmp}/nowhere"], "does not exist"),
    "teacher unknown preset": (T + ["--preset", "huge"], "unknown UNet preset 'huge'"),
    "teacher unknown device": (T + ["--device", "gpu"], "unknown device 'gpu'"),
    "teacher out is a file": (["train", "teacher", "--out", "{afile}"], "is a file; give a directory"),
    "teacher out under a file": (["train", "teacher", "--out", "{afile}/t"], "is a file, not a directory"),
    "teacher unknown option": (T + ["--stepz", "3"], "No such option: --stepz"),
    "teacher missing --out": (["train", "teacher"], "Missing option '--out'"),
    # train student
    "student lr-g negative": (S + ["--lr-g", "-1"], "lr_g must be a finite number > 0, got -1"),
    "student lr-aux nan": (S + ["--lr-aux", "nan"], "lr_aux must be a finite number > 0, got nan"),
    "student sigma-init zero": (S + ["--sigma-init", "0"], "sigma_init must be a finite number > 0, got 0"),
    "student sigma-init inf": (S + ["--sigma-init", "inf"], "sigma_init must be a finite number > 0, got inf"),
    "student steps negative": (S + ["--steps", "-1"], "steps must be an integer >= 0, got -1"),
    "student batch negative": (S + ["--batch", "-8"], "batch must be an integer >= 1, got -8"),
    "student aux steps zero": (S + ["--aux-steps", "0"], "aux_steps must be an integer >= 1"),
    "student eval every negative": (S + ["--eval-every", "-1"], "eval_every must be an integer >= 0"),
    "student grad clip inf": (S + ["--grad-clip", "inf"], "grad_clip must be a finite number >= 0, got inf"),
    "student fkl clip zero": (S + ["--fkl-clip", "0"], "fkl_clip must be a finite number > 0"),
    "student unknown method": (S + ["--method", "dmd"], "unknown method 'dmd'"),
    "student unknown ratio net": (S + ["--ratio-net", "resnet"], "unknown ratio network 'resnet'"),
    "student init spec matches nothing": (S + ["--init", "keep:nosuch.*"], "matches no module"),
    "student init spec unknown op": (S + ["--init", "nonsense"], "init spec"),
    "student missing teacher": (["train", "student", "--teacher", "{tmp}/none", "--out", "{tmp}/s"], "does not exist"),
    # train regress
    "regress pairs zero": (R + ["--n-pairs", "0"], "n_pairs must be an integer >= 1, got 0"),
    "regress lr zero": (R + ["--lr", "0"], "lr must be a finite number > 0, got 0"),
    "regress sample steps negative": (R + ["--sample-steps", "-2"], "sample_steps must be an integer >= 1"),
    "regress eval samples negative": (R + ["--eval-samples", "-5"], "eval_samples must be an integer >= 0"),
    "regress target fd not a number": (R + ["--target-fd", "best"], "target_fd must be a number >= 0 or"),
    "regress target fd without evaluation": (R + ["--target-fd", "500", "--eval-samples", "0"], "eval_samples > 0"),
    "transplant output layer": (TP + ["--layers", "conv_out"], "the network's output"),
    "transplant unknown layer": (TP + ["--layers", "down_blcks.0"], "unknown layer 'down_blcks.0'"),
    "transplant unknown loss": (TP + ["--loss", "l1"], "unknown loss 'l1'"),
    "transplant sigmas": (TP + ["--sigmas", "0.5,nan"], "each of --sigmas must be a finite"),
    # train ablation
    "ablation missing grid file": (A + ["--config", "{tmp}/none.toml"], "grid file"),
    "ablation unknown shipped grid": (A + ["--config", "papr"], "does not exist (shipped grids"),
    "ablation steps negative": (A + ["--config", "quick", "--steps", "-3"], "--steps must be an integer >= 0"),
    "ablation seeds repeated": (A + ["--config", "quick", "--seeds", "0,0"], "--seeds expects distinct integers"),
    "ablation seeds not integers": (A + ["--config", "quick", "--seeds", "0,nan"], "--seeds expects comma-separated"),
    "ablation seeds negative": (A + ["--config", "quick", "--seeds", "-1"], "--seeds must be an integer >= 0"),
    "ablation unknown device": (A + ["--config", "quick", "--device", "tpu"], "unknown --device 'tpu'"),
    "ablation grid bad syntax": (A + ["--config", "{dir}/bad-syntax.toml"], "is not valid TOML"),
    "ablation grid extract n_samples": (A + ["--config", "{dir}/extract-n.toml"], "n_samples must be an integer >= 1"),
    "ablation grid extract nan sigma": (A + ["--config", "{dir}/extract-sigmas.toml"],
                                        "each of sigmas must be a finite"),
    "ablation grid student lr nan": (A + ["--config", "{dir}/student-lr.toml"], "lr_g must be a finite number > 0"),
    "ablation grid student steps": (A + ["--config", "{dir}/student-steps.toml"], "steps must be an integer >= 0"),
    "ablation grid float steps": (A + ["--config", "{dir}/student-float-steps.toml"], "steps must be an integer"),
    "ablation grid init spec": (A + ["--config", "{dir}/init-spec.toml"], "matches no module"),
    "ablation grid negative seed": (A + ["--config", "{dir}/seeds.toml"], "seeds must be distinct non-negative"),
    "ablation grid prereq lr": (A + ["--config", "{dir}/prereq-lr.toml"], "lr must be a finite number > 0"),
    # eval
    "eval samples zero": (EV + ["--n-samples", "0"], "n_samples must be an integer >= 4, got 0"),
    "eval steps zero": (EV + ["--steps", "0"], "steps must be an integer >= 1, got 0"),
    "eval seed negative": (EV + ["--seed", "-3"], "seed must be an integer >= 0"),
    "eval churn negative": (EV + ["--churn", "-1"], "churn must be a finite number >= 0, got -1"),
    "eval churn window reversed": (EV + ["--churn", "1", "--churn-tmin", "2", "--churn-tmax", "1"],
                                   "churn_tmax (1.0) is below churn_tmin (2.0)"),
    "eval missing model": (["eval", "{tmp}/none"], "does not exist"),
    "eval not a model": (["eval", "{dir}"], "neither a toolkit run directory"),
    "eval data of another shape": (EV + ["--data", "shapes", "--n-samples", "100"], "shapes has 3x16x16"),
    "eval out under a file": (EV + ["--out", "{afile}/e.json"], "is a file, not a directory"),
    # layers
    "layers depth zero": (["layers", "{teacher}", "--depth", "0"], "--depth must be an integer >= 1"),
    "layers unknown layer": (["layers", "{teacher}", "--layers", "nosuch"], "unknown layer 'nosuch'"),
    "layers missing model": (["layers", "{tmp}/none"], "does not exist"),
    # extract
    "extract negative sigma": (EX + ["--sigmas", "0,-1"], "each of --sigmas must be a finite number >= 0, got -1"),
    "extract nan sigma": (EX + ["--sigmas", "nan"], "each of --sigmas must be a finite number >= 0, got nan"),
    "extract empty sigma list": (EX + ["--sigmas", ","], "--sigmas is empty"),
    "extract sigma text": (EX + ["--sigmas", "0,x"], "--sigmas expects a comma-separated list of numbers"),
    "extract batch zero": (EX + ["--batch", "0"], "batch must be an integer >= 1, got 0"),
    "extract samples zero": (EX + ["--n-samples", "0"], "n_samples must be an integer >= 1, got 0"),
    "extract noise seed negative": (EX + ["--noise-seed", "-1"], "noise_seed must be an integer >= 0"),
    "extract unknown layer": (EX + ["--layers", "nosuch_block"], "unknown layer 'nosuch_block'"),
    "extract empty layer list": (EX + ["--layers", ","], "--layers is empty"),
    "extract unknown pooling": (EX + ["--pooling", "max"], "unknown pooling 'max'"),
    "extract unknown split": (EX + ["--split", "val"], "unknown split 'val'"),
    "extract out is a directory": (["extract", "{teacher}", "--out", "{dir}"], "is a directory"),
    "extract too many samples": (EX + ["--n-samples", "100000"], "exceeds"),
    # linear
    "linear missing file": (["linear", "{tmp}/none.h5", "--out", "{tmp}/p.csv"], "feature file not found"),
    "linear not a feature file": (["linear", "{afile}", "--out", "{tmp}/p.csv"], "not an HDF5 file"),
    "linear seed negative": (LIN + ["--seed", "-1"], "seed must be an integer >= 0"),
    "linear sigma text": (LIN + ["--sigmas", "x"], "--sigmas expects a comma-separated list"),
    "linear sigma not stored": (LIN + ["--sigmas", "7"], "sigma 7 is not in"),
    "linear unknown layer": (LIN + ["--layers", "nosuch"], "unknown layer 'nosuch'"),
    "linear unknown target": (LIN + ["--targets", "colour"], "unknown probe target 'colour'"),
    # cka
    "cka n-perm negative": (CKA + ["--n-perm", "-1"], "--n-perm must be an integer >= 0, got -1"),
    "cka k zero": (CKA + ["--k", "0"], "--k must be an integer >= 1, got 0"),
    "cka sigma factor nan": (CKA + ["--sigma-factor", "nan"], "--sigma-factor must be a finite number > 0, got nan"),
    "cka unknown estimator": (CKA + ["--estimator", "foo"], "unknown CKA estimator 'foo'"),
    "cka pair with one file": (CKA + ["--mode", "pair"], "--mode pair compares two files"),
    "cka unknown layer": (CKA + ["--layers", "nosuch"], "unknown layer 'nosuch'"),
    "cka negative sigma": (CKA + ["--sigmas", "-0.5"], "each of --sigmas must be a finite number >= 0"),
    # umap
    "umap max points zero": (UM + ["--max-points", "0"], "--max-points must be an integer >= 4, got 0"),
    "umap sigma negative": (UM + ["--sigma", "-1"], "--sigma must be a finite number >= 0, got -1"),
    "umap seed negative": (UM + ["--seed", "-2"], "--seed must be an integer >= 0"),
    "umap missing file": (["umap", "{tmp}/none.h5", "--out", "{tmp}/u.png"], "feature file not found"),
    "umap unknown layer": (UM + ["--layer", "nosuch"], "unknown layer 'nosuch'"),
    "umap unknown colour": (UM + ["--color-by", "nosuch"], "cannot colour by 'nosuch'"),
    # report
    "report missing input": (["report", "{tmp}/none", "--out", "{tmp}/r.pdf"], "does not exist"),
    "report seed negative": (["report", "{dir}", "--out", "{tmp}/r.pdf", "--seed", "-1"], "--seed must be an integer"),
    "report out under a file": (["report", "{dir}", "--out", "{afile}/r.pdf"], "is a file, not a directory"),
    # demo
    "demo seed negative": (["demo", "--out", "{tmp}/d", "--report", "{tmp}/d.pdf", "--seed", "-1"], "seed must be"),
    "demo unknown device": (["demo", "--out", "{tmp}/d", "--report", "{tmp}/d.pdf", "--device", "tpu"],
                            "unknown device"),
    "demo out under a file": (["demo", "--out", "{afile}/d", "--report", "{tmp}/d.pdf"], "is a file, not a directory"),
    # the command line itself
    "unknown command": (["trian"], "No such command 'trian'"),
}


def test_the_table_covers_every_command_with_forty_cases():
    assert len(BAD) >= 40
    covered = {" ".join(argv[:2]) if argv[0] == "train" else argv[0] for argv, _ in BAD.values()}
    assert covered >= set(SOURCES)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(name, inputs, tmp_path):
    argv, fragment = BAD[name]
    argv = [a.format(tmp=tmp_path, **inputs) for a in argv]
    before_tmp, before_inputs = listing(tmp_path), listing(Path(inputs["dir"]))
    code, _, err = run_main(argv)
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert listing(tmp_path) == before_tmp and listing(Path(inputs["dir"])) == before_inputs  # nothing created


@pytest.mark.parametrize("argv, fragment", [
    (["train", "teacher", "--out", "{tmp}/t", "--steps", "-5"], "steps must be an integer >= 1, got -5"),
    (["train", "teacher", "--out", "{tmp}/t", "--steps", "abc"], "Invalid value for '--steps'"),
    (["cka", "{tmp}/none.h5", "--out", "{tmp}/c.csv", "--n-perm", "-1"], "--n-perm must be an integer >= 0"),
])
def test_bad_input_through_the_entry_point(tmp_path, argv, fragment):
    r = run_probe(*[a.format(tmp=tmp_path) for a in argv])
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()] and fragment in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ property-based
def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0 and math.isfinite(float(text))
    except ValueError:
        return False


# random text that is not a usable positive number: negatives, zero, nan/inf, floats for ints, junk
NOT_POSITIVE = st.one_of(
    st.integers(max_value=0).map(str),
    st.floats(max_value=0.0, allow_nan=False).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "", " ", "0x10", "1,2", "--", "None"]),
    st.text(alphabet="0123456789.-+eEinfa, ", max_size=8),
).filter(lambda s: not _positive_number(s))

TEACHER_OPTIONS = ["--steps", "--batch", "--accum", "--lr", "--ema-halflife", "--checkpoint-every", "--sample-steps"]


def _assert_clean(code, err, workdir: Path):
    lines = err.splitlines()
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert not list(workdir.iterdir()), list(workdir.iterdir())  # refused: nothing was created


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(TEACHER_OPTIONS), value=NOT_POSITIVE)
def test_random_bad_numbers_for_train_teacher(option, value):
    with tempfile.TemporaryDirectory() as d:
        code, _, err = run_main(["train", "teacher", "--out", f"{d}/t", "--preset", "test", "--steps", "1",
                                 "--eval-samples", "0", option, value])
        assert code == 2  # none of these values is usable
        _assert_clean(code, err, Path(d))


def _not_negative_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


# the same for seeds, where 0 is valid: negatives, nan/inf, junk
NEGATIVE = NOT_POSITIVE.filter(lambda s: not _not_negative_number(s))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(st.tuples(st.just("eval"), st.sampled_from(["--n-samples", "--steps"]), NOT_POSITIVE),
                      st.tuples(st.just("eval"), st.just("--seed"), NEGATIVE),
                      st.tuples(st.just("extract"), st.sampled_from(["--n-samples", "--batch"]), NOT_POSITIVE),
                      st.tuples(st.just("extract"), st.just("--noise-seed"), NEGATIVE)))
def test_random_bad_numbers_for_eval_and_extract(inputs, case):
    command, option, value = case
    with tempfile.TemporaryDirectory() as d:
        out = ["--out", f"{d}/x.h5"] if command == "extract" else []
        code, _, err = run_main([command, inputs["teacher"], *out, option, value])
        assert code == 2
        _assert_clean(code, err, Path(d))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--n-perm", "--k", "--sigma-factor", "--sigmas", "--seed", "--layers"]),
       value=st.one_of(NOT_POSITIVE, st.integers(0, 3).map(str), st.sampled_from(["0", "1", "0,1", "down_blocks.0"])))
def test_random_options_for_cka_succeed_or_fail_in_one_line(inputs, option, value):
    # here a value may be valid: the run must then succeed (tiny store), else fail cleanly
    with tempfile.TemporaryDirectory() as d:
        code, out, err = run_main(["cka", inputs["f"], "--out", f"{d}/c.csv", option, value])
        _assert_clean(code, err, Path(d))
        if code == 0:
            assert (Path(d) / "c.csv").exists() and "wrote" in out
