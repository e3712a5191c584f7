"""Multi-process training and extraction (probe/core/distributed.py) on 2 CPU processes with gloo.

Two worker processes are started once per module with the environment torchrun would give them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); they train a teacher
with DDP and extract features, and every test compares their output with a single-process run
in this process. Loopback only, one thread per process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from probe.core.distributed import Micro, micro_generator, no_sync, split_batch, wrap_ddp
from probe.core.errors import UserError
from probe.core.runs import load_state, read_metrics
from probe.features.extract import ExtractConfig, extract
from train.teacher import TeacherConfig, train_teacher

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

# What each rank runs: the teacher (saving this rank's final parameters, which only rank 0 would
# otherwise write), then an extraction from that teacher.
WORKER = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from pathlib import Path
out, teacher_kw, extract_kw = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
optimisers = []
class Recording(torch.optim.Adam):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        optimisers.append(self)
        self.first_grads = None
    def step(self, *a, **k):
        if self.first_grads is None:
            self.first_grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(*a, **k)
torch.optim.Adam = Recording
from train.teacher import TeacherConfig, train_teacher
from probe.features.extract import ExtractConfig, extract
rank = int(os.environ["RANK"])
run = train_teacher(TeacherConfig(out=str(out / "ddp"), **teacher_kw), progress=False)
from probe.core.models import load_model
(out / f"loaded-rank{rank}.txt").write_text(load_model(run).sha256())  # what this rank sees right after return
params = [p.detach().clone() for g in optimisers[0].param_groups for p in g["params"]]
torch.save({"params": params, "grads": optimisers[0].first_grads}, out / f"params-rank{rank}.pt")
extract(ExtractConfig(model=str(run), out=str(out / "ddp.h5"), **extract_kw), progress=False)
from tests.test_distributed import student_run, STUDENT
torch.save(student_run(run, accum=1), out / f"student-rank{rank}.pt")
from train.student.loop import StudentConfig, train_student
train_student(StudentConfig(out=str(out / "student-ddp"), teacher=str(run), **STUDENT), progress=False)
"""

TEACHER = dict(preset="test", steps=3, batch=8, accum=2, lr_warmup=1, checkpoint_every=2, eval_samples=0,
               sample_steps=2, device="cpu")
