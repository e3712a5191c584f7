"""kill -9 anywhere, then resume: the result equals an uninterrupted run, file by file.

Each command runs as a real subprocess that is killed with SIGKILL several times in a row, each
time at another point: between checkpoints, inside a checkpoint write (temporary file written;
manifest updated but file not yet renamed; renamed but manifest not yet committed), while the
final outputs are written, and at a seeded random moment. Every kill is followed by a resume
(``--resume``; extraction: the same command), which must print what it kept ("resumed from step N
of M"), lose at most one checkpoint interval, and in the end leave a run directory equal to one
run without interruption (``tests/_reliability.py: assert_same_run``). The numbers go into
RESULTS, printed at the end of the module (pytest -s) as the battery's table.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests._reliability import Proc, assert_same_run, cli_argv, resumed_step, runner_argv

pytestmark = pytest.mark.slow

RESULTS: dict = {}
SEED = 18  # seed of the random kill moments


def _chain(tmp, name: str, argv_for, kills: list) -> dict:
    """Run ``argv_for(resume)`` killed at each of ``kills`` (a pause point "<point>@<n>", or "random"),
    resuming each time, then once more to the end. Returns the chain's figures."""
    rnd = random.Random(f"{SEED}-{name}")
    reached, resumed, killed = [], [], 0
    for i, kill in enumerate(kills):
        proc = Proc(argv_for(i > 0), tmp / f"{name}-{i}.trace", None if kill == "random" else kill)
        if kill == "random":  # a seeded moment after this process's first step (or row block)
            proc.wait_for(lambda pts: any(p.startswith(("step:", "rows:")) for p in pts))
            time.sleep(rnd.uniform(0.0, 0.5))
        else:
            proc.wait_paused()
        start = resumed_step(proc.stderr()) if i > 0 else 0
        alive = proc.p.poll() is None
        proc.kill9()
        killed += int(alive)
        if i > 0:
            resumed.append(start)
        reached.append(proc.last_step(start or 0))
    final = Proc(argv_for(True), tmp / f"{name}-final.trace")
    assert final.finish() == 0, final.stderr()[-3000:]
    resumed.append(resumed_step(final.stderr()))
    assert None not in resumed, f"a resume did not say where it resumed: {resumed}"
    lost = [r - s for r, s in zip(reached, resumed)]
    assert min(lost) >= 0, (reached, resumed)
    return {"kills": killed, "reached": reached, "resumed_from": resumed, "lost_max": max(lost)}


def _reference(tmp, argv: list) -> None:
    """The uninterrupted run, in a fresh process like the killed ones (an in-process run can differ in
    float rounding after other tests changed global torch state)."""
    ref = Proc(argv, tmp / "reference.trace")
    assert ref.finish() == 0, ref.stderr()[-3000:]


def _record(name: str, chain: dict, identical: bool, files: int) -> None:
    RESULTS[name] = {**chain, "identical": identical, "files": files}


@pytest.fixture(scope="module", autouse=True)
def _table():
    t0 = time.time()
    yield
    print(f"\nkill -9 battery ({time.time() - t0:.0f} s):")
    print("| command | kills | resumed bit-identical | steps (rows) lost at most | files (datasets) compared |")
    for name, r in RESULTS.items():
        print(f"| {name} | {r['kills']} | {r['kills'] if r['identical'] else 0} | {r['lost_max']} | {r['files']} |")
    if os.environ.get("RELIABILITY_RESULTS"):  # for the closing note's table
        Path(os.environ["RELIABILITY_RESULTS"]).write_text(json.dumps({"seconds": time.time() - t0, **RESULTS}))


# ------------------------------------------------------------------------------- teacher
TEACHER = dict(preset="test", batch=8, steps=12, checkpoint_every=2, eval_samples=0, sample_steps=2, device="cpu")


