"""One-step methods: training time to a quality threshold, each method at its best setting.

    python benchmarks/bench_quality.py --teacher RUN --work-dir DIR --sweep --write
    python benchmarks/bench_quality.py --teacher RUN --work-dir DIR --settings 'vsd:aux_steps=2'
    python benchmarks/bench_quality.py --dry-run                      # smoke test, tiny budget

  - time to quality: per method and seed, training seconds (the loop's clock: evaluation, set-up and
    checkpoints excluded) and steps until the one-step FD of the EMA generator (``--eval-samples``
    images, evaluator seed 0) first reaches each threshold, ``--thresholds`` x the teacher's Heun FD on
    the same evaluator; stops when every threshold is reached, at ``--budget`` training seconds or at
    ``--max-steps`` (checked between checkpoint chunks of ``--evals-per-chunk`` evaluations, so a run
    may pass the budget by up to one chunk; the table gives the seconds each run reached). Evaluation
    seconds are measured and reported separately. Best and last FD are both reported (a method that
    gets worse after its best point shows it).
  - ``--sweep``: per method a grid of generator x auxiliary learning rates (3 x 3 by default) and the
    method's key option (``KEY_OPTIONS``), pruned by successive halving (keep the best third by best
    FD, triple the steps; runs resume from their checkpoints), seed 0. Settings are compared at equal
    training seconds by default (``--sweep-clock``), since the table ranks methods by seconds and a key
    option such as VSD's ``aux_steps`` changes the cost of a step (``fd_within``: a setting that needed
    a little more time than the limit is judged at the FD read off the line to its next evaluation, so
    timing noise does not cost it a whole evaluation interval); ``--settings`` then names options
    every swept setting keeps (``vsd:sigma_dist=karras``). When the winner's learning rate
    lies on the edge of its grid, it is doubled (or halved) beyond it over the same rungs, up to
    ``--edge-limit`` times, and adopted when better (``extend_at_edges``: on digits every method's
    winner first sat on the top edge, and VSD's and SiD's FD at 150 steps improved from 49.5 and 65.2
    to 44.6 and 45.3 one step beyond it). The best setting is used for the long runs. Everything lives
    in ``--work-dir``: a second call skips finished runs and resumes cut ones, so the whole study can
    run in pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import METHODS, cpu_name, mean_std, run_worker  # noqa: E402  (shared: workers, machine)

NAME = "bench_quality"
# the one option per method that the sweep varies next to the learning rates
KEY_OPTIONS = {"sid": ("sid_alpha", (1.0, 1.2)), "diffratio-fkl": ("fkl_clip", (3.0, 10.0)),
               "vsd": ("aux_steps", (1, 2))}


@contextlib.contextmanager
def evaluation_clock():
    """Seconds spent in QualityEvaluator construction and in its evaluate(), while the block runs."""
    from probe.quality.metrics import QualityEvaluator

    clock = {"eval_s": 0.0, "n_evals": 0, "evaluator_setup_s": 0.0}
    init, evaluate = QualityEvaluator.__init__, QualityEvaluator.evaluate

    def timed_init(self, *a, **k):
        t0 = time.perf_counter()
        init(self, *a, **k)
        clock["evaluator_setup_s"] += time.perf_counter() - t0

    def timed_evaluate(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return evaluate(self, *a, **k)
        finally:
            clock["eval_s"] += time.perf_counter() - t0
            clock["n_evals"] += 1

    QualityEvaluator.__init__, QualityEvaluator.evaluate = timed_init, timed_evaluate
    try:
        yield clock
    finally:
        QualityEvaluator.__init__, QualityEvaluator.evaluate = init, evaluate


def threshold_hits(evals: list[dict], targets: dict[str, float]) -> dict:
    """For each named target FD: the first evaluation at or below it as {step, seconds}, or None."""
    hits = {}
    for name, fd in targets.items():
        row = next((r for r in sorted(evals, key=lambda r: r["step"]) if r["eval_fd"] <= fd), None)
        hits[name] = {"step": row["step"], "seconds": row["seconds"]} if row else None
    return hits


def worker_quality(a: dict) -> dict:
    """Train one (method, setting, seed) in chunks until ``stop_step``, the targets or the budget.

    Resumes the run in ``a['out']`` if it has a checkpoint, so successive-halving rungs and cut
    studies continue where they stopped. Returns the evaluation curve and the threshold hits.
    """
    import torch

    torch.set_num_threads(a["threads"])
    from probe.core.runs import load_state, read_metrics
    from train.student.loop import StudentConfig, train_student

    chunk = a["eval_every"] * a["evals_per_chunk"]
    cfg = StudentConfig(out=a["out"], teacher=a["teacher"], method=a["method"], batch=a["batch"],
                        steps=a["max_steps"], eval_every=a["eval_every"], eval_samples=a["eval_samples"],
                        checkpoint_every=chunk, log_every=a["eval_every"], device=a.get("device", "cpu"),
                        seed=a["seed"], **a.get("options", {}))
    out = Path(a["out"])
    state = load_state(out)
    done = state["step"] if state is not None else 0
    stop_step = min(a.get("stop_step") or a["max_steps"], a["max_steps"])
    evals, t0 = [r for r in read_metrics(out) if "eval_fd" in r], time.perf_counter()
    with evaluation_clock() as clock:
        while done < stop_step:
            if evals and a.get("stop_at_targets", True) and all(threshold_hits(evals, a["targets"]).values()):
                break
            if evals and evals[-1]["seconds"] >= a.get("budget", float("inf")):
                break
            done = min(done + chunk, stop_step)
            train_student(cfg, resume=(out / "state.pt").exists(), progress=False, stop_after=done)
            evals = [r for r in read_metrics(out) if "eval_fd" in r]
    best = min(evals, key=lambda r: r["eval_fd"])
    return {"evals": [{"step": r["step"], "seconds": r["seconds"], "fd": r["eval_fd"]} for r in evals],
            "hits": threshold_hits(evals, a["targets"]), "best_fd": best["eval_fd"], "best_step": best["step"],
            "last_fd": evals[-1]["eval_fd"], "last_step": evals[-1]["step"], "train_s": evals[-1]["seconds"],
            "wall_s": time.perf_counter() - t0, **clock}


def teacher_fd(teacher: str, n_samples: int, steps: int, device: str, churn: float = 0.0) -> float:
    """The teacher's FD on the students' evaluator (same sample count, evaluator seed 0), sampled with
    Heun (``steps``) or, with ``churn`` > 0, EDM's stochastic sampler; its eval.json when it matches."""
    from probe.quality.evaluate import EvalConfig, evaluate_model, heun_name

    cfg = EvalConfig(model=teacher, n_samples=n_samples, steps=steps, churn=churn, seed=0, device=device)
    eval_file = Path(teacher) / "eval.json"
    if eval_file.exists():
        r = json.loads(eval_file.read_text())
        if r.get("n") == n_samples and r.get("sampler") == heun_name(cfg):
            return float(r["fd"])
    result, _ = evaluate_model(cfg)
    return float(result["fd"])


