"""One-step methods side by side: whole-process memory, step time, FLOPs and utilisation.

    python benchmarks/bench_methods.py speed                                  # tiny UNet, six methods
    python benchmarks/bench_methods.py speed --sizes tiny,small --rounds 5 --write
    python benchmarks/bench_methods.py speed --compare-src /tmp/before        # before/after, one run
    python benchmarks/bench_methods.py memory --compare-src /tmp/before --write  # peak memory by size

Time to a quality threshold per method is ``bench_quality.py``, which uses this file's workers.

``speed`` (no trained teacher needed: weights do not change speed or memory)
  - every (size, method) runs ``train_student`` in a **fresh subprocess** with the same data, batch
    and seed, evaluation off; the teacher of a size is an untrained UNet of that preset on the same
    data (``--teacher``: that run instead, for its own size).
  - **peak memory**: ``ru_maxrss`` of that child (``os.wait4``): the whole process as a user meets it
    (interpreter, imports, data, set-up, training). Its RSS after imports and data loading is
    recorded as well ("after imports"): the part no method can change.
  - **step time**: the loop's own per-step clock (``metrics.jsonl`` with ``log_every`` 1), the median
    of ``--timed-steps`` steps after ``--warmup`` in each process. Methods are **interleaved**: round r
    runs every method once, in an order rotated by r. Reported: median over rounds, min-max over
    rounds and the spread (max - min) / median, flagged when above 20%; torch threads and the load
    average before every run are recorded.
  - **FLOPs** of one training step: ``torch.utils.flop_counter.FlopCounterMode`` around a 1-step and a
    3-step run, (F3 - F1) / 2 (set-up and the final checkpoint cancel). It counts matmuls,
    convolutions and attention (forward and backward), not elementwise work.
  - **matmul peak**: ``torch.matmul`` of float32 n x n matrices (n = 512, 1024, 2048; best of 5 each;
    best n) with the same thread count, in a fresh process once per round. Utilisation = FLOPs per
    step / median step time / median per-round matmul peak.
  - ``--compare-src DIR`` runs every method also from another source tree (e.g. ``git archive
    COMMIT | tar -x -C DIR``) in the same rounds, so a before/after comparison shares the load.

``memory`` (no trained teacher needed)
  - whole-process peak RSS of a short run per (preset, batch, method), from ``tiny`` at batch 64 to
    ``cifar`` (35.7M parameters) at batch 4, where parameters and optimiser state outweigh the
    activations; next to it, the float32 training state each method must hold
    (``training_state_mib``), which is where the score-free methods save.

"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAME = "bench_methods"
METHODS = ("diffratio-js", "diffratio-kl", "diffratio-fkl", "gan", "vsd", "sid")
SPREAD_FLAG = 0.20          # a figure whose (max - min) / median over rounds exceeds this is flagged
MATMUL_SIZES = (512, 1024, 2048)


# ------------------------------------------------------------------------------ helpers
def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values: list[float]) -> float:
    """(max - min) / median: the relative range of repeated measurements."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def make_untrained_teacher(preset: str, out: Path, dataset: str = "digits", resolution: int = 8,
                           channels: int = 1) -> Path:
    """A teacher run directory holding an untrained UNet of ``preset`` (speed and memory only)."""
    import torch

    from probe.core.edm import EDMDenoiser
    from probe.core.models import build_unet, save_model

    if not (out / "model.json").exists():
        torch.manual_seed(0)
        save_model(out, EDMDenoiser(build_unet(resolution, channels, preset)), "teacher", dataset)
    return out


