"""Grids fanned out into jobs: the expansion, N local processes, submitit (local executor and the
SLURM submissions it would make), the status view, reruns and the launch lock."""

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from _grid import TINY_STUDENT

from probe.core.errors import UserError
from probe.pipeline import run_ablation
from train.ablation.grid import AblationConfig
from train.ablation.jobs import format_status, grid_status, plan_grid, state_file, write_plan
from train.ablation.launch import LaunchConfig, job_slots, launch, visible_gpus

ROOT = Path(__file__).resolve().parents[1]

# 2 inits x 2 seeds from the session's tiny teacher; "reg" starts from a regressed generator built
# as a prerequisite, so arms depend on a job of the grid
GRID = """
teacher = "{teacher}"
methods = ["diffratio-js"]
seeds = [0, 1]
reference_steps = 2
""" + TINY_STUDENT + """
[inits]
full = {{ spec = "teacher", group = "teacher" }}
reg = {{ spec = "from:@reg", group = "no-features" }}

[prereq.reg]
kind = "regress"
teacher = "{teacher}"
n_pairs = 16
n_val = 8
sample_steps = 2
steps = 2
batch = 8
checkpoint_every = 2
log_every = 1
eval_samples = 0
"""
ARMS = ["full__diffratio-js__s0", "full__diffratio-js__s1", "reg__diffratio-js__s0", "reg__diffratio-js__s1"]
TIMING = ["seconds", "run_dir"]   # differ between any two runs of a grid


@pytest.fixture(scope="module")
def grid_file(tiny_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "grid.toml"
    path.write_text(GRID.format(teacher=tiny_teacher))
    return str(path)


@pytest.fixture(scope="module")
def serial(grid_file, tmp_path_factory):
    """The grid run one job at a time in this process (the default launcher)."""
    out = tmp_path_factory.mktemp("serial") / "grid"
    run_ablation(AblationConfig(config=grid_file, out=str(out)), progress=False)
    return out


def rows(out) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "summary.csv").drop(columns=TIMING)


def statuses(out) -> dict:
    return {r["name"]: r["state"] for r in grid_status(out)}