def sweep_settings(method: str, lr_g: list[float], lr_aux: list[float], key_options: dict) -> list[dict]:
    """The grid of one method: lr_g x lr_aux (x its key option's values)."""
    key = key_options.get(method)
    keys = [{key[0]: v} for v in key[1]] if key else [{}]
    return [{"lr_g": g, "lr_aux": x, **k} for g in lr_g for x in lr_aux for k in keys]


def rung_steps(first: int, n_configs: int, eta: int, chunk: int) -> list[int]:
    """Step budgets of the successive-halving rungs (first, eta x first, ...), multiples of ``chunk``."""
    rungs, n = [first], n_configs
    while n > eta:  # the last rung holds at most eta settings; the best of them is the winner
        n = math.ceil(n / eta)
        rungs.append(rungs[-1] * eta)
    return [int(math.ceil(b / chunk) * chunk) for b in rungs]


def setting_key(method: str, setting: dict, seed: int) -> str:
    parts = [method] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(setting.items())]
    return "_".join(parts + [f"seed{seed}"]).replace("/", "-")


class Study:
    """Cached, resumable quality runs under one work directory (``results/*.json`` + run directories)."""

    def __init__(self, work: Path, base: dict, inprocess: bool):
        self.work, self.base, self.inprocess = Path(work), base, inprocess
        (self.work / "results").mkdir(parents=True, exist_ok=True)

    def run(self, method: str, setting: dict, seed: int, stop_step: int | None, stop_at_targets: bool,
            budget: float) -> dict:
        key = setting_key(method, setting, seed)
        cache = self.work / "results" / f"{key}-{stop_step or f'long{budget:g}s'}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        args = {**self.base, "method": method, "seed": seed, "out": str(self.work / "runs" / key),
                "options": setting, "stop_step": stop_step, "stop_at_targets": stop_at_targets, "budget": budget}
        res = worker_quality(args) if self.inprocess else run_worker("quality", args, worker_script=__file__)
        res.update(method=method, setting=setting, seed=seed)
        cache.write_text(json.dumps(res, indent=1))
        return res