def run_worker(kind: str, args: dict, src: str | None = None, worker_script: str | None = None,
               timeout: float | None = None) -> dict:
    """Run a worker in a fresh interpreter; returns its RESULT plus the child's whole-process peak RSS.

    ``os.wait4`` gives the rusage of exactly this child (``RUSAGE_CHILDREN`` would be the maximum over
    every child so far). ``src``: import the toolkit from that source tree instead of this one.
    ``worker_script``: another script with the same ``--worker KIND JSON`` convention (gpu_bench.py).
    ``timeout``: seconds, after which the child is killed and ``TimeoutError`` raised.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(args.get("threads", 1)), "PYTHONWARNINGS": "ignore"}
    script = str(Path(worker_script or __file__).resolve())
    cmd = [sys.executable, script, "--worker", kind, json.dumps({**args, "src": src})]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, text=True)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise TimeoutError(f"{kind} worker ({args.get('method', '')}) killed after {timeout:.0f} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "peak_rss_mib": usage.ru_maxrss / 1024}
    raise RuntimeError(f"{kind} worker ({args.get('method', '')}) failed with exit {proc.returncode}:\n"
                       f"{stderr[-3000:]}")


# ---------------------------------------------------------------------- speed workers
def _student_config(a: dict, steps: int, out: str, **kw):
    from train.student.loop import StudentConfig

    return StudentConfig(out=out, teacher=a["teacher"], method=a["method"], batch=a["batch"], steps=steps,
                         log_every=1, checkpoint_every=10 ** 9, eval_every=0, device=a.get("device", "cpu"),
                         seed=a.get("seed", 0), **kw)


def worker_speed(a: dict) -> dict:
    """Per-step times of one method (its own process; the parent measures its peak memory)."""
    import torch

    torch.set_num_threads(a["threads"])
    from diffusers import UNet2DModel  # noqa: F401  (imported lazily by the first model: part of "after imports")

    from probe.core.data import load_dataset
    from probe.core.runs import read_metrics
    from train.student.loop import train_student

    load_dataset(a["dataset"], "train")  # what every run loads first: part of "after imports"
    after_imports = _status_mib("VmRSS")
    steps = a["warmup"] + a["timed_steps"]
    with cpu_clock() as calls:
        run = train_student(_student_config(a, steps, a["out"]), progress=False)
    seconds = [r["seconds"] for r in sorted(read_metrics(run), key=lambda r: r["step"])]
    per_step = [b - c for b, c in zip(seconds, [0.0] + seconds[:-1])]
    model = json.loads((Path(run) / "model.json").read_text())
    return {"step_s": per_step[a["warmup"]:], "step_cpu_s": step_cpu_seconds(calls, per_step)[a["warmup"]:],
            "after_imports_mib": after_imports, "hwm_mib": _status_mib("VmHWM"),
            "threads": torch.get_num_threads(), "aux_parameters": model["method"]["aux_parameters"],
            "uses_teacher": model["method"]["uses_teacher"],
            "generator_parameters": model["generator_parameters"]}


@contextlib.contextmanager
def cpu_clock():
    """Record (wall, process CPU) at every ``time.perf_counter()`` call while the block runs.

    The loop times a step as the difference of two perf_counter calls; pairing them with the CPU
    clock gives each step's CPU seconds, which on a shared, oversubscribed machine vary much less
    than wall seconds (time spent waiting for a core is not counted).
    """
    calls, wall = [], time.perf_counter

    def recording() -> float:
        t = wall()
        calls.append((t, time.process_time()))
        return t

    time.perf_counter = recording
    try:
        yield calls
    finally:
        time.perf_counter = wall


def step_cpu_seconds(calls: list[tuple[float, float]], wall_steps: list[float]) -> list[float | None]:
    """CPU seconds of each step: the consecutive perf_counter pair whose wall difference is that step's."""
    out, j = [], 0
    for d in wall_steps:
        while j + 1 < len(calls) and abs((calls[j + 1][0] - calls[j][0]) - d) > 1e-6 * max(d, 1e-3):
            j += 1
        if j + 1 >= len(calls):
            out.append(None)
            continue
        out.append(calls[j + 1][1] - calls[j][1])
        j += 2
    return out