EXTRACT = dict(data="digits", sigmas=(0.0, 0.5), n_samples=20, batch=4, layers=("down_blocks.0", "mid_block"),
               device="cpu")   # 20 rows in rounds of 2 x 4: the last round leaves rank 1 without rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recording(torch.optim.Adam):
    """Adam that keeps the gradients of its first step (what DDP averaged), for comparisons."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_grads = None
        Recording.last = self

    def step(self, *args, **kwargs):
        if self.first_grads is None:
            self.first_grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(*args, **kwargs)


def _teacher(out: Path, monkeypatch, **kw) -> tuple[dict, list]:
    """Single-process teacher: (final state, gradients of the first step)."""
    monkeypatch.setattr(torch.optim, "Adam", Recording)
    run = train_teacher(TeacherConfig(out=str(out), **{**TEACHER, **kw}), progress=False)
    return load_state(run), Recording.last.first_grads


def _close_after_adam(got: dict, want: dict, lr: float = TeacherConfig.lr, steps: int = 3) -> None:
    """Adam divides by the gradient's own size, so gradients that are zero up to round-off (e.g.
    attention key biases, softmax-invariant) take +-lr steps on noise: no element may differ by more
    than the steps taken, and on average they must agree to 1% of one step."""
    diff = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    assert float(diff.max()) <= 1.5 * lr * steps
    assert float(diff.mean()) <= 0.01 * lr


def _grads_close(got: list, want: list) -> None:
    """Gradients are linear in the per-sample losses: equal up to round-off, measured against the
    largest gradient (some, e.g. biases in front of a GroupNorm, are zero up to round-off)."""
    scale = max(float(g.abs().max()) for g in want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)


# the full student loop (checkpoints, EMA, metrics) under 2 processes and in one process
STUDENT = dict(method="diffratio-js", steps=4, batch=8, aux_steps=2, lr_g=1e-3, lr_aux=1e-3, checkpoint_every=2,
               log_every=1, eval_every=0, device="cpu")  # no evaluation rows: the training rows are compared


def student_run(teacher_dir, accum: int, steps: int = 2) -> dict:
    """A few steps of the one student step (``train.student.step``), diffratio-js with 2 aux steps,
    in this process's world."""
    from probe.core.data import load_dataset
    from probe.core.distributed import autocast_for, split_batch, world_size
    from probe.core.edm import OneStepGenerator
    from probe.core.models import load_model
    from train.init import initialise_generator
    from train.student.loop import StudentConfig
    from train.student.methods import get_method
    from train.student.step import StepParts, student_step

    cpu = torch.device("cpu")
    cfg = StudentConfig(out="unused", teacher=str(teacher_dir), method="diffratio-js", batch=8, aux_steps=2,
                        lr_g=1e-3, lr_aux=1e-3, device="cpu")
    teacher = load_model(teacher_dir)
    torch.manual_seed(cfg.seed)
    gen_net, _ = initialise_generator(cfg.init, teacher, cfg.seed)
    generator = OneStepGenerator(gen_net, cfg.sigma_init)
    method = get_method(cfg.method)(cfg, teacher.denoiser, generator)
    gen_params, aux_params = list(gen_net.parameters()), list(method.aux.parameters())
    opt_g = torch.optim.Adam(gen_params, lr=cfg.lr_g, betas=cfg.betas)
    opt_a = torch.optim.Adam(aux_params, lr=cfg.lr_aux, betas=cfg.betas)
    rng, counts = torch.Generator().manual_seed(cfg.seed), {"skipped_g": 0, "skipped_aux": 0}
    micros = split_batch(cfg.batch, world_size(), accum=accum)
    images = load_dataset("digits", "train").images
    parts = StepParts(cfg, method, generator, wrap_ddp(generator, cpu), wrap_ddp(method.aux, cpu), images,
                      (cfg.batch, 1, 8, 8), cpu, autocast_for(cpu), opt_g, opt_a, micros)
    stats = [student_step(parts, rng, counts)[0] for _ in range(steps)]
    return {"gen": {k: v.detach().clone() for k, v in gen_net.state_dict().items()},
            "aux": {k: v.detach().clone() for k, v in method.aux.state_dict().items()},
            "stats": stats, "counts": counts, "rng": rng.get_state(), "lr": cfg.lr_g, "steps": steps}


def _launch(out: Path, world: int, teacher_kw: dict, extract_kw: dict, timeout: float = 120) -> None:
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(out / f"rank{r}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out), json.dumps(teacher_kw),
                                           json.dumps(extract_kw)], env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{(out / f'rank{r}.log').read_text()[-3000:]}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _launch(out, WORLD, TEACHER, EXTRACT)
    return out


