"""Launchers: run a grid's jobs here (one at a time, or N processes at once) or on SLURM through submitit.

``launch(plan, LaunchConfig(...))`` runs every job of ``train.ablation.jobs.plan_grid`` that is not
finished yet, dependencies first, and reports what it did. Jobs already finished are skipped by
every launcher alike (their run directories say so), so rerunning after a failure or a kill only
runs what is unfinished.

- ``local``, ``jobs=1``: each job in this process, in plan order (the behaviour of a single process).
- ``local``, ``jobs=N``: up to N jobs at once in N worker processes (``python -m train.ablation.job
  --worker``), each with ``cores // N`` torch threads and, on a box with GPUs, its own GPU
  (``CUDA_VISIBLE_DEVICES``, round robin over the visible ones); ``jobs=0`` picks one per GPU (or
  per core without GPUs). A worker runs the jobs it is given one after another (torch is imported
  once per worker, not per job); a worker that dies fails its job and is replaced. A job whose
  dependency failed is not started.
- ``slurm``: submitit; the classifier, prerequisites and reference figure as single jobs, each
  after (``afterok``) the ones it needs; the arms as one job array after those; the aggregate step
  after the array. Each job is requeued on timeout or preemption and resumes its unit. Jobs of an
  earlier launch still queued or running are not submitted again. ``cluster="local"`` runs the same
  submissions on submitit's local executor (tests, CI); there, where no scheduler enforces
  ``afterok``, the launcher waits for a job's dependencies before submitting it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from probe.core.errors import UserError
from probe.core.runs import write_json
from train.ablation.jobs import (
    AGGREGATE,
    Job,
    Plan,
    _read,
    _utc,
    job_done,
    job_file,
    last_log_line,
    log_file,
    pid_alive,
    queued_file,
    state_file,
)

LAUNCHERS = ("local", "slurm")
CLUSTERS = ("slurm", "local", "debug")


@dataclass
class LaunchConfig:
    launcher: str = "local"           # local | slurm
    jobs: int = 1                     # local: jobs at once; 1 = in this process; 0 = one per GPU (else per core)
    devices: tuple | None = None      # local: GPU ids to spread jobs over (None = CUDA_VISIBLE_DEVICES or all)
    cores: int | None = None          # local: cores the jobs share (None = this process's CPU affinity)
    partition: str | None = None      # slurm: partition (None = the cluster's default)
    time_min: int = 120               # slurm: time limit per job, minutes (a job past it is requeued and resumes)
    gpus: int = 0                     # slurm: GPUs per job
    cpus: int = 4                     # slurm: CPUs per job (= torch threads of the job)
    mem_gb: float = 16.0              # slurm: memory per job, GB
    array_limit: int = 0              # slurm: arms of the array running at once (0 = no limit)
    wait: bool = False                # slurm: wait until every job has ended (else submit and return)
    cluster: str = "slurm"            # slurm: submitit cluster: slurm | local (tests, CI) | debug


@dataclass
class LaunchReport:
    total: int                                      # jobs in the plan
    skipped: list = field(default_factory=list)     # finished before this launch
    ran: list = field(default_factory=list)         # run (or submitted) by this launch
    failed: dict = field(default_factory=dict)      # name -> last line of its log
    blocked: list = field(default_factory=list)     # not run: a job it depends on failed
    queued: list = field(default_factory=list)      # on the cluster, not waited for
    seconds: float = 0.0                            # wall time of the launch

    @property
    def complete(self) -> bool:
        return not (self.failed or self.blocked or self.queued)


# -------------------------------------------------------------------------- local: slots
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus(device: str = "auto") -> list[str]:
    """GPU ids jobs may be spread over: none for device "cpu"; CUDA_VISIBLE_DEVICES when set; else all."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def job_slots(jobs: int, cores: int, gpus: list) -> list[dict]:
    """The environment of each of the concurrent job slots: ``cores // slots`` threads each (at least
    one), and on a GPU box one GPU per slot, round robin (``jobs`` 0 = one slot per GPU, or per core)."""
    n = jobs if jobs > 0 else (len(gpus) or cores)
    threads = max(1, cores // n)
    slots = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[i % len(gpus)])
        slots.append(env)
    return slots