def worker_flops(a: dict) -> dict:
    """FLOPs of one training step: (FLOPs of a 3-step run - FLOPs of a 1-step run) / 2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(a["threads"])
    from train.student.loop import train_student

    totals = {}
    for steps in (1, 3):
        with FlopCounterMode(display=False) as counter:
            train_student(_student_config(a, steps, f"{a['out']}-{steps}"), progress=False)
        totals[steps] = counter.get_total_flops()
    return {"flops_per_step": (totals[3] - totals[1]) / 2, "flops_1_step_run": totals[1]}


def worker_matmul(a: dict) -> dict:
    """Dense float32 matmul GFLOP/s with the given thread count (best of ``repeats`` per size)."""
    import torch

    torch.set_num_threads(a["threads"])
    by_size, by_size_cpu = {}, {}
    for n in a.get("sizes", MATMUL_SIZES):
        x, y = torch.randn(n, n), torch.randn(n, n)
        z = torch.matmul(x, y)  # warm-up (and the output buffer)
        reps = max(1, int(a.get("flop_per_timing", 2e9) / (2 * n ** 3)))
        best = best_cpu = float("inf")
        for _ in range(a.get("repeats", 5)):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                torch.matmul(x, y, out=z)
            best = min(best, (time.perf_counter() - t0) / reps)
            best_cpu = min(best_cpu, max(time.process_time() - c0, 1e-9) / reps)
        by_size[str(n)] = 2 * n ** 3 / best / 1e9
        by_size_cpu[str(n)] = 2 * n ** 3 / best_cpu / 1e9
    return {"gflops_by_size": by_size, "peak_gflops": max(by_size.values()), "gflops_cpu_by_size": by_size_cpu,
            "peak_gflops_cpu": max(by_size_cpu.values()), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------- speed
def compare_variants(args) -> list[tuple[str, str | None]]:
    """(label, source tree) of every code version a run measures: this tree, and --compare-src if given."""
    variants: list[tuple[str, str | None]] = [("", None)]
    if args.compare_src:
        variants.append((args.compare_label, str(Path(args.compare_src).resolve())))
    return variants


def run_speed(args) -> dict:
    """All speed measurements; returns the raw results (JSON-able)."""
    methods = [m for m in args.methods.split(",") if m]
    sizes = [s for s in args.sizes.split(",") if s]
    variants = compare_variants(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    from probe.core.data import load_dataset

    data, teachers = load_dataset(args.data, "train"), {}
    for size in sizes:
        if args.teacher and size == args.teacher_size:
            teachers[size] = str(Path(args.teacher).resolve())
        else:
            teachers[size] = str(make_untrained_teacher(size, tmp / f"teacher-{size}", args.data, data.resolution,
                                                        data.channels))
    common = dict(batch=args.batch, threads=args.threads, seed=args.seed, dataset=args.data)
    compare_methods = [m for m in (args.compare_methods or args.methods).split(",") if m]
    runs = {size: {f"{m}{'@' + lab if lab else ''}": [] for m in methods for lab, _ in variants
                   if not lab or m in compare_methods} for size in sizes}
    matmul, loads, flops = [], [], {size: {} for size in sizes}
    t_start = time.time()
    for r in range(args.rounds):
        matmul.append(run_worker("matmul", {"threads": args.threads, "sizes": list(args.matmul_sizes)}))
        print(f"round {r + 1}: matmul peak {matmul[-1]['peak_gflops']:.1f} GFLOP/s", file=sys.stderr)
        for size in sizes:
            jobs = [(m, lab, src) for m in methods for lab, src in variants if not lab or m in compare_methods]
            jobs = jobs[r % len(jobs):] + jobs[:r % len(jobs)]  # rotate: no method always runs first
            for m, lab, src in jobs:
                key = f"{m}{'@' + lab if lab else ''}"
                load = os.getloadavg()[0]
                loads.append(load)
                res = run_worker("speed", {**common, "teacher": teachers[size], "method": m, "warmup": args.warmup,
                                           "timed_steps": args.timed_steps,
                                           "out": str(tmp / f"s-{size}-{key}-{r}")}, src)
                res["load_before"], res["matmul_gflops_round"] = load, matmul[-1]["peak_gflops"]
                runs[size][key].append(res)
                print(f"round {r + 1} {size} {key}: {1000 * statistics.median(res['step_s']):.0f} ms/step, "
                      f"peak {res['peak_rss_mib']:.0f} MiB (load {load:.1f})", file=sys.stderr)
    if not args.no_flops:
        for size in sizes:
            for m in methods:  # the current code only: a before/after pair differs in time, not in FLOPs
                flops[size][m] = run_worker("flops", {**common, "teacher": teachers[size], "method": m,
                                                      "out": str(tmp / f"f-{size}-{m}")})
                print(f"{size} {m}: {flops[size][m]['flops_per_step'] / 1e9:.2f} GFLOP/step", file=sys.stderr)
    import shutil

    import torch

    shutil.rmtree(tmp, ignore_errors=True)
    return {"runs": runs, "flops": flops, "matmul": matmul, "loads": loads,
            "meta": {"methods": methods, "sizes": sizes, "variants": [lab for lab, _ in variants],
                     "compare_src": args.compare_src, "batch": args.batch, "threads": args.threads,
                     "rounds": args.rounds, "matmul_sizes": list(args.matmul_sizes), "warmup": args.warmup,
                     "timed_steps": args.timed_steps,
                     "data": args.data, "teacher": args.teacher, "teacher_size": args.teacher_size,
                     "cpus": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - t_start) / 60,
                     "note": args.note}}


def merge_speed(raws: list[dict]) -> dict:
    """Several saved speed runs (e.g. one per size) as one: sizes side by side, matmul and loads pooled."""
    out = {"runs": {}, "flops": {}, "matmul": [], "loads": [], "meta": dict(raws[0]["meta"])}
    for raw in raws:
        out["runs"].update(raw["runs"])
        out["flops"].update(raw["flops"])
        out["matmul"] += raw["matmul"]
        out["loads"] += raw["loads"]
    out["meta"]["minutes"] = sum(r["meta"]["minutes"] for r in raws)
    out["meta"]["rounds"] = "/".join(str(r["meta"]["rounds"]) for r in raws)
    out["meta"]["timed_steps"] = "/".join(str(r["meta"]["timed_steps"]) for r in raws)
    out["meta"]["warmup"] = "/".join(str(r["meta"]["warmup"]) for r in raws)
    out["meta"]["compare_src"] = next((r["meta"]["compare_src"] for r in raws if r["meta"]["compare_src"]), None)
    return out


def summarise_speed(raw: dict) -> dict:
    """Per size and method: medians, spreads, flags, ratios to vsd, FLOP/s and utilisation."""
    peaks = [m["peak_gflops"] for m in raw["matmul"]]
    peak = statistics.median(peaks)
    cpu_peaks = [m["peak_gflops_cpu"] for m in raw["matmul"] if "peak_gflops_cpu" in m]
    cpu_peak = statistics.median(cpu_peaks) if cpu_peaks else None
    out = {"matmul_gflops": peak, "matmul_range": (min(peaks), max(peaks)), "sizes": {},
           "matmul_gflops_cpu": cpu_peak, "matmul_cpu_range": (min(cpu_peaks), max(cpu_peaks)) if cpu_peaks else None}
    for size, by_method in raw["runs"].items():
        rows = {}
        for key, runs in by_method.items():
            if not runs:
                continue
            med_per_round = [statistics.median(r["step_s"]) for r in runs]
            cpu_per_round = [statistics.median(c for c in r["step_cpu_s"] if c is not None) for r in runs
                             if any(c is not None for c in r.get("step_cpu_s", []))]
            mem = [r["peak_rss_mib"] for r in runs]
            row = {"step_s": statistics.median(med_per_round), "step_min": min(med_per_round),
                   "step_max": max(med_per_round), "step_spread": spread(med_per_round),
                   "peak_mib": statistics.median(mem), "peak_spread": spread(mem),
                   "after_imports_mib": statistics.median(r["after_imports_mib"] for r in runs),
                   "aux_parameters": runs[0]["aux_parameters"], "threads": runs[0]["threads"],
                   "rounds": len(runs)}
            if cpu_per_round:
                row.update(cpu_s=statistics.median(cpu_per_round), cpu_spread=spread(cpu_per_round))
            row["flag"] = row["step_spread"] > SPREAD_FLAG or row["peak_spread"] > SPREAD_FLAG
            row["cpu_flag"] = row.get("cpu_spread", 0.0) > SPREAD_FLAG
            f = raw["flops"].get(size, {}).get(key)
            if f:
                row["gflop_per_step"] = f["flops_per_step"] / 1e9
                row["gflops"] = row["gflop_per_step"] / row["step_s"]
                # against the matmul peak of the same round (same load), median over rounds
                util = [row["gflop_per_step"] / t / r.get("matmul_gflops_round", peak)
                        for t, r in zip(med_per_round, runs)]
                row["utilisation"], row["util_range"] = statistics.median(util), (min(util), max(util))
                if cpu_peak and "cpu_s" in row:  # both rates in CPU seconds: waiting for a core counts in neither
                    row["gflops_cpu"] = row["gflop_per_step"] / row["cpu_s"]
                    row["utilisation_cpu"] = row["gflops_cpu"] / cpu_peak
            rows[key] = row
        for key, row in rows.items():
            if "@" in key and key.split("@")[0] in by_method:  # paired with the same round of the base code
                base = [statistics.median(r["step_s"]) for r in by_method[key.split("@")[0]]]
                mine = [statistics.median(r["step_s"]) for r in by_method[key]]
                ratios = [b / a for a, b in zip(base, mine)]
                row["paired_base_over_variant"] = [1 / x for x in ratios]
                row["paired_variant_over_base"] = statistics.median(ratios)
                row["paired_range"] = (min(ratios), max(ratios))
                if all(r.get("step_cpu_s") for r in by_method[key] + by_method[key.split("@")[0]]):
                    cb = [statistics.median(c for c in r["step_cpu_s"] if c) for r in by_method[key.split("@")[0]]]
                    cm = [statistics.median(c for c in r["step_cpu_s"] if c) for r in by_method[key]]
                    cr = [b / a for a, b in zip(cb, cm)]
                    row["paired_cpu_variant_over_base"] = statistics.median(cr)
                    row["paired_cpu_range"] = (min(cr), max(cr))
            ref = rows.get("vsd" + key[key.index("@"):] if "@" in key else "vsd")
            if ref:
                row["step_vs_vsd"] = row["step_s"] / ref["step_s"]
                if "cpu_s" in row and "cpu_s" in ref:
                    row["cpu_vs_vsd"] = row["cpu_s"] / ref["cpu_s"]
                row["peak_vs_vsd"] = row["peak_mib"] / ref["peak_mib"]
                row["over_imports_vs_vsd"] = ((row["peak_mib"] - row["after_imports_mib"])
                                              / max(ref["peak_mib"] - ref["after_imports_mib"], 1e-9))
        out["sizes"][size] = rows
    return out


def render_speed(raw: dict, summary: dict | None = None) -> str:
    s = summary or summarise_speed(raw)
    meta, loads = raw["meta"], raw["loads"]
    lo, hi = s["matmul_range"]
    lines = [f"<!-- {NAME}:start -->",
             "## One-step methods: memory, step time, FLOPs (`benchmarks/bench_methods.py speed`)",
             "",
             f"Measured {meta['date']} by `benchmarks/bench_methods.py speed` in {meta['minutes']:.0f} min on "
             f"{meta['cpu']} ({meta['cpus']} CPUs), torch {meta['torch']}, **{meta['threads']} torch thread(s)**, "
             f"float32. **Machine load** (1-min load average before each run): median {statistics.median(loads):.1f}, "
             f"range {min(loads):.1f}-{max(loads):.1f} on {meta['cpus']} CPUs"
             + (": other jobs shared the machine at times, so wall times are slower than on a quiet one and the CPU "
                "columns are the steadier figures; ratios come from interleaved runs under the same load."
                if max(loads) > 0.75 * meta["cpus"] else " (a quiet machine).") + "", "",
             f"Set-up: data `{meta['data']}`, batch {meta['batch']}, generator = copy of the teacher, default options "
             "of every method (ratio network: teacher encoder + pooled head), evaluation off. Teacher per size: "
             "an untrained UNet of that preset"
             + (f" (`{meta['teacher_size']}`: `{meta['teacher']}`)" if meta["teacher"] else "")
             + " (weights change neither speed nor memory). "
             f"Every (size, method) in a fresh subprocess, {meta['rounds']} rounds, methods rotated each round; "
             f"{meta['timed_steps']} timed steps after {meta['warmup']} warm-up steps per process.", "",
             "Columns: **peak MiB** = whole-process peak RSS (`ru_maxrss` of the child via `os.wait4`), median over "
             "rounds; **after imports** = the same process's RSS after imports and data loading, before any model "
             "(no method can change it); **step ms** = wall time, median over rounds of each process's median step "
             "(auxiliary + generator update + EMA), **range** = min-max of the per-round medians, "
             f"**spread** = (max - min) / median, **!** when the time or memory spread exceeds {SPREAD_FLAG:.0%}; "
             "**CPU ms** = the same steps in process CPU time (waiting for a core not counted: the steadier "
             "figure on a shared machine), its spread and ratio; "
             "**GFLOP/step** from `FlopCounterMode` (matmul, convolution, attention; forward and backward); "
             "**GFLOP/s** = GFLOP/step / step time; **util. (wall)** = achieved GFLOP/s / the matmul peak measured "
             "in the same round, median and range over rounds (load changes within a round make it unreliable); "
             "**GFLOP/CPU-s** and **util. (CPU)** = the same in CPU seconds, against the matmul peak in CPU seconds: "
             "the utilisation figure that load does not distort.", "",
             f"Dense float32 matmul peak (`torch.matmul`, n in {{{', '.join(str(n) for n in meta['matmul_sizes'])}}}, "
             f"{meta['threads']} thread(s), once per round): **{s['matmul_gflops']:.1f} GFLOP/s** median "
             f"(range {lo:.1f}-{hi:.1f}) in wall time"
             + (f", **{s['matmul_gflops_cpu']:.1f} GFLOP/CPU-s** (range {s['matmul_cpu_range'][0]:.1f}-"
                f"{s['matmul_cpu_range'][1]:.1f}) in CPU time." if s.get("matmul_gflops_cpu") else ".")]
    for size, rows in s["sizes"].items():
        lines += ["", f"### UNet `{size}`", "",
                  "| method | aux params | peak MiB | vs vsd | after imports MiB | over imports vs vsd | step ms "
                  "| range ms | spread | vs vsd | CPU ms | CPU spread | CPU vs vsd | GFLOP/step | GFLOP/s "
                  "| util. (wall) | GFLOP/CPU-s | util. (CPU) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in rows.items():
            def f(name, fmt, default="-", r=r):
                return format(r[name], fmt) if name in r else default
            lines.append(
                f"| {key}{' !' if r['flag'] else ''} | {r['aux_parameters']:,} | {r['peak_mib']:.0f} | "
                f"{f('peak_vs_vsd', '.2f')}x | {r['after_imports_mib']:.0f} | {f('over_imports_vs_vsd', '.2f')}x | "
                f"{1000 * r['step_s']:.0f} | {1000 * r['step_min']:.0f}-{1000 * r['step_max']:.0f} | "
                f"{r['step_spread']:.0%} | {f('step_vs_vsd', '.2f')}x | "
                f"{format(1000 * r['cpu_s'], '.0f') if 'cpu_s' in r else '-'} | {f('cpu_spread', '.0%')}"
                f"{' !' if r.get('cpu_flag') else ''} | {f('cpu_vs_vsd', '.2f')}x | {f('gflop_per_step', '.2f')} | "
                f"{f('gflops', '.1f')} | {f('utilisation', '.0%')}"
                + (f" ({r['util_range'][0]:.0%}-{r['util_range'][1]:.0%})" if "util_range" in r else "")
                + f" | {f('gflops_cpu', '.1f')} | {f('utilisation_cpu', '.0%')} |")
        paired = {k: r for k, r in rows.items() if "paired_variant_over_base" in r}
        if paired:
            lab = next(iter(paired)).split("@")[1]
            lines += ["", f"Before/after on `{size}`: `@{lab}` rows ran the code of {meta['compare_src']}, "
                      "interleaved with the current code in the same rounds; paired ratio = median over rounds of "
                      f"(current / {lab}) step time of the same round (range over rounds).", "",
                      f"| method | {lab} ms | current ms | paired current / {lab} (wall) | range | "
                      f"{lab} CPU ms | current CPU ms | paired current / {lab} (CPU) | range |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for key, r in paired.items():
                cur = rows[key.split("@")[0]]
                lo, hi = (1 / x for x in r["paired_range"])
                line = (f"| {key.split('@')[0]} | {1000 * r['step_s']:.0f} | {1000 * cur['step_s']:.0f} | "
                        f"{1 / r['paired_variant_over_base']:.3f} | {min(lo, hi):.2f}-{max(lo, hi):.2f} |")
                if "paired_cpu_variant_over_base" in r:
                    clo, chi = (1 / x for x in r["paired_cpu_range"])
                    line += (f" {1000 * r['cpu_s']:.0f} | {1000 * cur['cpu_s']:.0f} | "
                             f"{1 / r['paired_cpu_variant_over_base']:.3f} | {min(clo, chi):.2f}-{max(clo, chi):.2f} |")
                else:
                    line += " - | - | - | - |"
                lines.append(line)
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append(f"<!-- {NAME}:end -->")
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory
MEMORY_NAME = "bench_methods_memory"
FLOAT32 = 4  # bytes


def training_state_mib(generator: int, aux: int, keeps_teacher: bool) -> float:
    """What training must hold, in float32: the generator's weights, gradient, two Adam moments and
    EMA (5 copies), the auxiliary network's weights, gradient and moments (4), and the teacher's
    weights when the method evaluates it. Activations, the allocator and the interpreter come on top."""
    return FLOAT32 * (5 * generator + 4 * aux + (generator if keeps_teacher else 0)) / 2 ** 20


def run_memory(args) -> dict:
    """Whole-process peak RSS per (size, batch, method), one fresh process each (``worker_speed``)."""
    from probe.core.data import load_dataset

    methods = [m for m in args.methods.split(",") if m]
    specs = [(s.split(":")[0], int(s.split(":")[1])) for s in args.sizes.split(",") if s]
    variants = compare_variants(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    data, rows, t_start = load_dataset(args.data, "train"), [], time.time()
    for size, batch in specs:
        teacher = str(make_untrained_teacher(size, tmp / f"teacher-{size}", args.data, data.resolution,
                                             data.channels))
        for m in methods:
            for lab, src in variants:
                res = run_worker("speed", {"batch": batch, "threads": args.threads, "seed": 0, "dataset": args.data,
                                           "teacher": teacher, "method": m, "warmup": 1,
                                           "timed_steps": args.steps - 1, "out": str(tmp / f"{size}-{m}-{lab}")}, src)
                rows.append({"size": size, "batch": batch, "method": m, "variant": lab,
                             **{k: res[k] for k in ("peak_rss_mib", "after_imports_mib", "aux_parameters",
                                                    "generator_parameters", "uses_teacher")}})
                print(f"{size} b{batch} {m}{'@' + lab if lab else ''}: peak {res['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
    import shutil

    import torch

    shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "meta": {"methods": methods, "sizes": args.sizes, "data": args.data, "steps": args.steps,
                                   "threads": args.threads, "compare_src": args.compare_src,
                                   "compare_label": args.compare_label, "cpu": cpu_name(), "cpus": os.cpu_count(),
                                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                   "minutes": (time.time() - t_start) / 60, "note": args.note}}


def render_memory(raw: dict) -> str:
    meta = raw["meta"]
    label = meta["compare_label"] if meta["compare_src"] else None
    lines = [f"<!-- {MEMORY_NAME}:start -->",
             "## One-step methods: peak memory by model size (`benchmarks/bench_methods.py memory`)", "",
             f"Measured {meta['date']} in {meta['minutes']:.0f} min on {meta['cpu']} ({meta['cpus']} CPUs), torch "
             f"{meta['torch']}, {meta['threads']} thread(s), float32, data `{meta['data']}`. Every (size, method) is "
             f"a fresh process running {meta['steps']} training steps of `train_student` with evaluation off and its "
             "final checkpoint (an untrained teacher of that preset: weights do not change memory). **peak** = "
             "whole-process peak RSS (`ru_maxrss`); **over imports** = peak minus the process's RSS after imports "
             "and data loading; **state** = what training must hold in float32 (generator x5: weights, gradient, "
             "two Adam moments, EMA; auxiliary network x4; the teacher x1 when the method evaluates it: VSD, SiD), "
             "the part a method can change." + (f" `@{label}`: the same from `{meta['compare_src']}`." if label
                                                else ""), ""]
    for size in dict.fromkeys(r["size"] for r in raw["rows"]):
        rows = [r for r in raw["rows"] if r["size"] == size]
        ref = {r["variant"]: r for r in rows if r["method"] == "vsd"}
        g = rows[0]["generator_parameters"]
        lines += [f"### `{size}`: generator {g:,} parameters, batch {rows[0]['batch']}", "",
                  "| method | aux params | teacher kept | state MiB | peak MiB | vs vsd | after imports MiB "
                  "| over imports MiB | vs vsd |" + (f" peak @{label} | this / @{label} |" if label else ""),
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if label else "")]
        for r in rows:
            if r["variant"]:
                continue
            v = ref.get("")
            over = r["peak_rss_mib"] - r["after_imports_mib"]
            cells = [r["method"], f"{r['aux_parameters']:,}", "yes" if r["uses_teacher"] else "no",
                     f"{training_state_mib(g, r['aux_parameters'], r['uses_teacher']):.0f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / v['peak_rss_mib']:.2f}x" if v else "-",
                     f"{r['after_imports_mib']:.0f}", f"{over:.0f}",
                     f"{over / (v['peak_rss_mib'] - v['after_imports_mib']):.2f}x" if v else "-"]
            if label:
                b = next((x for x in rows if x["method"] == r["method"] and x["variant"] == label), None)
                cells += [f"{b['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"] if b \
                    else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if meta["note"]:
        lines += [meta["note"], ""]
    lines.append(f"<!-- {MEMORY_NAME}:end -->")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
def write_section(name: str, text: str) -> None:
    from results_md import write_section as write  # benchmarks/ is on sys.path when a script runs

    write(name, text)


def _worker_main() -> None:
    kind, payload = sys.argv[2], json.loads(sys.argv[3])
    if payload.get("src"):
        sys.path.insert(0, payload["src"])  # import the toolkit from that tree (before/after comparisons)
    fn = {"speed": worker_speed, "flops": worker_flops, "matmul": worker_matmul}[kind]
    print("RESULT " + json.dumps(fn(payload)), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed", help="whole-process peak memory, interleaved step time, FLOPs, utilisation")
    sp.add_argument("--methods", default=",".join(METHODS))
    sp.add_argument("--sizes", default="tiny", help="UNet presets, comma-separated (e.g. tiny,small)")
    sp.add_argument("--teacher", help="use this teacher run for --teacher-size instead of an untrained one")
    sp.add_argument("--teacher-size", default="tiny")
    sp.add_argument("--data", default="scenes", help="data set of the untrained teachers (scenes: 16x16 RGB)")
    sp.add_argument("--batch", type=int, default=64)
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--timed-steps", type=int, default=8)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-flops", action="store_true")
    sp.add_argument("--matmul-sizes", type=lambda s: [int(v) for v in s.split(",")], default=list(MATMUL_SIZES))
    sp.add_argument("--compare-methods", default="", help="methods run from --compare-src too (default: all)")
    sp.add_argument("--from-json", default="", help="render (and --write) these saved runs, comma-separated, "
                    "merged (e.g. one per size); measures nothing")
    sm = sub.add_parser("memory", help="whole-process peak memory per method at several model sizes")
    sm.add_argument("--methods", default=",".join(METHODS))
    sm.add_argument("--sizes", default="tiny:64,small:64,cifar:4", help="UNet preset:batch, comma-separated")
    sm.add_argument("--data", default="scenes")
    sm.add_argument("--steps", type=int, default=2, help="training steps per process (>= 2)")
    sm.add_argument("--threads", type=int, default=1)
    sm.add_argument("--from-json", default="", help="render (and --write) a run saved with --json instead")
    for p in (sp, sm):
        p.add_argument("--compare-src", help="also run every method from this source tree (before/after)")
        p.add_argument("--compare-label", default="before")
    for p in (sp, sm):
        p.add_argument("--dry-run", action="store_true", help="tiny budget smoke test; prints, writes nothing")
        p.add_argument("--note", default="")
        p.add_argument("--json", help="also write the raw results here")
        p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.cmd == "speed":
        if args.dry_run:
            args.sizes, args.batch, args.rounds, args.warmup, args.timed_steps = "test", 4, 2, 1, 2
            args.matmul_sizes = [128]
        if args.from_json:
            raw = merge_speed([json.loads(Path(p).read_text()) for p in args.from_json.split(",")])
            raw["meta"]["note"] = args.note or raw["meta"].get("note", "")
        else:
            raw = run_speed(args)
        text = render_speed(raw)
        name = NAME
    else:
        if args.dry_run:
            args.sizes, args.steps, args.methods = "test:4", 2, "diffratio-js,vsd"
        raw = json.loads(Path(args.from_json).read_text()) if args.from_json else run_memory(args)
        text, name = render_memory(raw), MEMORY_NAME
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    if args.write:
        write_section(name, text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main()
    else:
        main()