def test_teacher_survives_kill_9_anywhere(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in TEACHER.items()]

    def argv(resume, where=out):
        return cli_argv("train", "teacher", "--out", where, *opts, *(["--resume"] if resume else []))

    _reference(tmp_path, argv(False, ref))
    chain = _chain(tmp_path, "teacher", argv, [
        "step:3@1",                                                 # between checkpoints
        "write:state.pt:tmp@1",                                     # checkpoint: temporary file written
        "write:state.pt:renamed@1",                                 # renamed, manifest not committed
        "write:unet/diffusion_pytorch_model.safetensors:pending@1",  # manifest pending, weights not renamed
        "random",
        "write:samples.png:renamed@1",                              # final outputs, not marked finished
    ])
    assert chain["lost_max"] <= TEACHER["checkpoint_every"]
    files = assert_same_run(ref, out)
    _record("train teacher", chain, True, files)


# ------------------------------------------------------------------------------- student
STUDENT = dict(steps=8, batch=8, checkpoint_every=2, eval_every=0, lr_g=1e-3, lr_aux=1e-3, device="cpu")


def test_student_survives_kill_9_anywhere(tiny_teacher, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in STUDENT.items()]

    def argv(resume, where=out):
        return cli_argv("train", "student", "--teacher", tiny_teacher, "--out", where, *opts,
                        *(["--resume"] if resume else []))

    _reference(tmp_path, argv(False, ref))
    chain = _chain(tmp_path, "student", argv, [
        "step:3@1",
        "write:state.pt:tmp@1",
        "write:model.safetensors:pending@1",     # the ratio classifier (ratio/, its own manifest)
        "random",
        "write:samples.png:tmp@1",
    ])
    assert chain["lost_max"] <= STUDENT["checkpoint_every"]
    files = assert_same_run(ref, out)
    _record("train student", chain, True, files)


# ------------------------------------------------------------------------------- regression
def test_regression_survives_kill_9_anywhere(tiny_teacher, tmp_path):
    cfg = dict(teacher=str(tiny_teacher), n_pairs=32, n_val=16, sample_steps=2, steps=8, batch=8, log_every=2,
               checkpoint_every=2, eval_samples=0, device="cpu")
    ref, out = tmp_path / "ref", tmp_path / "killed"

    def argv(resume, where=out):
        return runner_argv("regress", {"out": str(where), **cfg}, resume)

    _reference(tmp_path, argv(False, ref))
    chain = _chain(tmp_path, "regress", argv, [
        "write:pairs.pt:renamed@1",     # the cached teacher samples, before the first step
        "step:3@1",
        "write:state.pt:pending@1",
        "random",
    ])
    assert chain["lost_max"] <= cfg["checkpoint_every"]
    files = assert_same_run(ref, out)
    _record("train regress (library)", chain, True, files)


# ------------------------------------------------------------------------------- extraction
def test_extraction_survives_kill_9_between_row_blocks(tiny_teacher, tmp_path):
    """Kills right after a block of rows is flushed (the counter says what is on disk). A kill in the
    middle of an HDF5 flush can leave a file HDF5 cannot open: it is then refused as damaged
    (tests/test_reliability_files.py), never analysed."""
    ref, out = tmp_path / "ref.h5", tmp_path / "killed.h5"

    def argv(resume, where=out):   # resuming an extraction is running the same command again
        return cli_argv("extract", tiny_teacher, "--out", where, "--n-samples", 48, "--batch", 8, "--sigmas", "0,1",
                        "--layers", "down_blocks.0,mid_block", "--device", "cpu")

    _reference(tmp_path, argv(False, ref))
    chain = _chain(tmp_path, "extract", argv, ["rows:16@1", "rows:32@1", "rows:40@1"])
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        assert bool(b.attrs["complete"]) and int(b.attrs["rows_done"]) == 48
        assert {k: v for k, v in a.attrs.items() if k != "created_utc"}.keys() == \
               {k: v for k, v in b.attrs.items() if k != "created_utc"}.keys()
        for k in a.attrs:
            if k == "args_json":   # the arguments, but for the output path
                ja, jb = json.loads(a.attrs[k]), json.loads(b.attrs[k])
                assert ja["identity"] == jb["identity"]
                assert {**ja["config"], "out": None} == {**jb["config"], "out": None}
            elif k != "created_utc":
                assert np.array_equal(np.asarray(a.attrs[k]), np.asarray(b.attrs[k])), k
        names = []
        a.visit(names.append)
        for name in names:
            if isinstance(a[name], h5py.Dataset):
                assert np.array_equal(a[name][()], b[name][()]), name
    _record("extract (rows)", chain, True, len(names))