SECONDS_SLACK = 0.1  # a rung's time limit is the fastest setting's seconds + 10%: timing noise, not cost


def fd_within(res: dict, seconds: float) -> tuple[float, float]:
    """Best FD a run reached within ``seconds`` of training, and the step it had reached by then.

    FD is known only at evaluations. Counting only those inside the limit would judge a run that needed
    1% more time than the limit a whole evaluation interval early; timing noise between two processes
    on one machine reaches the 10% slack, so settings of equal cost would be ranked by luck. The FD at the
    limit itself is therefore read off the straight line between the evaluations around it, and counts
    with those inside. A run that ended before the limit is judged at its last evaluation.
    """
    evals = sorted(res["evals"], key=lambda e: e["seconds"])
    inside = [e for e in evals if e["seconds"] <= seconds]
    after = [e for e in evals if e["seconds"] > seconds]
    if not inside:
        return math.inf, 0.0
    best, last = min(e["fd"] for e in inside), inside[-1]
    if not after:
        return best, float(last["step"])
    nxt = after[0]
    w = (seconds - last["seconds"]) / (nxt["seconds"] - last["seconds"])
    return min(best, last["fd"] + w * (nxt["fd"] - last["fd"])), last["step"] + w * (nxt["step"] - last["step"])


def successive_halving(study: Study, method: str, settings: list[dict], rungs: list[int], eta: int,
                       clock: str = "seconds") -> dict:
    """Prune ``settings`` by best FD at each rung (keep the best 1/eta); returns the table and the winner.

    Every alive setting trains to the rung's steps. With ``clock="steps"`` each is scored by its best
    FD within those steps. With ``clock="seconds"`` (the default) each is scored by its best FD within
    the training seconds the fastest alive setting needed for those steps (+ ``SECONDS_SLACK``): a key
    option that changes the cost of a step (VSD's ``aux_steps = 2`` doubles its auxiliary work) is then
    judged at equal time, the quantity the time-to-quality table ranks methods by, not at equal steps.
    FD between evaluations is read off a straight line (``fd_within``).
    """
    if clock not in ("steps", "seconds"):
        raise ValueError(f"clock must be 'steps' or 'seconds', got {clock!r}")
    alive, table = list(range(len(settings))), {i: {} for i in range(len(settings))}
    limits: dict[int, float] = {}
    judged_at: dict[int, dict[int, float]] = {i: {} for i in range(len(settings))}  # step reached at the limit
    for rung, steps in enumerate(rungs):
        results = {i: study.run(method, settings[i], 0, steps, stop_at_targets=False, budget=float("inf"))
                   for i in alive}
        if clock == "seconds":
            limits[steps] = min(r["train_s"] for r in results.values()) * (1 + SECONDS_SLACK)
            for i, r in results.items():
                table[i][steps], judged_at[i][steps] = fd_within(r, limits[steps])
        else:
            for i, r in results.items():
                table[i][steps] = r["best_fd"]
        if rung < len(rungs) - 1:
            alive = sorted(alive, key=lambda i: table[i][steps])[:max(1, math.ceil(len(alive) / eta))]
    best = min(alive, key=lambda i: table[i][rungs[len(rungs) - 1]] if rungs[-1] in table[i] else math.inf)
    return {"settings": settings, "rungs": rungs, "fd": {str(i): v for i, v in table.items()}, "best": best,
            "best_setting": settings[best], "clock": clock, "seconds": limits,
            "judged_at": {str(i): v for i, v in judged_at.items()} if clock == "seconds" else {}}


