"""Damaged files, two writers, full disks, diverging runs: one line, the right exit code, nothing good lost.

- Corruption: a truncated, garbage or partly overwritten checkpoint, config, manifest, metrics log,
  model file, safetensors weights, ratio network, regression pairs or HDF5 feature file is refused
  with one ``error:`` line naming the file, exit code 2, and no file of the run changes.
- One writer per output: while a process holds an output (a real training subprocess, or a small
  holder process), every other command given that output is refused at once, naming the holder's
  pid and host; after ``kill -9`` of the holder the same command runs.
- Disk full: a write that fails midway (ENOSPC injected into the one low-level writer) ends with one
  line, leaves the previous checkpoint intact, and the rerun completes bit-identically.
- NaN: a learning rate that diverges stops teacher, student and regression with exit code 3 after
  ``max_nonfinite`` bad steps in a row, counted in metrics.jsonl; the checkpoint left holds finite weights.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import socket

import h5py
import pytest
import torch

from probe.core.errors import RunDiverged, UserError
from probe.core.runs import load_state, read_metrics
from tests._reliability import Proc, assert_same_run, cli, one_line_error, runner_argv, snapshot

TALLY = {"corrupted": 0, "detected": 0, "writers": 0, "refused": 0, "nan": 0, "nan_stopped": 0}

# the options of the session's tiny_teacher (tests/conftest.py), as CLI flags
TEACHER_FLAGS = ["--preset", "test", "--steps", "4", "--batch", "16", "--checkpoint-every", "2", "--eval-samples", "0",
                 "--sample-steps", "2"]
STUDENT = dict(steps=2, batch=8, checkpoint_every=1, eval_every=0, device="cpu")
STUDENT_FLAGS = ["--steps", "2", "--batch", "8", "--checkpoint-every", "1", "--eval-every", "0", "--device", "cpu"]
EXTRACT_FLAGS = ["--n-samples", "64", "--batch", "16", "--sigmas", "0,1", "--layers", "down_blocks.0,mid_block",
                 "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    print("\nreliability battery (files): " + json.dumps(TALLY))
    if os.environ.get("RELIABILITY_FILES_RESULTS"):
        with open(os.environ["RELIABILITY_FILES_RESULTS"], "w") as f:
            json.dump(TALLY, f)


@pytest.fixture(scope="module")
def student_run(tiny_teacher, tmp_path_factory):
    from train.student.loop import StudentConfig, train_student

    out = tmp_path_factory.mktemp("student") / "run"
    return train_student(StudentConfig(out=str(out), teacher=str(tiny_teacher), **STUDENT), progress=False)


@pytest.fixture(scope="module")
def features(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "f.h5"
    code, _, err = cli("extract", tiny_teacher, "--out", out, *EXTRACT_FLAGS)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def regress_run(tiny_teacher, tmp_path_factory):
    from train.regress import RegressConfig, regress_generator

    cfg = RegressConfig(out=str(tmp_path_factory.mktemp("regress") / "run"), teacher=str(tiny_teacher), n_pairs=16,
                        n_val=8, sample_steps=2, steps=2, batch=8, checkpoint_every=1, eval_samples=0, device="cpu")
    return regress_generator(cfg, progress=False), cfg


# ------------------------------------------------------------------------------- corruption
def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(random.Random(str(p)).randbytes(max(p.stat().st_size, 64)))


def _middle(p, n: int = 4096):
    """Overwrite up to n bytes in the middle (the file keeps its size)."""
    data = bytearray(p.read_bytes())
    n = min(n, max(len(data) // 4, 1))
    start = len(data) // 2 - n // 2
    data[start:start + n] = random.Random(str(p)).randbytes(n)
    p.write_bytes(bytes(data))


def _edit_number(p):
    """A same-size edit a JSON parser accepts: only the manifest's digest can tell."""
    text = p.read_text()
    assert '"lr": 0.002' in text
    p.write_text(text.replace('"lr": 0.002', '"lr": 0.003'))


def _bad_line(p):
    with open(p, "a") as f:
        f.write('{"step": 5, "loss": \n')