# ------------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("batch,world,accum", [(8, 2, 2), (7, 2, 1), (10, 3, 2), (5, 1, 5), (64, 1, 1)])
def test_split_batch_covers_the_batch_and_weights_give_the_global_mean(batch, world, accum):
    x = torch.randn(batch, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    rows, per_rank = [], []
    for r in range(world):
        micros = split_batch(batch, world, r, accum)
        assert [m.index for m in micros] == [r * accum + a for a in range(accum)]
        rows += [i for m in micros for i in range(m.rows.start, m.rows.stop)]
        # what DDP does: each rank sums its weighted micro-batch means, then ranks are averaged
        per_rank.append(sum(m.scale * x[m.rows].mean() for m in micros))
    assert rows == list(range(batch))                       # contiguous, disjoint, complete, in rank order
    assert torch.isclose(sum(per_rank) / world, x.mean(), rtol=1e-12)
    single = split_batch(batch, 1, 0, 1)[0]
    assert single.scale == 1.0 and single.weight(x) is x    # alone: the loss is not even multiplied


def test_split_batch_refuses_empty_micro_batches():
    with pytest.raises(UserError, match="at least one row"):
        split_batch(3, 2, 0, 2)


def test_micro_generators_depend_on_the_global_index_only():
    a = torch.randn(4, generator=micro_generator(7, Micro(3, slice(0, 1), 1.0)))
    assert torch.equal(a, torch.randn(4, generator=micro_generator(7, 3)))
    assert not torch.equal(a, torch.randn(4, generator=micro_generator(7, 2)))


def test_helpers_are_no_ops_in_a_single_process():
    net = torch.nn.Linear(2, 2)
    assert wrap_ddp(net, torch.device("cpu")) is net
    with no_sync(net):
        net(torch.ones(1, 2)).sum().backward()
    assert net.weight.grad is not None


# --------------------------------------------------------------------------------- teacher
def test_teacher_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """Single process, 4 micro-batches of 2 vs one batch of 8: same rows, same random numbers."""
    one, grads_one = _teacher(tmp_path / "a", monkeypatch, accum=1)
    four, grads_four = _teacher(tmp_path / "b", monkeypatch, accum=4)
    assert torch.equal(one["rng"], four["rng"])             # the random stream does not depend on accum
    _grads_close(grads_four, grads_one)
    _close_after_adam(four["net"], one["net"])


def test_ddp_teacher_replicas_agree_and_match_a_single_process(ddp_run, tmp_path, monkeypatch):
    ranks = [torch.load(ddp_run / f"params-rank{r}.pt") for r in range(WORLD)]
    for key in ("params", "grads"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)                         # bit-identical replicas after the all-reduces
    single_state, single_grads = _teacher(tmp_path / "single", monkeypatch, accum=1)
    _grads_close(ranks[0]["grads"], single_grads)            # DDP's average = the global batch's gradient
    single = tmp_path / "single"
    ddp_state = load_state(ddp_run / "ddp")
    assert ddp_state["step"] == single_state["step"] == TEACHER["steps"]
    assert torch.equal(ddp_state["rng"], single_state["rng"])
    _close_after_adam(ddp_state["net"], single_state["net"])
    for k, p_rank0 in zip(single_state["net"], ranks[0]["params"], strict=True):
        assert torch.equal(ddp_state["net"][k], p_rank0)     # rank 0's checkpoint holds its weights
    # the logged loss is the global-batch mean, not one rank's
    loss_ddp, loss_single = read_metrics(ddp_run / "ddp")[-1]["loss"], read_metrics(single)[-1]["loss"]
    assert loss_ddp == pytest.approx(loss_single, rel=1e-4)


def test_every_rank_returns_after_the_final_model_is_written(ddp_run):
    """A rank that loads the run right after train_teacher returns sees the final weights, not an earlier
    checkpoint (without the closing barrier rank 1 read step 2's weights while rank 0 was still writing)."""
    from probe.core.models import load_model

    final = load_model(ddp_run / "ddp").sha256()
    assert [(ddp_run / f"loaded-rank{r}.txt").read_text() for r in range(WORLD)] == [final] * WORLD


# ------------------------------------------------------------------------------- extraction
def test_ddp_extraction_equals_a_single_process_file(ddp_run, tmp_path):
    single = extract(ExtractConfig(model=str(ddp_run / "ddp"), out=str(tmp_path / "single.h5"), **EXTRACT),
                     progress=False)
    with h5py.File(ddp_run / "ddp.h5", "r") as a, h5py.File(single, "r") as b:
        assert bool(a.attrs["complete"]) and int(a.attrs["rows_done"]) == EXTRACT["n_samples"]
        for name in ("sigmas", "labels", "sample_ids"):
            assert np.array_equal(a[name][()], b[name][()])
        assert list(a["features"]) == list(b["features"]) and len(a["features"]) == 2
        for layer in a["features"]:
            fa, fb = a["features"][layer][()], b["features"][layer][()]
            assert fa.dtype == np.float32 and fa.shape[1] == EXTRACT["n_samples"]
            diff = float(np.abs(fa - fb).max())
            assert np.array_equal(fa, fb), (f"{layer}: max |ddp - single| = {diff:.3g}, "
                                            f"torch threads here {torch.get_num_threads()}")  # same batches, same noise
            assert np.abs(fa).sum(axis=(0, 2)).min() > 0     # every row written (rank 1's rows too)


# ------------------------------------------------------------------- CUDA (skipped on a CPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_teacher_trains_with_bf16_autocast(tmp_path):
    run = train_teacher(TeacherConfig(out=str(tmp_path / "t"), **{**TEACHER, "accum": 2, "device": "cuda"}),
                        progress=False)
    state = load_state(run)
    assert state["step"] == TEACHER["steps"]
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert np.isfinite(read_metrics(run)[-1]["loss"])
    assert torch.backends.cuda.matmul.allow_tf32                  # set by train.distributed.cuda_speedups


@cuda
def test_cuda_extraction_matches_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)   # compare float32 with float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    run = train_teacher(TeacherConfig(out=str(tmp_path / "t"), **{**TEACHER, "steps": 1}), progress=False)
    files = {dev: extract(ExtractConfig(model=str(run), out=str(tmp_path / f"{dev}.h5"), **{**EXTRACT, "device": dev}),
                          progress=False) for dev in ("cpu", "cuda")}
    with h5py.File(files["cpu"], "r") as a, h5py.File(files["cuda"], "r") as b:
        for layer in a["features"]:
            fa, fb = a["features"][layer][()], b["features"][layer][()]
            np.testing.assert_allclose(fb, fa, rtol=1e-3, atol=1e-4 * float(np.abs(fa).max()))


