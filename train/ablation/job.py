"""One job of a grid, run with its record and log: ``python -m train.ablation.job OUT/jobs/NAME.job.json``.

Every launcher runs a job through ``run_job``: the local one in its own process (``--jobs 1``) or
in one of N worker processes (``--jobs N``: ``python -m train.ablation.job --worker``, which runs
the jobs it is sent one after another), the SLURM one inside a submitit worker. The job
writes only its own files: ``jobs/NAME.state.json`` (running, then done or failed) and
``logs/NAME.log`` (what it did; on failure the traceback, then one last line ``failed: ...``, the
line the status view shows).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from probe.core.errors import UserError
from probe.core.runs import write_json
from train.ablation.jobs import AGGREGATE, Job, job_done, log_file, state_file
from train.ablation.run import run_unit


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}" if text else type(e).__name__


def set_threads(threads: int | None) -> None:
    """Intra-op threads of this process (the launcher's share of the cores)."""
    if threads and threads > 0:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later
        torch.set_num_threads(int(threads))


def run_recorded(out: Path, name: str, action, capture: bool = False, echo=None, done: dict | None = None) -> None:
    """Run ``action(say)`` as job ``name`` of grid ``out``: state record and log around it.

    capture : also send this process's stdout/stderr to the job's log (a job in its own process)
    echo    : ``f(message)`` that also shows the job's lines (the in-process launcher's console)
    done    : fields added to the record once the job finished (the aggregate's grid digest)
    Re-raises what ``action`` raised, after recording it.
    """
    out = Path(out)
    log_path = log_file(out, name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = {"host": socket.gethostname(), "pid": os.getpid(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "started_s": started,
            "cluster_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
            "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}
    with open(log_path, "a", buffering=1) as log:
        def say(message: str) -> None:
            log.write(f"{_stamp()} {message}\n")
            if echo is not None:
                echo(message)

        write_json(state_file(out, name), {"state": "running", **base})
        say(f"started on {base['host']} (pid {base['pid']})")
        try:
            with (contextlib.redirect_stdout(log) if capture else contextlib.nullcontext()), \
                 (contextlib.redirect_stderr(log) if capture else contextlib.nullcontext()):
                action(say)
        except BaseException as e:
            if not isinstance(e, UserError):  # a user error is its one line; anything else keeps its traceback
                traceback.print_exc(file=log)
            message = "interrupted" if isinstance(e, KeyboardInterrupt) else _one_line(e)
            log.write(f"{_stamp()} failed: {message}\n")
            write_json(state_file(out, name), {"state": "failed", "error": message, **base,
                                               "seconds": time.time() - started})
            raise
        seconds = time.time() - started
        say(f"done in {seconds:.1f} s")
        write_json(state_file(out, name), {"state": "done", **base, "seconds": seconds, **(done or {})})


def run_job(out: Path, job: Job, progress: bool = False, train_fn=None, finalize=None, capture: bool = False,
            echo=None) -> None:
    """Run one job (its unit resumes if it was started) after checking that its dependencies are done.

    progress : progress bars of the unit                                                  (default False)
    train_fn : see ``train.ablation.run.run_unit``                                         (default None)
    finalize : ``f()`` run by the aggregate job (the caller's analysis)                   (default None)
    capture  : the job's stdout/stderr go to its log                                      (default False)
    echo     : see ``run_recorded``                                                       (default None)
    """
    from train.ablation.jobs import read_jobs

    out = Path(out)

    def action(say) -> None:
        jobs = {j.name: j for j in read_jobs(out)} if job.depends_on else {}
        missing = [d for d in job.depends_on if d not in jobs or not job_done(out, jobs[d])]
        if missing:  # a launcher runs jobs after their dependencies; this guards against a lost ordering
            raise UserError(f"depends on {', '.join(missing)}, not finished yet")
        if job.kind == AGGREGATE:
            if finalize is None:
                raise UserError("the aggregate step needs the analysis; run it with probe train ablation")
            say("summary, aggregate, features and verdict")
            finalize()
        else:
            run_unit(job.kind, job.config, progress=progress, say=say, train_fn=train_fn)

    run_recorded(out, job.name, action, capture=capture, echo=echo,
                 done=job.config if job.kind == AGGREGATE else None)


def run_job_file(path: str | Path, threads: int | None = None, finalize=None) -> str:
    """Run the job described in ``OUT/jobs/NAME.job.json`` in this (fresh) process; returns its name."""
    import json

    path = Path(path).resolve()
    out = path.parent.parent
    job = Job.from_dict(json.loads(path.read_text()))
    os.chdir(job.cwd)  # the job's relative paths (the grid's own --out among them) start there
    set_threads(threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    run_job(out, job, progress=False, finalize=finalize, capture=True)
    return job.name


def _run_with_fds_in_log(path: Path) -> int:
    """A job inside a worker: everything the process writes meanwhile, C libraries included, goes to
    the job's log (a worker runs one job at a time, so its file descriptors are the job's)."""
    path = Path(path).resolve()
    log = log_file(path.parent.parent, path.name[:-len(".job.json")])
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        run_job_file(path)
        return 0
    except Exception:  # recorded in the job's state file and log
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def serve() -> int:
    """Worker of the local launcher's ``--jobs N``: reads job files from stdin, one per line, runs
    each, answers its exit status (0 done, 1 failed) on a line of the stdout it was started with.
    torch and the trainers are imported once per worker instead of once per job."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)  # the reply channel; fd 1 itself then goes to stderr
    os.dup2(2, 1)
    set_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    import train.student.loop  # noqa: F401  (imported before the first job: its time is not any job's)

    answer.write("ready\n")
    for line in sys.stdin:
        if line.strip():
            answer.write(f"{_run_with_fds_in_log(Path(line.strip()))}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--worker"]:
        return serve()
    if len(argv) != 1:
        print("usage: python -m train.ablation.job OUT/jobs/NAME.job.json | --worker", file=sys.stderr)
        return 2
    try:
        run_job_file(argv[0])
    except Exception:  # recorded in the job's state file and log
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