# ------------------------------------------------------------------------------- launching
def launch(plan: Plan, opts: LaunchConfig, progress: bool = True, train_fn=None, finalize=None,
           log=print) -> LaunchReport:
    """Run (or submit) the unfinished jobs of a plan; call it under the grid lock, after ``write_plan``.

    progress : progress bars of in-process jobs                                           (default True)
    train_fn : see ``train.ablation.run.run_unit``; only with ``jobs=1``                  (default None)
    finalize : ``f()`` the aggregate job runs (the caller's analysis); None leaves it pending (default None)
    log      : ``f(message)`` for the launcher's lines                                     (default print)
    """
    if opts.launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher {opts.launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if opts.jobs < 0:
        raise UserError("--jobs must be >= 0 (0 = one per GPU, or per core)")
    if train_fn is not None and not (opts.launcher == "local" and opts.jobs == 1):
        raise UserError("a train function can only be injected with the local launcher and --jobs 1")
    start = time.time()
    report = LaunchReport(total=len(plan.jobs))
    todo: list[Job] = []
    for job in plan.jobs:
        # new results (any unit still to run) make an earlier aggregate out of date
        stale = job.kind == AGGREGATE and bool(todo)
        if not stale and job_done(plan.out, job):
            report.skipped.append(job.name)
        else:
            todo.append(job)
    if any(j.kind != AGGREGATE for j in todo):
        state_file(plan.out, AGGREGATE).unlink(missing_ok=True)
    if todo:
        log(f"{len(report.skipped)}/{len(plan.jobs)} jobs finished before; {len(todo)} to run")
    if opts.launcher == "slurm":
        _launch_submitit(plan, todo, opts, finalize, report, log)
    elif opts.jobs == 1:
        _launch_inline(plan, todo, progress, train_fn, finalize, report, log)
    else:
        _launch_processes(plan, todo, opts, finalize, report, log)
    report.seconds = time.time() - start
    return report


def _blocked_by(job: Job, report: LaunchReport) -> bool:
    return any(d in report.failed or d in report.blocked for d in job.depends_on)


def _launch_inline(plan: Plan, todo: list, progress: bool, train_fn, finalize, report: LaunchReport, log) -> None:
    from train.ablation.job import run_job

    for i, job in enumerate(todo, start=1):
        if _blocked_by(job, report) or (job.kind == AGGREGATE and finalize is None):
            report.blocked.append(job.name)
            continue
        log(f"[{i}/{len(todo)}] {job.name}")
        try:
            run_job(plan.out, job, progress=progress, train_fn=train_fn, finalize=finalize,
                    echo=lambda m: log(f"    {m}"))
        except Exception:  # recorded in the job's log; independent jobs go on
            report.failed[job.name] = last_log_line(plan.out, job.name)
            log(f"    {report.failed[job.name]}")
            continue
        report.ran.append(job.name)


def _child_env(slot: dict) -> dict:
    env = {**os.environ, **slot}
    root = str(Path(__file__).resolve().parents[2])  # the children import this very source tree
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Worker:
    """One slot of ``--jobs N``: a ``python -m train.ablation.job --worker`` process with the slot's
    threads and GPU, running the jobs it is sent one after another (a job's output goes to its own
    log; what the worker prints between jobs to ``logs/worker-I.log``)."""

    proc: subprocess.Popen[str]           # set by start(), which __init__ calls
    stdin: IO[str]                        # its pipes (start() asks for both)
    stdout: IO[str]
    job: Job | None                       # the job it is running, None while idle

    def __init__(self, out: Path, index: int, env: dict, cwd: str):
        self.out, self.index, self.env, self.cwd = out, index, env, cwd
        self.job, self.ready = None, False
        self.start()

    def start(self) -> None:
        self.errors = open(log_file(self.out, f"worker-{self.index}"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "train.ablation.job", "--worker"], cwd=self.cwd,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     text=True, bufsize=1)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # PIPE was asked for both
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.ready = False

    def send(self, job: Job) -> None:
        self.job = job
        self.stdin.write(str(job_file(self.out, job.name).resolve()) + "\n")
        self.stdin.flush()

    def stop(self, interrupt: bool = False) -> None:
        if interrupt:
            self.proc.send_signal(signal.SIGINT)
        else:
            self.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


def _launch_processes(plan: Plan, todo: list, opts: LaunchConfig, finalize, report: LaunchReport, log) -> None:
    import selectors

    from train.ablation.job import run_job

    out = plan.out
    device = str(plan.grid.student.get("device", "auto"))
    gpus = list(opts.devices) if opts.devices is not None else visible_gpus(device)
    cores = opts.cores or available_cores()
    units = sum(j.kind != AGGREGATE for j in todo)
    slots = job_slots(opts.jobs, cores, gpus)[:max(1, units)]  # no idle workers for a short list
    log(f"{len(slots)} jobs at once, {slots[0]['OMP_NUM_THREADS']} threads each"
        + (f", GPUs {', '.join(s['CUDA_VISIBLE_DEVICES'] for s in slots)}" if gpus else ""))
    done = {j.name for j in plan.jobs} - {j.name for j in todo}
    pending = list(todo)
    workers = [_Worker(out, i, _child_env(env), os.getcwd()) for i, env in enumerate(slots)] if units else []
    selector = selectors.DefaultSelector()
    for w in workers:
        selector.register(w.stdout, selectors.EVENT_READ, w)

    def finished(w: _Worker, code: int | None) -> None:
        job, w.job = w.job, None
        assert job is not None  # only a busy worker finishes
        if code == 0 and job_done(out, job):
            done.add(job.name)
            report.ran.append(job.name)
            log(f"done {job.name}")
        else:
            _note_exit(out, job.name, code)
            report.failed[job.name] = last_log_line(out, job.name)
            log(f"failed {job.name}: {report.failed[job.name]}")

    try:
        while pending or any(w.job for w in workers):
            for job in list(pending):
                if _blocked_by(job, report) or (job.kind == AGGREGATE and finalize is None):
                    report.blocked.append(job.name)
                    pending.remove(job)
                elif all(d in done for d in job.depends_on):
                    if job.kind == AGGREGATE:  # everything else is done: the analysis runs here
                        pending.remove(job)
                        try:
                            run_job(out, job, finalize=finalize, echo=lambda m, job=job: log(f"{job.name}: {m}"))
                            done.add(job.name)
                            report.ran.append(job.name)
                        except Exception:
                            report.failed[job.name] = last_log_line(out, job.name)
                        continue
                    idle = next((w for w in workers if w.ready and w.job is None), None)
                    if idle is not None:
                        pending.remove(job)
                        idle.send(job)
                        gpu = f" on GPU {slots[idle.index]['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                        log(f"started {job.name}{gpu}")
            if not pending and not any(w.job for w in workers):
                break
            for key, _ in selector.select(timeout=0.5):
                w = key.data
                line = w.stdout.readline()
                if line.strip() == "ready":
                    w.ready = True
                elif line.strip() in ("0", "1"):
                    finished(w, int(line))
                else:  # the worker died (killed, crashed): its job failed; a fresh worker takes the slot
                    selector.unregister(w.stdout)
                    code = w.proc.wait()
                    w.errors.close()
                    if w.job is not None:
                        finished(w, code or 1)
                    w.start()
                    selector.register(w.stdout, selectors.EVENT_READ, w)
    except BaseException:  # interrupted: stop the workers; each running job's log says it ended
        for w in workers:
            if w.job is not None:
                w.stop(interrupt=True)
                _note_exit(out, w.job.name, w.proc.returncode)
        raise
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.stop()
        selector.close()


def _note_exit(out: Path, name: str, code: int | None) -> None:
    """A child that died without recording its end (killed, crashed): say so as its log's last line.
    The child has exited, so its log has one writer again."""
    rec = _read(state_file(out, name)) or {}
    if rec.get("state") in ("done", "failed"):
        return
    how = ("ended without a status" if code is None else
           f"killed by signal {-code}" if code < 0 else f"exit code {code}")
    with open(log_file(out, name), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: the process ended ({how}) without recording a result\n")


# ----------------------------------------------------------------------------- submitit
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


def still_queued(out: Path, name: str) -> str | None:
    """The cluster job id of an earlier launch's submission of ``name`` that is still queued or
    running, else None."""
    rec = _read(queued_file(out, name))
    if not rec:
        return None
    if rec.get("cluster") == "slurm":
        import submitit

        state = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"]).state
        if state == "UNKNOWN":  # no accounting answer: trust the job's own record
            own = _read(state_file(out, name)) or {}
            live = own.get("state") == "running" and own.get("started_s", 0) >= rec.get("submitted_s", 0)
        else:
            live = state.split()[0] in ACTIVE
    else:  # submitit's local executor: the job's controller process on this host
        live = bool(pid_alive(rec.get("host"), int(rec["job_id"])))
    return rec["job_id"] if live else None


def _launch_submitit(plan: Plan, todo: list, opts: LaunchConfig, finalize, report: LaunchReport, log) -> None:
    import socket

    try:
        import submitit
    except ImportError:
        raise UserError("the slurm launcher needs submitit: pip install 'onestep-probe[slurm]'") from None
    from train.ablation.slurm import SubmititJob

    if opts.cluster not in CLUSTERS:
        raise UserError(f"unknown submitit cluster {opts.cluster!r}; choose one of {', '.join(CLUSTERS)}")
    out = plan.out
    on_slurm = opts.cluster == "slurm"
    folder = out / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster)
    common = dict(name=f"probe-{out.resolve().name}", timeout_min=int(opts.time_min), cpus_per_task=int(opts.cpus),
                  gpus_per_node=int(opts.gpus), mem_gb=float(opts.mem_gb),
                  slurm_partition=opts.partition or None, slurm_signal_delay_s=120)
    done = {j.name for j in plan.jobs} - {j.name for j in todo}
    ids: dict[str, str] = {}
    handles: dict[str, object] = {}

    for job in todo:  # an earlier launch's jobs still on the cluster are not submitted twice
        if job.kind != AGGREGATE or finalize is not None:
            live = still_queued(out, job.name)
            if live:
                ids[job.name] = live
                log(f"{job.name}: still queued or running as job {live}; not submitted again")

    def dependency(deps: list) -> tuple[bool, str | None]:
        """(submit at all, the afterok dependency). SLURM enforces the order; other clusters wait here."""
        deps = [d for d in dict.fromkeys(deps) if d not in done]
        if any(d in report.failed or d in report.blocked for d in deps):
            return False, None
        if on_slurm:
            wanted = sorted({_array_id(ids[d], handles.get(d)) for d in deps if d in ids})
            return True, ("afterok:" + ":".join(wanted)) if wanted else None
        for d in deps:
            _wait_local(out, d, handles.get(d), ids.get(d))
            if job_done(out, by_name[d]):
                done.add(d)
            else:
                report.failed.setdefault(d, last_log_line(out, d) or _exception_line(handles.get(d)))
                return False, None
        return True, None

    def submit(jobs: list, deps: list, array: bool) -> None:
        ok, after = dependency(deps)
        if not ok:
            report.blocked.extend(j.name for j in jobs)
            return
        extra = {"dependency": after, "kill-on-invalid-dep": "yes"} if after else {}
        executor.update_parameters(**common, slurm_additional_parameters=extra,
                                   **({"slurm_array_parallelism": opts.array_limit or len(jobs)} if array else {}))
        submitted_s = time.time()
        runners = [SubmititJob(str(job_file(out, j.name).resolve()), int(opts.cpus),
                               finalize if j.kind == AGGREGATE else None) for j in jobs]
        if array:
            with executor.batch():
                hs = [executor.submit(r) for r in runners]
        else:
            hs = [executor.submit(r) for r in runners]
        for j, h in zip(jobs, hs):
            ids[j.name], handles[j.name] = h.job_id, h
            write_json(queued_file(out, j.name), {"cluster": opts.cluster, "job_id": h.job_id,
                                                  "folder": str(folder / "%j"), "host": socket.gethostname(),
                                                  "submitted_s": submitted_s, "submitted_utc": _utc(submitted_s)})
            report.ran.append(j.name)
        log(f"submitted {', '.join(j.name for j in jobs) if len(jobs) <= 3 else f'{len(jobs)} arms as one array'}"
            f" as job {hs[0].job_id.split('_')[0]}" + (f" (after {after[len('afterok:'):]})" if after else ""))

    by_name = plan.by_name()
    singles = [j for j in todo if j.kind not in ("student", AGGREGATE) and j.name not in ids]
    arms = [j for j in todo if j.kind == "student" and j.name not in ids]
    for job in singles:  # few: each after exactly the ones it needs
        submit([job], job.depends_on, array=False)
    if arms:
        submit(arms, [d for j in arms for d in j.depends_on], array=True)
    for job in todo:
        if job.kind == AGGREGATE and job.name not in ids:
            if finalize is None:
                report.blocked.append(job.name)
            else:
                submit([job], job.depends_on, array=False)
    if on_slurm and not opts.wait:
        report.queued = [n for n in ids if n not in report.failed]
        return
    for name in ids:  # wait for everything submitted (and still queued from before)
        if name in report.failed or name in report.blocked:
            continue
        _wait_local(out, name, handles.get(name), ids.get(name))
        if not job_done(out, by_name[name]):
            report.failed[name] = last_log_line(out, name) or _exception_line(handles.get(name))
    report.ran = [n for n in report.ran if n not in report.failed]


def _array_id(job_id: str, handle) -> str:
    # afterok on the array's id waits for all its tasks: used for this launch's own array, whose tasks
    # are all arms; a task of an earlier array is named exactly (that array may hold failed tasks)
    return job_id.split("_")[0] if handle is not None else job_id


def _wait_local(out: Path, name: str, handle, job_id: str | None) -> None:
    if handle is not None:
        handle.wait()
        return
    rec = _read(queued_file(out, name)) or {}
    while job_id and rec.get("cluster") != "slurm" and pid_alive(rec.get("host"), int(job_id)):
        time.sleep(1.0)
    while job_id and rec.get("cluster") == "slurm" and still_queued(out, name):
        time.sleep(30.0)


def _exception_line(handle) -> str:
    if handle is None:
        return ""
    try:
        exc = handle.exception()
    except Exception as e:  # the job's result could not be read
        exc = e
    lines = [l for l in str(exc or "").splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""
