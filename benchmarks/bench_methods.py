"""One-step methods side by side: time per training step, peak memory, time to teacher quality.

    .venv/bin/python benchmarks/bench_methods.py --teacher RUN_DIR            # prints a markdown section
    .venv/bin/python benchmarks/bench_methods.py --teacher RUN_DIR --write    # also replaces it in RESULTS.md

Every method trains the same generator (a copy of the teacher), with the same batch, on the same
machine, in one invocation; each measurement runs in a fresh subprocess so that peak memory
(``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA) belongs to that method alone.

- step time: ``train_student`` with evaluation off, ``--warmup`` steps discarded, then the mean of
  ``--timed-steps`` steps (the loop's own clock: auxiliary + generator updates and EMA).
- peak memory: of the step-time subprocess; "over base" subtracts the RSS measured in the same
  subprocess after imports and teacher loading, i.e. what training itself added.
- time to quality: training seconds (evaluation and checkpoint time excluded) until the one-step
  Fréchet distance of the EMA generator (``eval_every`` steps, 500 samples, evaluator seed 0)
  first reaches the teacher's 18-step Heun figure on the same evaluator, or ``--budget`` seconds.
  Runs in chunks with exact resume, so a method that gets there early stops early.

Targets of the issue: DiffRatio <= 0.7x VSD in step time, time to quality and peak memory, with
the default ratio network. Timings on a shared machine are distorted: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAME = "bench_methods"
METHODS = ("diffratio-js", "diffratio-kl", "diffratio-fkl", "gan", "vsd", "sid")


# ------------------------------------------------------------------------------ workers
def _peak_mib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_timing(a: dict) -> dict:
    """Step time and peak memory of one method (runs in its own process)."""
    import torch

    from probe.core.models import load_model
    from probe.core.runs import read_metrics
    from train.student.loop import StudentConfig, train_student

    torch.set_num_threads(a["threads"])
    load_model(a["teacher"])  # imports and one teacher load: the base line of "over base"
    base = _peak_mib(a["device"])
    steps = a["warmup"] + a["timed_steps"]
    cfg = StudentConfig(out=a["out"], teacher=a["teacher"], method=a["method"], batch=a["batch"], steps=steps,
                        log_every=1, checkpoint_every=10 ** 9, eval_every=0, device=a["device"], seed=a["seed"])
    train_student(cfg, progress=False)
    rows = read_metrics(Path(a["out"]))
    sec = {r["step"]: r["seconds"] for r in rows}
    per_step = (sec[steps] - sec[a["warmup"]]) / a["timed_steps"]
    return {"step_s": per_step, "peak_mib": _peak_mib(a["device"]), "base_mib": base,
            "aux_parameters": json.loads((Path(a["out"]) / "model.json").read_text())["method"]["aux_parameters"]}


def worker_quality(a: dict) -> dict:
    """Training seconds until the one-step FD reaches ``a['target_fd']`` (or the budget runs out)."""
    import torch

    from probe.core.runs import read_metrics
    from train.student.loop import StudentConfig, train_student

    torch.set_num_threads(a["threads"])
    chunk = a["eval_every"] * a["evals_per_chunk"]
    cfg = StudentConfig(out=a["out"], teacher=a["teacher"], method=a["method"], batch=a["batch"],
                        steps=a["max_steps"], eval_every=a["eval_every"], checkpoint_every=chunk,
                        log_every=a["eval_every"], device=a["device"], seed=a["seed"])
    done, hit, evals = 0, None, []
    while done < a["max_steps"]:
        done = min(done + chunk, a["max_steps"])
        train_student(cfg, resume=done > chunk, progress=False, stop_after=done)
        evals = [r for r in read_metrics(Path(a["out"])) if "eval_fd" in r]
        hit = next((r for r in evals if r["eval_fd"] <= a["target_fd"]), None)
        if hit is not None or evals[-1]["seconds"] >= a["budget"]:
            break
    best = min(evals, key=lambda r: r["eval_fd"])
    return {"reached": hit is not None, "ttq_s": hit["seconds"] if hit else None,
            "ttq_step": hit["step"] if hit else None,
            "start_fd": evals[0]["eval_fd"], "best_fd": best["eval_fd"], "best_step": best["step"],
            "last_step": evals[-1]["step"], "last_s": evals[-1]["seconds"]}


def run_worker(kind: str, args: dict) -> dict:
    """Run a worker in a fresh interpreter and parse its RESULT line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} worker for {args['method']} failed:\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------- parent