# ---------------------------------------------------------------------------------- fast
def test_slots_share_the_cores_and_spread_jobs_over_the_gpus(monkeypatch):
    two = job_slots(2, 2, [])
    assert two == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2
    assert [s["OMP_NUM_THREADS"] for s in job_slots(3, 16, [])] == ["5"] * 3      # 3 x 5 threads fit 16 cores
    assert [s["OMP_NUM_THREADS"] for s in job_slots(8, 2, [])] == ["1"] * 8       # never below one thread
    assert len(job_slots(0, 4, [])) == 4                                          # 0: one job per core
    gpus = job_slots(4, 16, ["0", "1"])
    assert [s["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "1", "0", "1"] and gpus[0]["OMP_NUM_THREADS"] == "4"
    auto = job_slots(0, 16, ["2", "5", "7"])                                      # 0: one job per GPU
    assert [s["CUDA_VISIBLE_DEVICES"] for s in auto] == ["2", "5", "7"] and auto[0]["OMP_NUM_THREADS"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert visible_gpus() == ["1", "3"] and visible_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_a_grid_expands_into_jobs_with_their_dependencies(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_PROBE_CACHE", str(tmp_path / "cache"))   # no classifier cached: nothing is done
    plan = plan_grid(AblationConfig(config="quick", out=str(tmp_path / "g")))
    jobs = plan.by_name()
    assert list(jobs) == ["classifier", "prereq.teacher", "prereq.band_teacher", "prereq.regressed", "reference",
                          "full__diffratio-js__s0", "band__diffratio-js__s0", "regressed__diffratio-js__s0",
                          "aggregate"]
    assert not (tmp_path / "g").exists()                     # planning writes nothing
    assert jobs["prereq.regressed"].depends_on == ["prereq.teacher"]
    assert jobs["reference"].depends_on == ["classifier", "prereq.teacher"]
    assert jobs["full__diffratio-js__s0"].depends_on == ["classifier", "prereq.teacher"]
    assert jobs["band__diffratio-js__s0"].depends_on == ["classifier", "prereq.band_teacher", "prereq.teacher"]
    assert jobs["regressed__diffratio-js__s0"].depends_on == ["classifier", "prereq.regressed", "prereq.teacher"]
    assert jobs["aggregate"].depends_on == list(jobs)[:-1]
    arm = jobs["band__diffratio-js__s0"].config               # the StudentConfig a `probe train student` would get
    assert arm["out"] == str(tmp_path / "g" / "runs" / "band__diffratio-js__s0")
    assert arm["init"] == f"from:{tmp_path / 'g' / 'prereq' / 'band_teacher'}" and arm["steps"] == 2
    assert jobs["classifier"].config == {"dataset": "digits"}

    # the status view before anything ran: every job pending, the aggregate waiting for all
    write_plan(plan)
    text = format_status(plan.out)
    assert text.splitlines()[0] == f"{plan.out}: 0/9 jobs done (0/3 arms), 0 running, 0 failed, 9 pending"
    assert "waits for 8 jobs" in text.splitlines()[-1] and text.splitlines()[-1].split()[:2] == ["pending", "aggregate"]


def test_status_tells_running_from_dead_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_PROBE_CACHE", str(tmp_path / "cache"))   # no classifier cached: nothing is done
    plan = plan_grid(AblationConfig(config="quick", out=str(tmp_path / "g")))
    write_plan(plan)
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (plan.out / "jobs" / "prereq.teacher.state.json").write_text(json.dumps(
        {"state": "running", "host": host, "pid": os.getpid(), "started_s": 0}))
    (plan.out / "jobs" / "prereq.band_teacher.state.json").write_text(json.dumps(
        {"state": "running", "host": host, "pid": dead_pid, "started_s": 0}))
    (plan.out / "jobs" / "prereq.regressed.state.json").write_text(json.dumps(
        {"state": "running", "host": "another-node", "pid": 1, "started_s": 0, "cluster_job": "77_3"}))
    state = {r["name"]: r for r in grid_status(plan.out)}
    assert state["prereq.teacher"]["state"] == "running"
    assert f"pid {os.getpid()} on {host}" in state["prereq.teacher"]["note"]
    assert state["prereq.band_teacher"]["state"] == "failed"    # its process is gone and recorded no end
    assert state["prereq.band_teacher"]["note"] == "the process ended without recording a result"
    assert state["prereq.regressed"]["state"] == "running" and "cluster job 77_3" in state["prereq.regressed"]["note"]

    from typer.testing import CliRunner

    from probe.cli import app

    result = CliRunner().invoke(app, ["train", "ablation", "--status", str(plan.out)])
    assert result.exit_code == 0
    assert result.output.startswith(f"{plan.out}: 0/9 jobs done (0/3 arms), 2 running, 1 failed")


@contextmanager
def lock_held_elsewhere(out: Path):
    code = ("import sys, time; from probe.core.locks import exclusive\n"
            "with exclusive(sys.argv[1], 'ablation grid'):\n    print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait()


def test_a_second_launch_of_the_same_grid_is_refused(tmp_path):
    out = tmp_path / "g"
    with lock_held_elsewhere(out) as pid:
        with pytest.raises(UserError, match=rf"{out} is being written by pid {pid} on host {socket.gethostname()}"):
            run_ablation(AblationConfig(config="quick", out=str(out)), progress=False)
        assert not (out / "jobs").exists()                   # refused before writing anything
    from probe.core.locks import exclusive

    with exclusive(out, "ablation grid"):                    # released with its holder
        pass


class FakeExecutor:
    """Stands in for submitit.AutoExecutor on a SLURM cluster: records every submission."""

    submissions = []

    def __init__(self, folder, cluster):
        assert cluster == "slurm"
        self.params, self.array = {}, None

    def update_parameters(self, **kw):
        self.params = kw

    @contextmanager
    def batch(self):
        self.array = []
        yield
        base = self._id()
        for i, (job, record) in enumerate(self.array):
            job.job_id = f"{base}_{i}"
            record["id"] = job.job_id
        self.array = None

    def _id(self):
        FakeExecutor.counter += 1
        return str(FakeExecutor.counter)

    def submit(self, runner):
        job = type("FakeJob", (), {"job_id": None})()
        record = {"job": Path(runner.job_file).name[:-len(".job.json")], "params": dict(self.params),
                  "array": self.array is not None, "finalize": runner.finalize is not None}
        FakeExecutor.submissions.append(record)
        if self.array is not None:
            self.array.append((job, record))
        else:
            job.job_id = record["id"] = self._id()
        return job


def test_slurm_submissions_prereqs_then_an_array_then_the_aggregate(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    monkeypatch.setenv("ONESTEP_PROBE_CACHE", str(tmp_path / "cache"))   # no classifier cached: every job is due
    FakeExecutor.submissions, FakeExecutor.counter = [], 100
    plan = plan_grid(AblationConfig(config="quick", out=str(tmp_path / "g")))
    write_plan(plan)
    opts = LaunchConfig(launcher="slurm", partition="gpu", time_min=90, gpus=1, cpus=8, mem_gb=32, array_limit=2)
    report = launch(plan, opts, progress=False, finalize=print, log=lambda m: None)
    subs = {s["job"]: s for s in FakeExecutor.submissions}
    assert [s["job"] for s in FakeExecutor.submissions] == list(plan.by_name())
    assert report.queued == list(plan.by_name()) and not report.complete
    ids = {name: s["id"] for name, s in subs.items()}
    dep = lambda name: subs[name]["params"]["slurm_additional_parameters"].get("dependency")
    assert dep("classifier") is None and dep("prereq.teacher") is None
    assert dep("prereq.regressed") == f"afterok:{ids['prereq.teacher']}"
    assert dep("reference") == f"afterok:{ids['classifier']}:{ids['prereq.teacher']}"
    arms = [n for n in subs if "__" in n]
    assert all(subs[n]["array"] for n in arms) and len({ids[n].split("_")[0] for n in arms}) == 1
    array = ids[arms[0]].split("_")[0]
    assert dep(arms[0]) == "afterok:" + ":".join(sorted(ids[n] for n in ["classifier", "prereq.band_teacher",
                                                                       "prereq.regressed", "prereq.teacher"]))
    assert subs[arms[0]]["params"]["slurm_array_parallelism"] == 2
    assert dep("aggregate").startswith("afterok:") and array in dep("aggregate").split(":")
    assert subs["aggregate"]["finalize"] and not subs["classifier"]["finalize"]
    p = subs["reference"]["params"]
    got = (p["slurm_partition"], p["timeout_min"], p["gpus_per_node"], p["cpus_per_task"], p["mem_gb"])
    assert got == ("gpu", 90, 1, 8, 32)
    assert json.loads((plan.out / "jobs" / "prereq.teacher.queued.json").read_text())["job_id"] == ids["prereq.teacher"]
    assert statuses(plan.out)["prereq.teacher"] == "pending"
    assert "queued as slurm job" in format_status(plan.out)

    # a rerun while the teacher is still queued and the others died: everything but the teacher again,
    # after the teacher's queued job
    import train.ablation.launch as launch_module

    monkeypatch.setattr(launch_module, "still_queued",
                        lambda out, name: ids[name] if name == "prereq.teacher" else None)
    FakeExecutor.submissions = []
    launch(plan, opts, progress=False, finalize=print, log=lambda m: None)
    again = {s["job"]: s for s in FakeExecutor.submissions}
    assert "prereq.teacher" not in again and len(again) == len(subs) - 1
    dependency = again["prereq.regressed"]["params"]["slurm_additional_parameters"]["dependency"]
    assert dependency == f"afterok:{ids['prereq.teacher']}"


# ---------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_two_jobs_at_once_give_the_same_rows_and_rerun_only_what_failed(serial, grid_file, tmp_path):
    out = tmp_path / "parallel"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "full__diffratio-js__s1").write_text("in the way")   # this arm's run directory cannot be made
    two = LaunchConfig(jobs=2, cores=2)
    with pytest.raises(UserError, match=r"1 job failed \(full__diffratio-js__s1\) and 1 could not start"):
        run_ablation(AblationConfig(config=grid_file, out=str(out)), progress=False, launch_cfg=two)
    state = statuses(out)
    assert state == {"classifier": "done", "prereq.reg": "done", "reference": "done", "full__diffratio-js__s0": "done",
                     "full__diffratio-js__s1": "failed", "reg__diffratio-js__s0": "done",
                     "reg__diffratio-js__s1": "done", "aggregate": "pending"}
    text = format_status(out)
    failed_line = next(l for l in text.splitlines() if "full__diffratio-js__s1" in l)
    last = (out / "logs" / "full__diffratio-js__s1.log").read_text().splitlines()[-1]
    assert "exists and is not a directory" in last and last in failed_line   # the status shows the log's last line
    assert text.splitlines()[0] == f"{out}: 6/8 jobs done (3/4 arms), 0 running, 1 failed, 1 pending"
    # the arms ran in the two worker processes, not in this one, each with its own log and record
    pids = {json.loads(state_file(out, a).read_text())["pid"] for a in ARMS}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    assert all((out / "logs" / f"{a}.log").read_text().count("started on") == 1 for a in ARMS)
    partial = pd.read_csv(out / "summary.csv").set_index("run")
    assert partial.loc["full__diffratio-js__s1", "status"] == "missing" and not (out / "verdict.json").exists()

    # the obstacle removed, a rerun runs that arm and the aggregate step only
    (out / "runs" / "full__diffratio-js__s1").unlink()
    before = {a: (out / "logs" / f"{a}.log").read_text() for a in ARMS if a != "full__diffratio-js__s1"}
    run_ablation(AblationConfig(config=grid_file, out=str(out)), progress=False, launch_cfg=two)
    assert set(statuses(out).values()) == {"done"}
    assert before == {a: (out / "logs" / f"{a}.log").read_text() for a in before}
    pd.testing.assert_frame_equal(rows(out), rows(serial))                 # row for row, numbers included
    assert (out / "verdict.json").read_text() == (serial / "verdict.json").read_text()

    # nothing left: a third launch runs no job
    stamps = {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.state.json")}
    run_ablation(AblationConfig(config=grid_file, out=str(out)), progress=False, launch_cfg=two)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.state.json")}
    assert format_status(out).splitlines()[0] == f"{out}: 8/8 jobs done (4/4 arms), 0 running, 0 failed, 0 pending"


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_rows(serial, grid_file, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "submitit"
    opts = LaunchConfig(launcher="slurm", cluster="local", cpus=1, time_min=10)
    run_ablation(AblationConfig(config=grid_file, out=str(out)), progress=False, launch_cfg=opts)
    pd.testing.assert_frame_equal(rows(out), rows(serial))
    assert (out / "verdict.json").read_text() == (serial / "verdict.json").read_text()
    state = statuses(out)
    assert set(state.values()) == {"done"} and len(state) == 8
    ran = [p.name[:-len(".queued.json")] for p in (out / "jobs").glob("*.queued.json")]
    # every job went through submitit (the classifier may be cached by an earlier test: then it was skipped)
    assert set(ran) >= {"prereq.reg", "reference", "aggregate", *ARMS}
    assert json.loads(state_file(out, "aggregate").read_text())["pid"] != os.getpid()
