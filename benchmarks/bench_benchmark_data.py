"""Benchmark headroom: does the default teacher sit well above the metric's floor on each embedded data set?

    # train the default teacher per data set (probe train teacher, default preset and steps), then measure
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_benchmark_data.py --data scenes --train --work-dir runs/bench
    # or measure teachers trained before (RUN = a teacher run directory; repeat for several seeds)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_benchmark_data.py --teacher scenes=RUN [--write]
    # several seeds in parallel processes, then one table with their spread
    ... --teacher scenes=RUN0 --json a.json & ... --teacher scenes=RUN1 --json b.json; ... --from-json a.json,b.json

Per data set: the data's generation/load time, the metric classifier's held-out accuracy, the
sample counts the evaluator uses by default (n per score, reference, held-out pool), the
real-vs-real floor (mean +- std over 5 resamples), the teacher's FD / KID / FD-infinity (mean +-
std over latent draws, ``probe eval``'s protocol), its ratio to the floor and its distance above
the floor in floor stds, class coverage, precision/recall, the memorisation ratios, and the wall
and CPU times of training and evaluation. Then the issue-15 criteria: teacher FD >= 3x the floor,
floor std <= 0.1 x (teacher FD - floor), coverage 1.0, precision >= 0.7. With ``--write`` the
markdown section replaces this script's section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from probe.quality.evaluate import EvalConfig, heun_name  # noqa: E402
from train.teacher import TeacherConfig  # noqa: E402

NAME = "bench_benchmark_data"
# options a trial teacher may change; a row names the ones that differ from TeacherConfig's defaults
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TeacherConfig) if f.name in ("lr_cooldown", "ema_rampup",
                                                                                        "p_mean")}
OFF = {"lr_cooldown": 0.0, "ema_rampup": 0.0}  # what a run made before an option existed used
TIME_FILE = "bench_train_time.json"   # written beside a teacher this script trained: wall and CPU seconds
DEFAULT_SAMPLER = heun_name(EvalConfig(model=""))  # probe eval's default ("heun-18"); others are named in the row


def load_average() -> float:
    return os.getloadavg()[0]


def train_default_teacher(dataset: str, out: Path, seed: int = 0) -> dict:
    """``probe train teacher --data DATASET --seed SEED`` with every other option at its default, timed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load, start = load_average(), time.perf_counter()
    cmd = [sys.executable, "-m", "probe.cli", "train", "teacher", "--data", dataset, "--out", str(out),
           "--seed", str(seed)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - start,
              "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              "load_start": load, "load_end": load_average(), "threads": os.environ.get("OMP_NUM_THREADS")}
    (out / TIME_FILE).write_text(json.dumps(timing, indent=2))
    return timing


def training_time(run: Path) -> dict:
    """Timing of a teacher run: this script's file when it trained it, else the loop's wall time
    from metrics.jsonl (CPU time unknown)."""
    if (run / TIME_FILE).exists():
        return json.loads((run / TIME_FILE).read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    return {"wall_s": seconds[-1] if seconds else None, "cpu_s": None, "loop_only": True}


def measure(dataset: str, run: Path | None, draws: int = 3, steps: int = 18, churn: float = 0.0) -> dict:
    from probe.core.data import load_dataset
    from probe.core.images import save_grid
    from probe.quality.evaluate import evaluate_model
    from probe.quality.metrics import QualityEvaluator, default_n_samples

    start = time.perf_counter()
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    out: dict = {"dataset": dataset, "load_s": time.perf_counter() - start, "n_train": len(train),
                 "n_test": len(test), "n_factors": len(train.factors), "num_classes": train.num_classes}
    if run is None:  # floor and classifier only
        start = time.perf_counter()
        ev = QualityEvaluator(dataset, n_samples=default_n_samples(dataset))
        out.update(floor=ev.floor(), evaluator=ev.info, eval_s=time.perf_counter() - start)
        return out
    start, cpu = time.perf_counter(), time.process_time()
    result, samples = evaluate_model(EvalConfig(model=str(run), data=dataset, draws=draws, steps=steps,
                                                churn=churn))
    config = json.loads((run / "config.json").read_text())["config"]
    out.update(result=result, eval_s=time.perf_counter() - start, eval_cpu_s=time.process_time() - cpu,
               train_time=training_time(run), floor=result["floor"], evaluator=result["evaluator"],
               seed=config.get("seed"), draws=draws, sampler=result["sampler"],
               changed={k: config.get(k, OFF.get(k)) for k in DEFAULTS})
    grid = run / f"bench_samples_{result['sampler']}.png"
    save_grid(samples[:64], grid, scale=6)
    out["grid"] = f"{grid.name} in the teacher's run directory"  # never a path of the machine it ran on
    return out


def criteria(r: dict) -> dict:
    """Issue 15's headroom and quality criteria for one teacher, each True/False."""
    f, m = r["floor"], r["result"]
    return {"fd >= 3x floor": m["fd"] >= 3 * f["fd"],
            "floor std <= 0.1 x (fd - floor)": f["fd_std"] <= 0.1 * (m["fd"] - f["fd"]),
            "coverage 1.0": m["coverage"] >= 1.0, "precision >= 0.7": m["precision"] >= 0.7}


def pm(d: dict, key: str, digits: int) -> str:
    return f"{d[key]:.{digits}f} +- {d[key + '_std']:.{digits}f}"


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def setting(r: dict) -> str:
    """The teacher options that differ from the default, e.g. "lr_cooldown 0" ("" for the default)."""
    return ", ".join(f"{k} {v:g}" for k, v in r.get("changed", {}).items() if v != DEFAULTS.get(k))


def sampler(r: dict) -> str:
    """The teacher's sampler when it is not the default Heun-18 (results saved before it was recorded used it)."""
    name = r.get("sampler", DEFAULT_SAMPLER)
    return "" if name == DEFAULT_SAMPLER else f"sampler {name}"


def row_label(r: dict) -> str:
    """The data set, the teacher's seed, every option that differs from the default, and the sampler."""
    return ", ".join(filter(None, [r["dataset"], f"seed {r['seed']}" if r.get("seed") is not None else "",
                                   setting(r), sampler(r)]))


def seed_summary(results: list[dict]) -> list[str]:
    """Per data set and teacher setting with several seeds: the spread of the teacher over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "result" in r:  # never pool unlike teachers or samplers: one group per setting and sampler
            groups.setdefault((r["dataset"], ", ".join(filter(None, [setting(r), sampler(r)]))), []).append(r)
    lines = []
    for (dataset, options), rs in groups.items():
        if len(rs) < 2:
            continue
        lines.append(f"- {dataset}{' (' + options + ')' if options else ''} over seeds "
                     f"{', '.join(str(r.get('seed')) for r in rs)}: " + ", ".join(
                         f"{key} {np.mean(v):.3g} +- {np.std(v, ddof=1):.2g} ({min(v):.3g}-{max(v):.3g})"
                         for key, v in ((k, [r["result"][k] for r in rs]) for k in ("fd", "precision", "recall")))
                     + "; criteria met by " + ", ".join(
                         f"{sum(criteria(r)[c] for r in rs)}/{len(rs)} ({c})" for c in criteria(rs[0])))
    return ([""] + lines) if lines else []


def markdown(results: list[dict], seconds: float | None) -> str:
    lines = [f"<!-- {NAME}:start -->",
             "## Benchmark headroom: default teacher vs floor (`benchmarks/bench_benchmark_data.py`)",
             "", "Teacher = `probe train teacher --data DATA` with the default preset (`tiny`) and steps "
             "(TEACHER_STEPS: 2400 on scenes, 1600 elsewhere) and the row's seed (any other option that differs "
             "from the default is named in the row), "
             "scored by `probe eval`'s protocol: n images per score (the evaluator's default for the data set), "
             "DRAWS latent draws, Heun 18 steps unless the row names another sampler (`heun-S-churnC[tmin,tmax]`: "
             "EDM's stochastic sampler, S steps, S_churn C between those sigmas); value +- std over draws "
             "(0 for one draw); floor = n held-out "
             "real images scored the same way, mean +- std over 5 resamples. Ratio = teacher FD / floor FD; "
             "gap = (teacher FD - floor FD) / floor std. Memorisation: nearest-neighbour distance of the "
             "samples to train / to held-out (equal-size sets), pixels and classifier features (1 = no copying).",
             ""]
    head = ("| data | classes / factors | train / test | n / reference / pool | classifier acc. | floor FD | "
            "floor KID | floor FD-inf | teacher FD | KID | FD-inf | ratio | gap | coverage | precision | recall | "
            "memorisation px / feat | train wall / CPU s | eval s |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ev, f = r["evaluator"], r["floor"]
        base = (f"| {row_label(r)} | {r['num_classes']} / {r['n_factors']} | {r['n_train']} / {r['n_test']} | "
                f"{ev['n_samples']} / {ev['n_reference']} / {ev['n_heldout']} | {ev['classifier_test_accuracy']:.4f} | "
                f"{pm(f, 'fd', 2)} | {pm(f, 'kid', 3)} | {pm(f, 'fd_inf', 2)} |")
        if "result" not in r:
            lines.append(base + " no teacher in this run |" + " |" * 9)
            continue
        m, t = r["result"], r["train_time"]
        mem = m["memorisation"]
        lines.append(base + f" {pm(m, 'fd', 2)} | {pm(m, 'kid', 3)} | {pm(m, 'fd_inf', 2)} | "
                     f"{m['fd'] / f['fd']:.1f} | {(m['fd'] - f['fd']) / f['fd_std']:.0f} | {m['coverage']:.2f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {mem['pixel']['nn_ratio']:.3f} / "
                     f"{mem['features']['nn_ratio']:.3f} | {fmt_s(t['wall_s'])} / {fmt_s(t.get('cpu_s'))} | "
                     f"{r['eval_s']:.0f} |")
    lines.append("")
    for r in results:
        if "result" in r:
            crit = criteria(r)
            t = r["train_time"]
            lines.append(f"- {row_label(r)}: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in crit.items())
                         + f"; training load average {t.get('load_start') or '?'} -> {t.get('load_end') or '?'}"
                         + (" (wall of the training loop only, CPU time not recorded)" if t.get("loop_only") else "")
                         + f"; data generated/loaded in {r['load_s']:.1f} s; samples: `{r['grid']}`")
    lines += seed_summary(results)
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with "
              f"other jobs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
              + (f"this measurement {seconds:.0f} s wall." if seconds is not None else
                 "merged from runs measured in parallel processes (`--from-json`); evaluation seconds per "
                 "teacher in the table."),
              f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def measure_all(args) -> list[dict]:
    """Every --teacher pair, and with --train a default teacher per (--data set, --seed)."""
    teachers = [tuple(t.split("=", 1)) for t in args.teacher]
    for dataset in filter(None, args.data.split(",")):
        if args.train:
            for seed in (int(v) for v in args.seeds.split(",")):
                run = Path(args.work_dir) / (f"teacher-{dataset}" + (f"-seed{seed}" if seed else ""))
                train_default_teacher(dataset, run, seed)
                teachers.append((dataset, str(run)))
        elif not any(d == dataset for d, _ in teachers):
            teachers.append((dataset, ""))
    results, start = [], time.perf_counter()
    for dataset, run in teachers:
        results.append(measure(dataset, Path(run) if run else None, args.draws, args.steps, args.churn))
        print(f"{dataset} {run} done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="comma-separated data sets measured without a given teacher")
    parser.add_argument("--teacher", action="append", default=[],
                        help="DATA=RUN: a trained teacher of DATA (repeat it, also for several seeds of one set)")
    parser.add_argument("--train", action="store_true", help="train the default teacher of every --data set")
    parser.add_argument("--seeds", default="0", help="with --train: one default teacher per seed (comma-separated)")
    parser.add_argument("--from-json", default="", help="render (and --write) results saved with --json, "
                        "comma-separated, e.g. teachers measured in parallel processes; measures nothing")
    parser.add_argument("--work-dir", default="runs/bench_benchmark_data", help="where --train writes teachers")
    parser.add_argument("--draws", type=int, default=3, help="latent draws per teacher (probe eval's default: 3)")
    parser.add_argument("--steps", type=int, default=18, help="the teacher's Heun steps (probe eval --steps)")
    parser.add_argument("--churn", type=float, default=0.0,
                        help="EDM's S_churn (probe eval --churn); 0 = the deterministic sampler")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()

    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.from_json:
        results = [r for p in args.from_json.split(",") for r in json.loads(Path(p).read_text())]
        draws_done = {r["draws"] for r in results if "draws" in r} or {args.draws}
        args.draws = max(draws_done)
    else:
        results = measure_all(args)
    draws = f"{args.draws} latent draw" + "s" * (args.draws > 1)
    seconds = None if args.from_json else time.perf_counter() - start
    text = markdown(results, seconds).replace("DRAWS latent draws", draws)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write:
        from results_md import write_section

        write_section(NAME, text)


if __name__ == "__main__":
    main()