def teacher_fd(teacher: str, device: str) -> float:
    """The teacher's 18-step Heun FD on the same evaluator (n=500, seed 0) as the students."""
    eval_file = Path(teacher) / "eval.json"
    if eval_file.exists():
        r = json.loads(eval_file.read_text())
        if r.get("n") == 500 and r.get("sampler") == "heun-18":
            return float(r["fd"])
    from probe.quality.evaluate import EvalConfig, evaluate_model

    result, _ = evaluate_model(EvalConfig(model=teacher, n_samples=500, steps=18, seed=0, device=device))
    return float(result["fd"])


def make_untrained_teacher(preset: str, like, out: Path) -> Path:
    """A teacher run directory with random weights of another preset (same data, same image shape)."""
    import torch

    from probe.core.edm import EDMDenoiser
    from probe.core.models import build_unet, save_model

    torch.manual_seed(0)
    save_model(out, EDMDenoiser(build_unet(like.resolution, like.channels, preset)), "teacher", like.dataset)
    return out


def ratio(x, ref) -> str:
    return f"{x / ref:.2f}x" if x is not None and ref else "-"


def render(res: dict, quality: dict, meta: dict) -> str:
    vsd, vsd_q = res.get("vsd"), quality.get("vsd")
    lines = [f"<!-- {NAME}:start -->", "## One-step methods side by side (`benchmarks/bench_methods.py`)", "",
             f"Teacher `{meta['teacher']}` ({meta['teacher_params']:,} parameters, {meta['dataset']}), "
             f"generator = teacher copy, sigma_init 2.5, batch {meta['batch']}, default options of every method "
             f"(ratio network: teacher encoder + pooled head), device {meta['device']}, "
             f"torch threads {meta['threads']}, "
             f"{meta['cpus']} CPUs, torch {meta['torch']}. Each method in a fresh subprocess.", "",
             f"Step time: mean over {meta['timed_steps']} steps after {meta['warmup']} warm-up steps. Peak memory: "
             f"{'ru_maxrss' if meta['device'] == 'cpu' else 'torch.cuda.max_memory_allocated'} of that subprocess; "
             "'over base' subtracts the same process's figure after imports and teacher loading.", "",
             "| method | aux params | step ms | vs vsd | peak MiB | over base MiB | vs vsd (over base) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in res.items():
        over = r["peak_mib"] - r["base_mib"]
        vsd_over = vsd["peak_mib"] - vsd["base_mib"] if vsd else None
        step_vs = ratio(r["step_s"], vsd and vsd["step_s"])
        lines.append(f"| {m} | {r['aux_parameters']:,} | {1000 * r['step_s']:.1f} | {step_vs} "
                     f"| {r['peak_mib']:.0f} | {over:.0f} | {ratio(over, vsd_over)} |")
    if quality:
        lines += ["", f"Time to quality: training seconds (evaluation excluded) until the one-step FD (n=500) "
                  f"reaches the teacher's 18-step Heun FD **{meta['target_fd']:.2f}**; evaluated every "
                  f"{meta['eval_every']} steps; budget {meta['budget']:.0f} s of training per method.", "",
                  "| method | reached | seconds | steps | vs vsd | FD at start | best FD (step) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for m, q in quality.items():
            ref = vsd_q["ttq_s"] if vsd_q and vsd_q["reached"] else None
            secs = f"{q['ttq_s']:.0f}" if q["reached"] else f"> {q['last_s']:.0f}"
            steps = str(q["ttq_step"]) if q["reached"] else f"> {q['last_step']}"
            vs = ratio(q["ttq_s"], ref) if q["reached"] and ref else ("-" if q["reached"] else "not reached")
            lines.append(f"| {m} | {'yes' if q['reached'] else 'no'} | {secs} | {steps} | {vs} | {q['start_fd']:.1f} "
                         f"| {q['best_fd']:.2f} ({q['best_step']}) |")
    lines += ["", f"Measured {meta['date']}. {meta['note']}", f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from results_md import write_section as write  # benchmarks/ is on sys.path when a script runs

    write(NAME, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="teacher run directory (the generator starts as its copy)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods for step time / memory")
    ap.add_argument("--quality-methods", default=",".join(METHODS), help="methods for time to quality ('' = skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timed-steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between FD evaluations (time to quality)")
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per method (time to quality)")
    ap.add_argument("--max-steps", type=int, default=20_000)
    ap.add_argument("--scale-preset", default="", help="also time an untrained teacher of this UNet preset "
                    "(e.g. small, cifar) on the same data: step time and memory only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="Rerun on a quiet machine before quoting.")
    ap.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, payload = args.worker
        fn = worker_timing if kind == "timing" else worker_quality
        print("RESULT " + json.dumps(fn(json.loads(payload))), flush=True)
        return
    if not args.teacher:
        ap.error("--teacher RUN_DIR is required")

    import torch

    from probe.core.models import load_model

    teacher = load_model(args.teacher)
    common = dict(teacher=str(Path(args.teacher).resolve()), batch=args.batch, threads=args.threads,
                  device=args.device, seed=args.seed)
    res, quality, scaled = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in [m for m in args.methods.split(",") if m]:
            res[m] = run_worker("timing", {**common, "method": m, "out": f"{tmp}/t-{m}", "warmup": args.warmup,
                                           "timed_steps": args.timed_steps})
            print(f"{m}: {1000 * res[m]['step_s']:.1f} ms/step, peak {res[m]['peak_mib']:.0f} MiB", file=sys.stderr)
        if args.scale_preset:
            big = make_untrained_teacher(args.scale_preset, teacher, Path(tmp) / f"teacher-{args.scale_preset}")
            for m in [m for m in args.methods.split(",") if m]:
                scaled[m] = run_worker("timing", {**common, "teacher": str(big), "method": m, "out": f"{tmp}/s-{m}",
                                                  "warmup": args.warmup, "timed_steps": args.timed_steps})
                print(f"{args.scale_preset} {m}: {1000 * scaled[m]['step_s']:.1f} ms/step", file=sys.stderr)
        q_methods = [m for m in args.quality_methods.split(",") if m]
        target = teacher_fd(args.teacher, args.device) if q_methods else float("nan")
        for m in q_methods:
            quality[m] = run_worker("quality", {**common, "method": m, "out": f"{tmp}/q-{m}", "target_fd": target,
                                                "eval_every": args.eval_every, "evals_per_chunk": 4,
                                                "budget": args.budget, "max_steps": args.max_steps})
            print(f"{m}: {quality[m]}", file=sys.stderr)
    scaled_params = 0
    if scaled:
        from probe.core.models import build_unet

        scaled_params = sum(p.numel() for p in build_unet(teacher.resolution, teacher.channels,
                                                          args.scale_preset).parameters())
    meta = dict(teacher=args.teacher, teacher_params=sum(p.numel() for p in teacher.unet.parameters()),
                dataset=teacher.dataset, batch=args.batch, device=args.device, threads=args.threads,
                cpus=os.cpu_count(), torch=torch.__version__, warmup=args.warmup, timed_steps=args.timed_steps,
                target_fd=target, eval_every=args.eval_every, budget=args.budget, note=args.note,
                date=time.strftime("%Y-%m-%d") + f" on {platform.machine()}")
    text = render(res, quality, meta)
    if scaled:
        table = render(scaled, {}, meta).split("\n")
        rows = [l for l in table if l.startswith("|")]
        text = text.replace("\nMeasured", f"\nSame, with an untrained `{args.scale_preset}` UNet teacher "
                            f"({scaled_params:,} parameters; weights and optimiser states weigh more):\n\n"
                            + "\n".join(rows) + "\n\nMeasured")
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