def extend_at_edges(study: Study, method: str, sweep: dict, grids: dict, limit: int = 2) -> dict:
    """Try beyond the grid when the winner's learning rate sits on its edge (the optimum may lie past it).

    For each key of ``grids`` (key -> the values swept): while the current best value is the largest
    (smallest) value tried, run the best setting with it doubled (halved) through all the rungs, seed 0,
    and adopt it when its best FD at the last rung is lower; at most ``limit`` steps per key. A sweep on
    the seconds clock scores the tries within each rung's time limit, like the grid's settings. Updates
    ``sweep`` in place: ``edge`` lists every try, ``best_setting`` / ``best_fd`` the winner after them.
    """
    rungs, last = sweep["rungs"], sweep["rungs"][-1]
    limits = {int(k): v for k, v in sweep.get("seconds", {}).items()}

    def score(res: dict, steps: int) -> float:
        return fd_within(res, limits[steps])[0] if steps in limits else res["best_fd"]

    fd_last = sweep["fd"][str(sweep["best"])]
    best, best_fd = dict(sweep["best_setting"]), fd_last.get(last, fd_last.get(str(last)))
    tried: list[dict] = []
    for key, values in grids.items():
        seen = set(values)
        for _ in range(limit):
            v = best.get(key)
            if v is None or len(seen) < 2 or min(seen) < v < max(seen):
                break
            candidate = {**best, key: v * 2 if v >= max(seen) else v / 2}
            fds = {steps: score(study.run(method, candidate, 0, steps, stop_at_targets=False, budget=float("inf")),
                                steps) for steps in rungs}
            seen.add(candidate[key])
            adopted = fds[last] < best_fd
            tried.append({"setting": candidate, "fd": fds, "adopted": adopted})
            if not adopted:
                break
            best, best_fd = candidate, fds[last]
    sweep.update(edge=tried, best_setting=best, best_fd=best_fd)
    return sweep


def run_quality(args) -> dict:
    import torch

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    factors = [float(f) for f in args.thresholds.split(",") if f]
    key_options = dict(KEY_OPTIONS)
    for item in [s for s in args.sweep_key.split(";") if s]:   # "sid:sid_alpha=1.0,1.2"
        m, rest = item.split(":", 1)
        field, values = rest.split("=", 1)
        key_options[m] = (field, tuple(_number(v) for v in values.split(",")))
    fixed = parse_settings(args.settings)
    if args.sweep:  # with a sweep, --settings holds options fixed under it (sigma_dist=karras), never swept ones
        for m, options in fixed.items():
            swept = {"lr_g", "lr_aux"} | ({key_options[m][0]} if m in key_options else set())
            if swept & set(options):
                raise SystemExit(f"--settings fixes {sorted(swept & set(options))} for {m}, which --sweep chooses")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_quality_"))
    teacher = args.teacher
    if teacher is None:  # dry run: a few-step teacher of the test preset
        from train.teacher import TeacherConfig, train_teacher

        teacher = str(work / "teacher")
        if not (Path(teacher) / "model.json").exists():
            train_teacher(TeacherConfig(out=teacher, preset="test", steps=4, batch=16, eval_samples=0,
                                        sample_steps=2, device=args.device), progress=False)
    t0 = time.perf_counter()
    fd_teacher = teacher_fd(teacher, args.eval_samples, args.teacher_steps, args.device, args.teacher_churn)
    teacher_eval_s = time.perf_counter() - t0
    targets = {f"{f:g}x": f * fd_teacher for f in factors}
    base = dict(teacher=str(Path(teacher).resolve()), batch=args.batch, threads=args.threads, device=args.device,
                eval_every=args.eval_every, evals_per_chunk=args.evals_per_chunk, eval_samples=args.eval_samples,
                max_steps=args.max_steps, targets=targets)
    study = Study(work, base, inprocess=args.dry_run)
    lr_g = [float(v) for v in args.sweep_lr_g.split(",")]
    lr_aux = [float(v) for v in args.sweep_lr_aux.split(",")]
    sweeps, clock = {}, {"sweep_s": 0.0, "long_s": 0.0}
    chunk = args.eval_every * args.evals_per_chunk
    for m in methods:
        t0 = time.perf_counter()
        if args.sweep:
            settings = [{**s, **fixed.get(m, {})} for s in sweep_settings(m, lr_g, lr_aux, key_options)]
            sweeps[m] = successive_halving(study, m, settings, rung_steps(args.sweep_steps, len(settings), args.eta,
                                                                          chunk), args.eta, clock=args.sweep_clock)
            if args.edge_limit:
                extend_at_edges(study, m, sweeps[m], {"lr_g": lr_g, "lr_aux": lr_aux}, args.edge_limit)
            print(f"{m}: best setting {sweeps[m]['best_setting']}", file=sys.stderr)
        clock["sweep_s"] += time.perf_counter() - t0
    runs = {}
    for m in methods:
        setting = sweeps[m]["best_setting"] if m in sweeps else fixed.get(m, {})
        t0 = time.perf_counter()
        runs[m] = [study.run(m, setting, seed, None, stop_at_targets=True, budget=args.budget) for seed in seeds]
        clock["long_s"] += time.perf_counter() - t0
        print(f"{m}: {[r['hits'] for r in runs[m]]}", file=sys.stderr)
    data = teacher_data(teacher)
    return {"runs": runs, "sweeps": sweeps, "targets": targets, "teacher_fd": fd_teacher,
            "meta": {"teacher": args.teacher or "(dry-run teacher)", "teacher_steps": args.teacher_steps,
                     "teacher_churn": args.teacher_churn, "data": data,
                     "settings": ("swept" + (" over fixed options (--settings)" if fixed else "") if args.sweep
                                  else "fixed (--settings)" if fixed else "defaults"),
                     "sweep_clock": args.sweep_clock,
                     "teacher_eval_s": teacher_eval_s, "methods": methods, "seeds": seeds, "batch": args.batch,
                     "eval_every": args.eval_every, "eval_samples": args.eval_samples, "budget": args.budget,
                     "max_steps": args.max_steps, "threads": args.threads, "cpus": os.cpu_count(),
                     "cpu": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                     "load": os.getloadavg()[0], "work_dir": str(work), "sweep_s": clock["sweep_s"],
                     "long_s": clock["long_s"], "eta": args.eta, "sweep_steps": args.sweep_steps,
                     "edge_limit": args.edge_limit,
                     "dry_run": args.dry_run, "note": args.note}}


