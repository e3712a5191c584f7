"""A grid expanded into jobs with dependencies, the job records on disk, and the status view.

Jobs, in the order they are planned::

    classifier           the metric classifier of the students' data set (cached; trained once, not by every arm)
    prereq.NAME          each [prereq.NAME] (teacher, regressed or transplanted generator), after the ones it names
    reference            the teacher's own quality figure (when reference_steps > 0)
    INIT__METHOD__sSEED  every arm: a student run (depends on the classifier and the prerequisites it uses)
    aggregate            summary, aggregate, features and verdict, once every other job is done

A job is a small JSON description (``Job``): its kind, name, the config of its unit (the same
``TeacherConfig`` / ``RegressConfig`` / ``TransplantConfig`` / ``StudentConfig`` fields a
``probe train ...`` command would get), the jobs it depends on and the directory its relative
paths are relative to. Whether it is finished is read from its run directory
(``train.ablation.run.unit_state``), so a rerun skips what is done whichever launcher did it.

Files in the grid directory (each written by one process only)::

    jobs/plan.json          the job names in order (written by the launch, under the grid lock)
    jobs/NAME.job.json      the job's description (launch)
    jobs/NAME.state.json    running / done / failed, with host, pid, times, error (the job itself)
    jobs/NAME.queued.json   the cluster job id it was submitted as (the SLURM launch)
    logs/NAME.log           the job's log (the job itself; a local parent adds a line when it died)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from probe.core.errors import UserError
from probe.core.runs import write_json
from train.ablation.grid import AblationConfig, Grid, _prereq_config, check_grid, load_grid, prereq_order
from train.ablation.run import reference_config, run_name, student_config, teacher_path, unit_state
from train.initspec import parse_init_spec

AGGREGATE = "aggregate"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Job:
    name: str                         # unique in the grid; names its log and record files
    kind: str                         # classifier | teacher | regress | transplant | reference | student | aggregate
    config: dict                      # the unit's config as JSON (paths relative to cwd)
    depends_on: list = field(default_factory=list)  # names of jobs that must be done first
    cwd: str = ""                     # directory the job was planned in (its relative paths start there)

    @property
    def is_arm(self) -> bool:
        return self.kind == "student"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return cls(**d)


@dataclass
class Plan:
    out: Path                         # the grid directory
    cfg: AblationConfig               # what the grid was launched with
    grid: Grid
    refs: dict                        # "@NAME" -> directory
    jobs: list                        # [Job], dependencies first

    def by_name(self) -> dict:
        return {j.name: j for j in self.jobs}


# ------------------------------------------------------------------------------ expansion
def _eval_dataset(grid: Grid, refs: dict) -> str | None:
    """The data set the arms and the reference figure are scored on (None when it cannot be known now)."""
    if grid.data:
        return grid.data
    if grid.teacher.startswith("@") and grid.teacher[1:] in grid.prereqs:
        from train.teacher import TeacherConfig

        return str(grid.prereqs[grid.teacher[1:]].get("data", TeacherConfig.data))
    info = Path(teacher_path(grid, refs)) / "model.json"
    return json.loads(info.read_text()).get("dataset") if info.exists() else None


def _prereqs_named(values, built: dict) -> list[str]:
    """Job names of the prerequisites built here that ``values`` (strings) refer to as "@NAME"."""
    names = []
    for v in values:
        if isinstance(v, str) and v.startswith("@") and v[1:] in built:
            names.append(built[v[1:]])
    return names


def _spec_refs(spec: str) -> list[str]:
    return [t.path for t in parse_init_spec(spec).terms if t.op == "from" and t.path.startswith("@")]


def plan_grid(cfg: AblationConfig) -> Plan:
    """Load and check a grid (nothing is written), then expand it into jobs."""
    out = Path(cfg.out)
    grid = load_grid(cfg.config, cfg)
    refs = check_grid(grid, out)
    cwd = os.getcwd()
    for name in grid.prereqs:
        if not _NAME.match(name):
            raise UserError(f"[prereq.{name}]: a prerequisite name must be letters, digits, '_', '-', '.'")
    jobs: list[Job] = []
    built = {name: f"prereq.{name}" for name in grid.prereqs}
    dataset = _eval_dataset(grid, refs)
    evaluates = int(grid.student.get("eval_every", 0)) > 0 or grid.reference_steps > 0
    classifier = ["classifier"] if dataset and evaluates else []
    if classifier:
        jobs.append(Job("classifier", "classifier", {"dataset": dataset}, [], cwd))
    for name in prereq_order(grid.prereqs, grid.external):
        kind, pcfg = _prereq_config(name, grid.prereqs[name], out, refs)
        jobs.append(Job(built[name], kind, _jsonable(dataclasses.asdict(pcfg)),
                        _prereqs_named(grid.prereqs[name].values(), built), cwd))
    teacher_dep = _prereqs_named([grid.teacher], built)
    ref = reference_config(grid, out, refs)
    if ref is not None:
        jobs.append(Job("reference", "reference", ref, classifier + teacher_dep, cwd))
    for entry in grid.inits:
        deps = classifier + sorted(set(teacher_dep + _prereqs_named(_spec_refs(entry.spec), built)))
        for method in grid.methods:
            for seed in grid.seeds_of(entry):
                scfg = student_config(grid, entry, method, seed, out, refs)
                jobs.append(Job(run_name(entry.label, method, seed), "student", _jsonable(dataclasses.asdict(scfg)),
                                deps, cwd))
    jobs.append(Job(AGGREGATE, AGGREGATE, {"grid": grid_digest(grid)}, [j.name for j in jobs], cwd))
    return Plan(out=out, cfg=cfg, grid=grid, refs=refs, jobs=jobs)


def grid_digest(grid: Grid) -> str:
    """A digest of the whole grid as planned. The aggregate step reads the grid (its contrasts, data,
    extraction), so an edited grid makes an earlier verdict out of date even when no run has to train again."""
    text = json.dumps(dataclasses.asdict(grid), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def write_plan(plan: Plan) -> None:
    """grid.json, jobs/plan.json and one jobs/NAME.job.json per job (call under the grid lock)."""
    out = plan.out
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    write_json(out / "grid.json", {"config": dataclasses.asdict(plan.cfg), "grid": dataclasses.asdict(plan.grid)})
    for job in plan.jobs:
        write_json(job_file(out, job.name), job.to_dict())
    write_json(out / "jobs" / "plan.json", {"jobs": [j.name for j in plan.jobs], "written_utc": _utc()})


def job_file(out: Path, name: str) -> Path:
    return Path(out) / "jobs" / f"{name}.job.json"


def log_file(out: Path, name: str) -> Path:
    return Path(out) / "logs" / f"{name}.log"


def state_file(out: Path, name: str) -> Path:
    return Path(out) / "jobs" / f"{name}.state.json"


def queued_file(out: Path, name: str) -> Path:
    return Path(out) / "jobs" / f"{name}.queued.json"


def read_jobs(out: Path) -> list[Job]:
    """The jobs of the last launch of a grid directory, in order."""
    plan = Path(out) / "jobs" / "plan.json"
    if not plan.exists():
        raise UserError(f"{out} holds no launched grid (no jobs/plan.json); start it with probe train ablation")
    names = json.loads(plan.read_text())["jobs"]
    return [Job.from_dict(json.loads(job_file(out, n).read_text())) for n in names]


def _utc(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------- state
def job_done(out: Path, job: Job) -> bool:
    """Finished, judged from the run directory (the aggregate step: from its record, which must name the grid
    as planned now, and verdict.json)."""
    if job.kind == AGGREGATE:
        rec = _read(state_file(out, job.name)) or {}
        return (rec.get("state") == "done" and rec.get("grid") == job.config.get("grid")
                and (Path(out) / "verdict.json").exists())
    return unit_state(job.kind, job.config, Path(job.cwd)) == "done"


def pid_alive(host: str | None, pid: int | None) -> bool | None:
    """Is that process alive? None when it ran on another host (cannot be told from here)."""
    if host != socket.gethostname() or not pid:
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_log_line(out: Path, name: str) -> str:
    path = log_file(out, name)
    if not path.exists():
        return ""
    with open(path, "rb") as f:  # only the tail: logs of long runs grow
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def job_status(out: Path, job: Job, done: set) -> dict:
    """{"name", "kind", "state": done | running | failed | pending, "note"} of one job."""
    if job_done(out, job):
        rec = _read(state_file(out, job.name)) or {}
        note = f"{rec['seconds']:.0f} s" if rec.get("state") == "done" and "seconds" in rec else ""
        return {"name": job.name, "kind": job.kind, "state": "done", "note": note}
    rec = _read(state_file(out, job.name)) or {}
    queued = _read(queued_file(out, job.name)) or {}
    state, note = "pending", ""
    if rec.get("state") == "running":
        alive = pid_alive(rec.get("host"), rec.get("pid"))
        if alive is False:
            state, note = "failed", last_log_line(out, job.name) or "the process ended without recording a result"
        else:
            where = f"pid {rec.get('pid')} on {rec.get('host')}" + (f", cluster job {rec['cluster_job']}"
                                                                   if rec.get("cluster_job") else "")
            since = time.time() - rec.get("started_s", time.time())
            state, note = "running", f"{where}, {since:.0f} s"
    elif rec.get("state") == "failed" and rec.get("started_s", 0) >= queued.get("submitted_s", 0):
        state, note = "failed", last_log_line(out, job.name) or rec.get("error", "")
    elif queued:
        note = f"queued as {queued.get('cluster')} job {queued.get('job_id')} at {queued.get('submitted_utc')}"
    else:
        waits = [d for d in job.depends_on if d not in done]
        if waits:
            note = f"waits for {len(waits)} job{'s' if len(waits) > 1 else ''}"
        if job.kind != AGGREGATE and unit_state(job.kind, job.config, Path(job.cwd)) == "partial":
            note = (note + "; " if note else "") + "started before: resumes"
    return {"name": job.name, "kind": job.kind, "state": state, "note": note}


def grid_status(out: Path) -> list[dict]:
    """Every job's status, read from the grid directory only (job records, logs, run directories)."""
    jobs = read_jobs(out)
    done = {j.name for j in jobs if job_done(out, j)}
    return [job_status(out, j, done) for j in jobs]


def format_status(out: Path) -> str:
    """The status view of ``probe train ablation --status OUT``."""
    rows = grid_status(out)
    count = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    arms = [r for r in rows if r["kind"] == "student"]
    arms_done = sum(r["state"] == "done" for r in arms)
    head = (f"{out}: {count['done']}/{len(rows)} jobs done ({arms_done}/{len(arms)} arms), "
            f"{count['running']} running, {count['failed']} failed, {count['pending']} pending")
    width = max(len(r["name"]) for r in rows)
    lines = [head] + [f"  {r['state']:<8} {r['name']:<{width}}  {r['note']}".rstrip() for r in rows]
    return "\n".join(lines)