# --------------------------------------------------------------------------------- student
def test_ddp_student_step_matches_accumulation_in_one_process(ddp_run):
    """2 ranks x 1 micro-batch == 1 process x 2 micro-batches: same rows, same micro-batch seeds."""
    ranks = [torch.load(ddp_run / f"student-rank{r}.pt") for r in range(WORLD)]
    for key in ("gen", "aux"):
        for k in ranks[0][key]:
            assert torch.equal(ranks[0][key][k], ranks[1][key][k]), k   # replicas agree bit for bit
    single = student_run(ddp_run / "ddp", accum=2)
    assert torch.equal(single["rng"], ranks[0]["rng"]) and single["counts"] == ranks[0]["counts"]
    for key in ("gen", "aux"):
        _close_after_adam(ranks[0][key], single[key], lr=single["lr"], steps=single["steps"])
    for a, b in zip(ranks[0]["stats"], single["stats"], strict=True):   # logged means are global
        assert a.keys() == b.keys() and {"loss_g", "loss_aux", "acc_real"} <= set(a)
        for k in ("loss_g", "loss_aux", "acc_real", "acc_fake"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_ddp_student_run_equals_a_single_process_run(ddp_run, tmp_path):
    """The whole student loop: 2 gloo processes x 1 micro-batch of 4 vs one process with the same global
    batch of 8 as 2 micro-batches (the same micro-batch seeds): same weights, EMA, counters, logged means."""
    from train.student.loop import StudentConfig, train_student

    single = train_student(StudentConfig(out=str(tmp_path / "single"), teacher=str(ddp_run / "ddp"), accum=2,
                                         **STUDENT), progress=False)
    a, b = load_state(ddp_run / "student-ddp"), load_state(single)
    assert a["step"] == b["step"] == STUDENT["steps"] and a["counts"] == b["counts"]
    assert torch.equal(a["rng"], b["rng"])
    diffs = {}
    for part in ("generator", "aux"):
        _close_after_adam(a[part], b[part], lr=STUDENT["lr_g"], steps=STUDENT["steps"])
        diffs[part] = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
    _close_after_adam(a["ema"]["net"], b["ema"]["net"], lr=STUDENT["lr_g"], steps=STUDENT["steps"])
    print(f"max |weight difference| 2 processes vs 1 process: {diffs}")
    for x, y in zip(read_metrics(ddp_run / "student-ddp"), read_metrics(single), strict=True):
        assert x["step"] == y["step"]
        for k in ("loss_g", "loss_aux", "acc_real", "acc_fake"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