def _number(v: str) -> int | float | str:
    """An option value from the command line: int, float, else the word itself (``sigma_dist=karras``)."""
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def parse_settings(text: str) -> dict[str, dict]:
    """``'vsd:lr_aux=1e-4,aux_steps=2;sid:sid_alpha=1'`` -> {method: {option: value}} (no sweep).

    For carrying a sweep's winners from one data set to another when a sweep there does not fit the
    budget; the table names each method's setting, so the choice is visible next to its figures.
    """
    out: dict[str, dict] = {}
    for item in [t for t in text.split(";") if t.strip()]:
        method, _, rest = item.partition(":")
        if method.strip() not in METHODS or not rest:
            raise SystemExit(f"--settings: expected METHOD:KEY=VALUE,...; got {item!r}")
        pairs = [kv.split("=", 1) for kv in rest.split(",")]
        if any(len(kv) != 2 for kv in pairs):
            raise SystemExit(f"--settings: expected KEY=VALUE in {item!r}")
        out[method.strip()] = {k.strip(): _number(v.strip()) for k, v in pairs}
    return out


def teacher_data(teacher: str | Path) -> str:
    """The data set the teacher records (``LoadedModel.dataset``); digits when it records none."""
    from probe.core.models import load_model

    return load_model(teacher).dataset or "digits"


def setting_text(setting: dict) -> str:
    """``lr_g=0.0002, sigma_dist=karras``: numbers in %g, words as they are."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in setting.items())


def quality_section(data: str) -> str:
    """RESULTS.md section of one data set's table (digits keeps the original name)."""
    return NAME if data == "digits" else f"{NAME}_{data}"


def _fmt(values: list[float], fmt: str) -> str:
    m, s = mean_std(values)
    return f"{m:{fmt}} +- {s:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


def vsd_ratio(secs: list[float], vsd: list[dict] | None, name: str) -> str:
    """Mean seconds to the threshold over VSD's, or a bound when VSD missed it in some seeds.

    A VSD seed that never reached the threshold needed more than its whole training time, so
    counting that time as if it had reached it gives VSD's mean a lower bound and the ratio an
    upper one: "< 0.43x" means at most 0.43x.
    """
    if not vsd:
        return "-"
    hits = [r["hits"][name] for r in vsd]
    times = [h["seconds"] if h else r["train_s"] for h, r in zip(hits, vsd)]
    ref = statistics.fmean(times)
    if ref <= 0:
        return "- (vsd: at the start)"
    ratio = statistics.fmean(secs) / ref
    if all(hits):
        return f"{ratio:.2f}x"
    return f"< {ratio:.2f}x (vsd {sum(map(bool, hits))}/{len(hits)})"