def _cut_line(p):
    data = p.read_bytes()
    p.write_bytes(data[:-5])


def _chunk(ds) -> tuple[int, int]:
    """(byte offset, size) of a stored chunk of an HDF5 dataset (the second one when there are several)."""
    n = ds.id.get_num_chunks()
    info = ds.id.get_chunk_info(min(1, n - 1))
    return info.byte_offset, info.size


def _damage_chunk(p):
    with h5py.File(p, "r") as f:
        offset, size = _chunk(f["features"]["mid_block"])
    with open(p, "r+b") as fh:
        fh.seek(offset + size // 3)
        fh.write(random.Random(1).randbytes(max(size // 3, 8)))


def _incomplete(p):
    with h5py.File(p, "r+") as f:
        f.attrs["complete"] = False


TEACHER_RESUME = ["train", "teacher", "--out", "{run}", *TEACHER_FLAGS, "--resume"]
EVAL = ["eval", "{run}", "--n-samples", "10", "--steps", "2", "--device", "cpu"]
CASES = [  # (id, which run, file, damage, command, fragment of the message)
    ("state-truncated", "teacher", "state.pt", _truncate, TEACHER_RESUME, "state.pt is damaged"),
    ("state-garbage", "teacher", "state.pt", _garbage, TEACHER_RESUME, "state.pt is damaged"),
    ("state-middle", "teacher", "state.pt", _middle, TEACHER_RESUME, "state.pt is damaged"),
    ("config-truncated", "teacher", "config.json", _truncate, TEACHER_RESUME, "config.json is damaged"),
    ("config-garbage", "teacher", "config.json", _garbage, TEACHER_RESUME, "config.json is damaged"),
    ("config-edited", "teacher", "config.json", _edit_number, TEACHER_RESUME, "config.json is damaged"),
    ("manifest-garbage", "teacher", "manifest.json", _garbage, TEACHER_RESUME, "manifest.json is damaged"),
    ("metrics-bad-line", "teacher", "metrics.jsonl", _bad_line, TEACHER_RESUME, "metrics.jsonl is damaged"),
    ("metrics-cut", "teacher", "metrics.jsonl", _cut_line, TEACHER_RESUME, "metrics.jsonl is damaged"),
    ("model-json-truncated", "teacher", "model.json", _truncate, EVAL, "model.json is damaged"),
    ("model-json-garbage", "teacher", "model.json", _garbage, EVAL, "model.json is damaged"),
    ("weights-middle", "teacher", "unet/diffusion_pytorch_model.safetensors", _middle, EVAL,
     "diffusion_pytorch_model.safetensors is damaged"),
    ("weights-truncated", "teacher", "unet/diffusion_pytorch_model.safetensors", _truncate, EVAL,
     "diffusion_pytorch_model.safetensors is damaged"),
    ("unet-config-garbage", "teacher", "unet/config.json", _garbage, EVAL, "unet/config.json is damaged"),
    ("student-state-truncated", "student", "state.pt", _truncate,
     ["train", "student", "--teacher", "{teacher}", "--out", "{run}", *STUDENT_FLAGS, "--resume"],
     "state.pt is damaged"),
    ("student-weights-middle", "student", "unet/diffusion_pytorch_model.safetensors", _middle,
     ["extract", "{run}", "--out", "{tmp}/x.h5", *EXTRACT_FLAGS], "diffusion_pytorch_model.safetensors is damaged"),
    ("h5-truncated", "features", "", _truncate, ["cka", "{run}", "--out", "{tmp}/c.csv", "--n-perm", "2"], "f.h5"),
    ("h5-chunk-cka", "features", "", _damage_chunk, ["cka", "{run}", "--out", "{tmp}/c.csv", "--n-perm", "2"],
     "f.h5 is damaged"),
    ("h5-chunk-linear", "features", "", _damage_chunk, ["linear", "{run}", "--out", "{tmp}/l.csv"], "f.h5 is damaged"),
    ("h5-incomplete", "features", "", _incomplete, ["cka", "{run}", "--out", "{tmp}/c.csv"], "incomplete"),
    ("h5-truncated-resume", "features", "", lambda p: (_incomplete(p), _truncate(p)),
     ["extract", "{teacher}", "--out", "{run}", *EXTRACT_FLAGS], "f.h5 is damaged"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_files_are_refused_in_one_line(case, tiny_teacher, student_run, features, tmp_path):
    _, which, rel, damage, command, fragment = case
    source = {"teacher": tiny_teacher, "student": student_run, "features": features}[which]
    if source.is_dir():
        run = tmp_path / "run"
        shutil.copytree(source, run)
        target = run / rel
    else:
        run = target = tmp_path / source.name
        shutil.copy(source, run)
    damage(target)
    before = snapshot(tmp_path)
    TALLY["corrupted"] += 1
    code, _, err = cli(*[str(a).format(run=run, teacher=tiny_teacher, tmp=tmp_path) for a in command])
    line = one_line_error(code, err)
    assert fragment in line, line
    assert snapshot(tmp_path) == before, "a file changed after a refused command"
    TALLY["detected"] += 1


def test_damaged_ratio_network_is_refused(student_run, tmp_path):
    from train.student.ratio_net import load_ratio_net

    run = tmp_path / "run"
    shutil.copytree(student_run, run)
    load_ratio_net(run / "ratio")  # intact: loads
    _middle(run / "ratio" / "model.safetensors")
    TALLY["corrupted"] += 1
    with pytest.raises(UserError, match="model.safetensors is damaged"):
        load_ratio_net(run / "ratio")
    TALLY["detected"] += 1


@pytest.mark.parametrize("damage", [_truncate, _middle], ids=["truncated", "middle"])
def test_damaged_regression_pairs_are_refused_before_anything_changes(regress_run, tmp_path, damage):
    from dataclasses import replace

    from train.regress import regress_generator

    source, cfg = regress_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    damage(run / "pairs.pt")
    before = snapshot(run)
    TALLY["corrupted"] += 1
    with pytest.raises(UserError, match="pairs.pt is damaged"):
        regress_generator(replace(cfg, out=str(run), steps=3), resume=True, progress=False)
    assert snapshot(run) == before
    TALLY["detected"] += 1


# ------------------------------------------------------------------------------- one writer
def _holder_refuses(code: int, err: str, pid: int) -> None:
    line = one_line_error(code, err)
    assert f"pid {pid}" in line and socket.gethostname() in line and "started" in line, line


def test_a_training_run_holds_its_output_and_a_killed_holder_does_not(tmp_path):
    out = tmp_path / "t"
    flags = ["--preset", "test", "--steps", "4", "--batch", "8", "--checkpoint-every", "2", "--eval-samples", "0",
             "--sample-steps", "2", "--device", "cpu"]
    holder = Proc(["-m", "probe.cli", "train", "teacher", "--out", str(out), *flags], tmp_path / "holder.trace",
                  pause="step:1@1")
    holder.wait_paused()
    TALLY["writers"] += 2
    for resume in ([], ["--resume"]):   # a second run, and a resume, of the same output
        code, _, err = cli("train", "teacher", "--out", out, *flags, *resume)
        _holder_refuses(code, err, holder.p.pid)
        TALLY["refused"] += 1
    holder.kill9()
    code, _, err = cli("train", "teacher", "--out", out, *flags, "--resume")   # the stale lock does not block
    assert code == 0, err
    assert load_state(out)["step"] == 4


def test_every_command_refuses_an_output_another_process_holds(tiny_teacher, features, tmp_path):
    from train.regress import RegressConfig, regress_generator

    targets = {"student": tmp_path / "s", "regress": tmp_path / "r", "extract": tmp_path / "f.h5",
               "report": tmp_path / "report.pdf", "ablation": tmp_path / "abl"}
    holders = {k: Proc(runner_argv("hold", {"out": str(v)}, False), tmp_path / f"{k}.trace")
               for k, v in targets.items()}
    for h, target in zip(holders.values(), targets.values()):
        h.wait_for(lambda pts, target=target: (target.parent / f".{target.name}.lock.json").exists() or False,
                   timeout=120)
    commands = {
        "student": ["train", "student", "--teacher", tiny_teacher, "--out", targets["student"], *STUDENT_FLAGS],
        "extract": ["extract", tiny_teacher, "--out", targets["extract"], *EXTRACT_FLAGS],
        "report": ["report", tiny_teacher, "--out", targets["report"], "--no-umap"],
        "ablation": ["train", "ablation", "--config", "quick", "--out", targets["ablation"]],
    }
    for name, command in commands.items():
        TALLY["writers"] += 1
        code, _, err = cli(*command)
        _holder_refuses(code, err, holders[name].p.pid)
        assert not targets[name].exists()
        TALLY["refused"] += 1
    TALLY["writers"] += 1
    with pytest.raises(UserError, match=f"pid {holders['regress'].p.pid}"):
        regress_generator(RegressConfig(out=str(targets["regress"]), teacher=str(tiny_teacher), n_pairs=16, n_val=8,
                                        sample_steps=2, steps=1, eval_samples=0, device="cpu"), progress=False)
    TALLY["refused"] += 1
    for h in holders.values():
        h.kill9()
    code, _, err = cli(*commands["extract"])   # after kill -9 of its holder the output is free
    assert code == 0, err
    assert h5py.File(targets["extract"], "r").attrs["complete"]


# ------------------------------------------------------------------------------- full disk
def test_a_checkpoint_is_streamed_to_disk_and_recorded_with_the_files_digest(tmp_path, monkeypatch):
    """No write holds the whole checkpoint (serialising it in memory first doubled a run's peak at
    large sizes), and the digest recorded in the manifest is the file's own."""
    import probe.core.runs as runs

    state = {"a": torch.randn(128, 128), "b": torch.randn(128, 128), "c": torch.randn(128, 128), "step": 3}
    sizes: list[int] = []
    real = runs._write_all

    def write_all(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("state.pt.tmp"):  # not the manifest's writes
            sizes.append(memoryview(data).nbytes)
        real(fd, data)

    monkeypatch.setattr(runs, "_write_all", write_all)
    runs.atomic_torch_save(tmp_path / "state.pt", state, manifest=tmp_path)
    total = (tmp_path / "state.pt").stat().st_size
    assert sum(sizes) == total and max(sizes) <= 128 * 128 * 4 < total / 2  # one tensor at a time at most
    assert runs.read_manifest(tmp_path)["files"]["state.pt"] == [runs.file_digest(tmp_path / "state.pt")]
    back = load_state(tmp_path, ("a", "b", "c", "step"))
    assert all(torch.equal(back[k], state[k]) for k in "abc") and back["step"] == 3


def test_an_unpicklable_checkpoint_leaves_no_temporary_file(tmp_path):
    import probe.core.runs as runs

    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the Python version
        runs.atomic_torch_save(tmp_path / "state.pt", {"f": lambda: 0})
    assert list(tmp_path.iterdir()) == []


def _fail_writes_to(monkeypatch, name: str) -> dict:
    """Make the one low-level writer fail with ENOSPC halfway through a file called ``name``."""
    import probe.core.runs as runs

    real = runs._write_all
    hits = {"n": 0}

    def write_all(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
            hits["n"] += 1
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(runs, "_write_all", write_all)
    return hits


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_rerun_is_exact(tiny_teacher, tmp_path, monkeypatch):
    run, ref = tmp_path / "run", tmp_path / "ref"
    shutil.copytree(tiny_teacher, run)
    shutil.copytree(tiny_teacher, ref)
    state_before = (run / "state.pt").read_bytes()
    flags = [a if a != "4" else "6" for a in TEACHER_FLAGS]   # 2 more steps: one more checkpoint
    hits = _fail_writes_to(monkeypatch, "state.pt.tmp")
    code, _, err = cli("train", "teacher", "--out", run, *flags, "--resume")
    line = one_line_error(code, err)
    assert hits["n"] == 1 and "state.pt" in line and "disk is full" in line, line
    assert (run / "state.pt").read_bytes() == state_before          # the previous checkpoint, intact
    assert not list(run.rglob("*.tmp"))
    assert load_state(run)["step"] == 4                             # and still checked and loadable
    monkeypatch.undo()
    code, _, err = cli("train", "teacher", "--out", run, *flags, "--resume")
    assert code == 0 and "resumed from step 4 of 6" in err, err
    code, _, err = cli("train", "teacher", "--out", ref, *flags, "--resume")   # the same, without a full disk
    assert code == 0, err
    assert_same_run(ref, run)


def test_a_full_disk_while_logging_is_one_line(tiny_teacher, tmp_path, monkeypatch):
    _fail_writes_to(monkeypatch, "metrics.jsonl")
    out = tmp_path / "t"
    code, _, err = cli("train", "teacher", "--out", out, "--preset", "test", "--steps", "2", "--batch", "8",
                       "--eval-samples", "0", "--sample-steps", "2", "--device", "cpu")
    assert "metrics.jsonl" in one_line_error(code, err)


def test_unwritable_outputs_are_one_line(tiny_teacher, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for command in (["train", "teacher", "--out", blocker / "t", "--preset", "test", "--steps", "1", "--batch", "8"],
                    ["train", "student", "--teacher", tiny_teacher, "--out", blocker / "s", *STUDENT_FLAGS],
                    ["extract", tiny_teacher, "--out", blocker / "f.h5", *EXTRACT_FLAGS]):
        code, _, err = cli(*command)
        assert str(blocker) in one_line_error(code, err)
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            code, _, err = cli("train", "teacher", "--out", ro / "t", "--preset", "test", "--steps", "1")
            assert str(ro) in one_line_error(code, err)
        finally:
            ro.chmod(0o700)


# ------------------------------------------------------------------------------- diverging runs
def _diverged(run, max_in_a_row: int = 10) -> None:
    rows = read_metrics(run)
    assert rows[-1]["diverged"] and rows[-1]["nonfinite_in_a_row"] == max_in_a_row
    assert rows[-1]["skipped_steps"] >= max_in_a_row
    state = load_state(run)
    for part in ("net", "ema", "generator", "aux"):
        if part in state:
            tensors = state[part]["net"] if part == "ema" else state[part]
            assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), part
    TALLY["nan_stopped"] += 1


def test_a_diverging_teacher_stops_with_exit_3(tmp_path):
    TALLY["nan"] += 1
    out = tmp_path / "t"
    code, _, err = cli("train", "teacher", "--out", out, "--preset", "test", "--batch", "8", "--steps", "40",
                       "--checkpoint-every", "5", "--eval-samples", "0", "--sample-steps", "2", "--device", "cpu",
                       "--lr", "1e6")
    assert "run diverged" in one_line_error(code, err, expected_code=3)
    _diverged(out)


def test_a_diverging_student_stops_with_exit_3(tiny_teacher, tmp_path):
    TALLY["nan"] += 1
    out = tmp_path / "s"
    code, _, err = cli("train", "student", "--teacher", tiny_teacher, "--out", out, "--steps", "40", "--batch", "8",
                       "--checkpoint-every", "5", "--eval-every", "0", "--device", "cpu", "--lr-g", "1e6")
    assert "run diverged" in one_line_error(code, err, expected_code=3)
    _diverged(out)


def test_a_diverging_regression_stops_with_exit_3(tiny_teacher, tmp_path):
    from train.regress import RegressConfig, regress_generator

    TALLY["nan"] += 1
    out = tmp_path / "r"
    cfg = RegressConfig(out=str(out), teacher=str(tiny_teacher), n_pairs=16, n_val=8, sample_steps=2, steps=40,
                        batch=8, lr=1e6, lr_warmup=1, checkpoint_every=1, eval_samples=0, device="cpu", max_nonfinite=4)
    with pytest.raises(RunDiverged) as info:
        regress_generator(cfg, progress=False)
    assert info.value.exit_code == 3 and "4 steps in a row" in str(info.value)
    _diverged(out, 4)