def render_quality(q: dict) -> str:
    meta, targets = q["meta"], q["targets"]
    names = list(targets)
    data = meta.get("data", "digits")
    lines = [f"<!-- {quality_section(data)}:start -->",
             f"## One-step methods: time to quality{'' if data == 'digits' else f' on {data}'} "
             "(`benchmarks/bench_quality.py`)", "",
             f"Teacher `{meta['teacher']}`, Heun-{meta['teacher_steps']}"
             + (f" with churn {meta['teacher_churn']:g} (EDM's stochastic sampler)"
                if meta.get("teacher_churn") else "")
             + f" FD **{q['teacher_fd']:.2f}** "
             f"(n={meta['eval_samples']}, evaluator seed 0); thresholds "
             + ", ".join(f"{k} = {v:.2f}" for k, v in targets.items())
             + f". Batch {meta['batch']}, FD of the EMA generator every {meta['eval_every']} steps, budget "
             f"{meta['budget']:.0f} training seconds or {meta['max_steps']} steps per run, seeds "
             f"{', '.join(map(str, meta['seeds']))}; method settings {meta.get('settings', 'swept or defaults')} "
             "(column 2). Seconds are the loop's training clock (evaluation, set-up and "
             f"checkpoints excluded); evaluation seconds are listed separately. {meta['cpu']} ({meta['cpus']} CPUs), "
             f"{meta['threads']} thread(s), torch {meta['torch']}, load average {meta['load']:.1f} at the end; "
             f"sweep {meta['sweep_s'] / 60:.1f} min, long runs {meta['long_s'] / 60:.1f} min (wall, this call).", ""]
    head = "| method | setting |"
    for n in names:
        head += f" reached {n} | steps to {n} | s to {n} | vs vsd |"
    lines += [head + " best FD (step) | last FD (step) | eval s (n evals) |",
              "|---|---|" + "---:|" * (4 * len(names) + 3)]
    vsd = q["runs"].get("vsd")
    for m, runs in q["runs"].items():
        row = f"| {m} | {setting_text(runs[0]['setting']) or 'defaults'} |"
        for n in names:
            hits = [r["hits"][n] for r in runs if r["hits"][n]]
            row += f" {len(hits)}/{len(runs)} |"
            if hits:
                secs = [h["seconds"] for h in hits]
                row += f" {_fmt([h['step'] for h in hits], '.0f')} | {_fmt(secs, '.0f')} |"
                if m == "vsd":
                    row += " - |"
                elif len(hits) < len(runs):  # its own mean covers only the seeds that got there: no ratio
                    row += f" - ({len(hits)}/{len(runs)} seeds) |"
                else:
                    row += f" {vsd_ratio(secs, vsd, n)} |"
            else:
                row += f" > {max(r['last_step'] for r in runs)} | > {max(r['train_s'] for r in runs):.0f} | - |"
        row += (f" {_fmt([r['best_fd'] for r in runs], '.2f')} ({'/'.join(str(r['best_step']) for r in runs)}) |"
                f" {_fmt([r['last_fd'] for r in runs], '.2f')} ({'/'.join(str(r['last_step']) for r in runs)}) |"
                f" {sum(r['eval_s'] for r in runs):.0f} ({sum(r['n_evals'] for r in runs)}) |")
        lines.append(row)
    if q["sweeps"]:
        seconds_clock = meta.get("sweep_clock", "steps") == "seconds"
        lines += ["", f"Sweep (seed 0, successive halving: keep the best 1/{meta['eta']} by best FD, x{meta['eta']} "
                  "steps per rung; cells = best FD "
                  + ("within the rung's training seconds: those the fastest setting needed for the rung's steps, "
                     f"+{SECONDS_SLACK:.0%}, so settings that cost more per step are judged at equal time "
                     "(in brackets: the step reached at that time; FD between evaluations read off a straight line)"
                     if seconds_clock else "up to that many steps") + ", '-' = pruned):", ""]
        for m, sw in q["sweeps"].items():
            limits = {int(k): v for k, v in sw.get("seconds", {}).items()}
            heads = [f"{s} steps" + (f", {limits[s]:.0f} s" if s in limits else "") for s in sw["rungs"]]
            lines += [f"{m}:", "", "| setting | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(sw["rungs"])]
            for i, setting in enumerate(sw["settings"]):
                fd = {int(k): v for k, v in sw["fd"][str(i)].items()}
                at = {int(k): v for k, v in sw.get("judged_at", {}).get(str(i), {}).items()}
                cells = " | ".join("-" if s not in fd else f"{fd[s]:.2f}" + (f" (step {at[s]:.0f})" if s in at else "")
                                   for s in sw["rungs"])
                adopted = any(t["adopted"] for t in sw.get("edge", []))
                mark = " **(chosen)**" if i == sw["best"] and not adopted else ""
                lines.append(f"| {setting_text(setting)}{mark} | {cells} |")
            for t in sw.get("edge", []):  # tries beyond the grid's edge (extend_at_edges)
                cells = " | ".join(f"{t['fd'].get(s, t['fd'].get(str(s))):.2f}" for s in sw["rungs"])
                chosen = t["adopted"] and t["setting"] == sw["best_setting"]
                mark = " (beyond the edge" + ("; **chosen**)" if chosen else ", adopted)" if t["adopted"] else ")")
                lines.append(f"| {setting_text(t['setting'])}{mark} | {cells} |")
            lines.append("")
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append(f"<!-- {quality_section(data)}:end -->")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="trained teacher run directory (required unless --dry-run)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--thresholds", default="1.5,1.1", help="multiples of the teacher's FD")
    ap.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the teacher's FD")
    ap.add_argument("--teacher-churn", type=float, default=0.0,
                    help="EDM's S_churn for the teacher's FD (e.g. 100 with --teacher-steps 100); 0 = deterministic")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--evals-per-chunk", type=int, default=2, help="evaluations per checkpoint chunk")
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--budget", type=float, default=900.0, help="training seconds per long run")
    ap.add_argument("--max-steps", type=int, default=20_000)
    ap.add_argument("--sweep", action="store_true", help="successive-halving sweep per method first")
    ap.add_argument("--sweep-lr-g", default="5e-5,1e-4,2e-4")
    ap.add_argument("--sweep-lr-aux", default="5e-5,1e-4,2e-4")
    ap.add_argument("--settings", default="", help="fixed settings instead of a sweep: "
                    "'vsd:lr_aux=1e-4,aux_steps=2;sid:sid_alpha=1' (other methods: defaults); with --sweep, "
                    "options every swept setting keeps ('vsd:sigma_dist=karras')")
    ap.add_argument("--sweep-clock", choices=("seconds", "steps"), default="seconds",
                    help="rank a rung's settings by best FD within equal training seconds (the fastest "
                    "setting's + 10%%) or within equal steps")
    ap.add_argument("--sweep-key", default="", help="override key options: 'sid:sid_alpha=1.0,1.2;vsd:aux_steps=1,2'")
    ap.add_argument("--sweep-steps", type=int, default=200, help="steps of the first rung")
    ap.add_argument("--eta", type=int, default=3, help="successive halving: keep 1/eta, eta x steps per rung")
    ap.add_argument("--edge-limit", type=int, default=2, help="times a winning learning rate on the grid's edge "
                    "is doubled / halved beyond it (0 = never)")
    ap.add_argument("--work-dir", help="where runs and cached results live (resumable); default a temp dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--from-json", default="", help="render (and --write) a study saved with --json instead")
    ap.add_argument("--dry-run", action="store_true", help="tiny budget smoke test; prints, writes nothing")
    ap.add_argument("--note", default="")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.eval_every, args.evals_per_chunk, args.eval_samples = 4, 1, 1, 16
        args.max_steps, args.sweep_steps, args.budget, args.teacher_steps = 3, 1, 60.0, 2
    elif not args.teacher and not args.from_json:
        ap.error("needs --teacher RUN_DIR (or --dry-run, or --from-json)")
    raw = json.loads(Path(args.from_json).read_text()) if args.from_json else run_quality(args)
    if args.from_json and args.note:
        raw["meta"]["note"] = args.note
    text = render_quality(raw)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    if args.write:
        from results_md import write_section  # benchmarks/ is on sys.path

        write_section(quality_section(raw["meta"].get("data", "digits")), text)


def _worker_main() -> None:
    kind, payload = sys.argv[2], json.loads(sys.argv[3])
    if payload.get("src"):
        sys.path.insert(0, payload["src"])  # import the toolkit from that tree
    fn = {"quality": worker_quality}[kind]
    print("RESULT " + json.dumps(fn(payload)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main()
    else:
        main()
