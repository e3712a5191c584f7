"""GPU benchmark of the one-step methods: img/s, peak memory and time to quality, in one script (< 8 min).

    python benchmarks/gpu_bench.py                    # CUDA, all six methods: prints the markdown section
    python benchmarks/gpu_bench.py --compile --write  # also torch.compile; replaces the section in RESULTS.md
    python benchmarks/gpu_bench.py --dry-run          # CPU smoke test: tiny sizes, prints, writes nothing

Run by ``benchmarks/gpu_check.sh`` on a lent GPU machine; needs no internet. A deadline
(``--time-limit``, 400 s by default) is shared by the phases: a phase that cannot fit in what is left
is skipped and the table says so, so the script ends in time whatever the device.

1. **throughput and memory**: ``train.student.loop.train_student`` for every method, each in a fresh
   process, on the CIFAR-10-sized UNet (preset ``cifar``, 35.7M parameters, random weights) with a
   folder of random 32x32 RGB images: bf16 autocast (the loop's CUDA default, with TF32),
   networks in ``channels_last`` (``--no-channels-last`` to compare) and, with ``--compile``,
   ``nn.Module.compile`` on the generator, the auxiliary network and the teacher (a second row per
   method). img/s = batch x timed steps / their seconds (the loop's clock, after ``--warmup``
   steps); peak memory = ``torch.cuda.max_memory_allocated`` (CPU: whole-process peak RSS).
2. **time to quality** on digits: a default digits teacher (``tiny`` preset, ``--teacher-steps``)
   is trained on the device, its Heun-18 FD measured (n=500), then every method trains until its
   one-step FD reaches 1.5x and 1.1x that figure or its share of the time left runs out
   (``bench_quality.worker_quality``: training seconds, evaluation excluded and listed separately).
3. **extraction**: ``probe.features.extract`` of the default layers at the 5 default sigmas.

The speed options are applied by a subclass of the method (``fast_method``), not by the loop: this
is a benchmark of what the hardware gives, the training code paths are the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402  (benchmarks/ helper: workers, machine)
import bench_quality  # noqa: E402  (benchmarks/ helper: quality runs)

NAME = "gpu_check"
METHODS = bench_methods.METHODS


def _peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return bench_methods._status_mib("VmHWM")


def make_inputs(root: Path, n_images: int, preset: str, seed: int) -> tuple[Path, Path]:
    """A folder of random RGB 32x32 PNGs and a random-weight teacher run dir for it."""
    import numpy as np
    import torch
    from PIL import Image

    from probe.core.edm import EDMDenoiser
    from probe.core.models import build_unet, save_model

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n_images, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(pixels):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    torch.manual_seed(seed)
    teacher = root / "teacher"
    save_model(teacher, EDMDenoiser(build_unet(32, 3, preset)), "teacher", f"folder:{folder}")
    return folder, teacher


def fast_method(base, channels_last: bool, compile_: bool):
    """``base`` with its networks (generator, auxiliary, teacher) in channels_last and/or compiled."""
    import torch

    class Fast(base):
        def __init__(self, cfg, teacher, generator):
            super().__init__(cfg, teacher, generator)
            for net in (generator, self.aux, self.teacher):
                if net is None:
                    continue
                if channels_last:
                    net.to(memory_format=torch.channels_last)  # in place: optimiser and EMA see the same tensors
                if compile_:
                    net.compile()  # in place: state_dict keys (checkpoints, saved networks) unchanged

    Fast.__name__ = base.__name__
    return Fast


def worker_train(a: dict) -> dict:
    """Throughput and peak memory of one method (runs in its own process)."""
    import torch

    import train.student.loop as loop
    from probe.core.runs import read_metrics

    cuda = a["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    get_method = loop.get_method
    loop.get_method = lambda name: fast_method(get_method(name), a["channels_last"], a["compile"])
    steps = a["warmup"] + a["steps"]
    cfg = loop.StudentConfig(out=a["out"], teacher=a["teacher"], method=a["method"], data=f"folder:{a['folder']}",
                             batch=a["batch"], steps=steps, log_every=1, checkpoint_every=10 ** 9, eval_every=0,
                             device=a["device"], seed=0)
    loop.train_student(cfg, progress=False)
    sec = {r["step"]: r["seconds"] for r in read_metrics(Path(a["out"])) if "seconds" in r}
    timed = sec[steps] - sec[a["warmup"]]
    return {"img_per_s": a["batch"] * a["steps"] / timed, "step_s": timed / a["steps"],
            "first_step_s": sec[1], "peak_mib": _peak_mib(a["device"])}


def worker_ttq(a: dict) -> dict:
    """Train a digits teacher, measure its FD, then time every method to 1.5x / 1.1x of it (one process)."""
    import torch

    from train.teacher import TeacherConfig, train_teacher

    deadline = time.time() + a["seconds"]
    t0 = time.perf_counter()
    teacher = Path(a["work"]) / "teacher"
    train_teacher(TeacherConfig(out=str(teacher), preset=a["teacher_preset"], steps=a["teacher_steps"],
                                batch=a["teacher_batch"], eval_samples=0, sample_steps=a["teacher_sample_steps"],
                                checkpoint_every=a["teacher_steps"], device=a["device"]), progress=False)
    teacher_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fd = bench_quality.teacher_fd(str(teacher), a["eval_samples"], a["teacher_sample_steps"], a["device"])
    teacher_eval_s = time.perf_counter() - t0
    targets = {f"{f:g}x": f * fd for f in a["factors"]}
    results = {}
    for i, method in enumerate(a["methods"]):
        left = deadline - time.time()
        share = left / (len(a["methods"]) - i)
        if share < a["min_seconds"]:
            results[method] = {"skipped": f"{left:.0f} s left for {len(a['methods']) - i} methods"}
            continue
        # training seconds get ~60% of the share: set-up, evaluation and checkpoints take the rest
        budget = 0.6 * share
        start = time.time()
        res = bench_quality.worker_quality({
            "out": str(Path(a["work"]) / f"q-{method}"), "teacher": str(teacher), "method": method,
            "batch": a["batch"], "threads": torch.get_num_threads(), "device": a["device"], "seed": 0,
            "eval_every": a["eval_every"], "evals_per_chunk": a["evals_per_chunk"],
            "eval_samples": a["eval_samples"], "max_steps": a["max_steps"], "targets": targets, "budget": budget})
        res["budget_s"], res["wall_s"] = budget, time.time() - start
        results[method] = res
    return {"teacher_fd": fd, "targets": targets, "teacher_train_s": teacher_train_s,
            "teacher_eval_s": teacher_eval_s, "results": results}


def worker_extract(a: dict) -> dict:
    """Extraction throughput (runs in its own process)."""
    import torch

    from probe.features.extract import DEFAULT_SIGMAS, ExtractConfig, extract

    if a["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = ExtractConfig(model=a["teacher"], out=a["out"], data=f"folder:{a['folder']}", split="train",
                        n_samples=a["samples"], batch=a["batch"], device=a["device"])
    t0 = time.perf_counter()
    extract(cfg, progress=False)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    extract(cfg, progress=False)  # complete file: only the set-up runs
    setup = time.perf_counter() - t0
    passes = a["samples"] * len(DEFAULT_SIGMAS)
    return {"img_per_s": passes / max(total - setup, 1e-9), "seconds": total, "setup_s": setup,
            "peak_mib": _peak_mib(a["device"])}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores, {bench_methods.cpu_name()}), torch {torch.__version__}"


def render(results: dict, meta: dict) -> str:
    lines = [f"<!-- {NAME}:start -->", "## GPU check (`benchmarks/gpu_check.sh`, `benchmarks/gpu_bench.py`)", "",
             f"Device: {meta['device_name']}"
             f"{' (**dry run**: tiny sizes, not a measurement)' if meta['dry_run'] else ''}. "
             f"Measured {meta['date']} in {meta['minutes']:.1f} min (limit {meta['time_limit'] / 60:.1f} min).", "",
             f"Throughput and memory: UNet preset `{meta['preset']}` with random weights, random 32x32 RGB data, "
             f"batch {meta['batch']}, {meta['steps']} timed steps after {meta['warmup']} warm-up steps, "
             f"{'bf16 autocast + TF32' if meta['cuda'] else 'float32 (no autocast on CPU)'}, "
             f"{'channels_last' if meta['channels_last'] else 'contiguous (NCHW)'} networks. "
             f"Peak = {'torch.cuda.max_memory_allocated' if meta['cuda'] else 'whole-process peak RSS'} of the "
             "method's own process.", "",
             "| method | compiled | img/s | step ms | first step s | peak MiB | peak vs vsd |",
             "|---|---|---:|---:|---:|---:|---:|"]
    train = results.get("train", {})
    for key, r in train.items():
        method, compiled = key.split("+")[0], "+compile" in key
        if "skipped" in r:
            lines.append(f"| {method} | {'yes' if compiled else 'no'} | skipped: {r['skipped']} | | | | |")
            continue
        ref = train.get("vsd" + ("+compile" if compiled else ""), {})
        vs = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref.get("peak_mib") else "-"
        lines.append(f"| {method} | {'yes' if compiled else 'no'} | {r['img_per_s']:.1f} | {1000 * r['step_s']:.1f} "
                     f"| {r['first_step_s']:.1f} | {r['peak_mib']:.0f} | {vs} |")
    q = results.get("ttq")
    lines.append("")
    if not q or "skipped" in q:
        lines.append(f"Time to quality: skipped ({(q or {}).get('skipped', 'not run')}).")
    else:
        names = list(q["targets"])
        lines += [f"Time to quality on digits: teacher `{meta['teacher_preset']}` trained here for "
                  f"{meta['teacher_steps']} steps ({q['teacher_train_s']:.0f} s), Heun-{meta['teacher_sample_steps']} "
                  f"FD **{q['teacher_fd']:.2f}** (n={meta['eval_samples']}); thresholds "
                  + ", ".join(f"{k} = {v:.2f}" for k, v in q["targets"].items())
                  + f"; batch {meta['batch_ttq']}, FD every {meta['eval_every']} steps, seed 0, one run per method "
                  "(a smoke figure, not the 3-seed study of `bench_quality.py`). Seconds = training clock; "
                  "evaluation seconds separate.", "",
                  "| method | budget s | " + " | ".join(f"steps to {n} | s to {n}" for n in names)
                  + " | best FD (step) | last FD (step) | eval s |",
                  "|---|---:|" + "---:|" * (2 * len(names) + 3)]
        for m, r in q["results"].items():
            if "skipped" in r:
                lines.append(f"| {m} | skipped: {r['skipped']} |" + " |" * (2 * len(names) + 3))
                continue
            cells = []
            for n in names:
                h = r["hits"][n]
                cells += ([str(h["step"]), f"{h['seconds']:.1f}"] if h
                          else [f"> {r['last_step']}", f"> {r['train_s']:.0f}"])
            lines.append(f"| {m} | {r['budget_s']:.0f} | " + " | ".join(cells)
                         + f" | {r['best_fd']:.2f} ({r['best_step']}) | {r['last_fd']:.2f} ({r['last_step']}) "
                           f"| {r['eval_s']:.1f} |")
    r = results.get("extract")
    lines.append("")
    if r and "skipped" not in r:
        lines.append(f"Extraction (default layers, 5 sigmas, {meta['samples']} samples, "
                     f"batch {meta['extract_batch']}): "
                     f"{r['img_per_s']:.1f} forward passes of one image per second, peak {r['peak_mib']:.0f} MiB.")
    else:
        lines.append(f"Extraction: skipped ({(r or {}).get('skipped', 'not run')}).")
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append(f"<!-- {NAME}:end -->")
    return "\n".join(lines)


def write_section(text: str) -> None:
    from results_md import write_section as write  # benchmarks/ is on sys.path when a script runs

    write(NAME, text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated one-step methods")
    ap.add_argument("--preset", default="cifar", help="UNet preset of the throughput phase")
    ap.add_argument("--batch", type=int, default=64, help="training batch of the throughput phase")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 6 with --compile)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile rows (--compile-methods)")
    ap.add_argument("--compile-methods", default="diffratio-js,vsd", help="methods that get a compiled row")
    ap.add_argument("--no-channels-last", action="store_true", help="contiguous (NCHW) networks")
    ap.add_argument("--no-ttq", action="store_true", help="skip the time-to-quality phase")
    ap.add_argument("--teacher-steps", type=int, default=1600, help="digits teacher: steps (the default teacher's)")
    ap.add_argument("--eval-every", type=int, default=100, help="time to quality: steps between FD evaluations")
    ap.add_argument("--samples", type=int, default=2048, help="extraction samples")
    ap.add_argument("--extract-batch", type=int, default=256, help="extraction samples per forward pass")
    ap.add_argument("--time-limit", type=float, default=400.0, help="seconds for everything (phases share it)")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke test at tiny sizes; prints, writes nothing")
    ap.add_argument("--note", default="")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--md", help="also write the markdown section here")
    ap.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, args = a.worker[0], json.loads(a.worker[1])
        fn = {"train": worker_train, "extract": worker_extract, "ttq": worker_ttq}[kind]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return
    import torch

    start = time.time()
    deadline = start + a.time_limit
    if a.dry_run:
        a.device, a.preset, a.batch, a.steps, a.samples, a.extract_batch = "cpu", "test", 2, 2, 8, 8
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available (use --dry-run for a CPU smoke test)")
    warmup = a.warmup if a.warmup is not None else (1 if a.dry_run else (6 if a.compile else 3))
    methods = [m for m in a.methods.split(",") if m]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    ttq_cfg = dict(teacher_preset="test" if a.dry_run else "tiny", teacher_steps=4 if a.dry_run else a.teacher_steps,
                   teacher_batch=16 if a.dry_run else 64, teacher_sample_steps=2 if a.dry_run else 18,
                   batch=4 if a.dry_run else 64, eval_every=1 if a.dry_run else a.eval_every,
                   evals_per_chunk=1 if a.dry_run else 2, eval_samples=16 if a.dry_run else 500,
                   max_steps=2 if a.dry_run else 100_000, factors=[1.5, 1.1], min_seconds=1 if a.dry_run else 15)
    results: dict = {"train": {}}

    def left() -> float:
        return deadline - time.time()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, teacher = make_inputs(tmp, max(a.samples + a.samples // 8 + 2, a.batch + 2), a.preset, seed=0)
        compiled_methods = [m for m in a.compile_methods.split(",") if m in methods] if a.compile else []
        jobs = [(m, False) for m in methods] + [(m, True) for m in compiled_methods]
        # phase 1 gets up to 40% of the time (50% with compiled rows), phase 2 most of the rest, extraction
        # a small reserve
        phase1_end = start + (0.5 if compiled_methods else 0.4) * a.time_limit
        for method, compiled in jobs:
            key = method + ("+compile" if compiled else "")
            if time.time() > phase1_end:
                results["train"][key] = {"skipped": "phase time used up"}
                continue
            try:
                results["train"][key] = bench_methods.run_worker("train", {
                    "out": str(tmp / key), "teacher": str(teacher), "folder": str(folder), "method": method,
                    "batch": a.batch, "steps": a.steps, "warmup": warmup, "device": a.device, "threads": threads,
                    "channels_last": not a.no_channels_last, "compile": compiled}, worker_script=__file__,
                    timeout=phase1_end - time.time() + 10)
            except TimeoutError as e:
                results["train"][key] = {"skipped": str(e)}
            print(f"{key}: {results['train'][key]}", file=sys.stderr)
        reserve = 5 if a.dry_run else 40   # seconds kept for extraction
        if a.no_ttq:
            results["ttq"] = {"skipped": "--no-ttq"}
        elif left() - reserve < (5 if a.dry_run else 120):
            results["ttq"] = {"skipped": f"only {left():.0f} s left"}
        else:
            try:
                results["ttq"] = bench_methods.run_worker("ttq", {
                    **ttq_cfg, "work": str(tmp / "ttq"), "methods": methods, "device": a.device, "threads": threads,
                    "seconds": left() - reserve - (0 if a.dry_run else 20)}, worker_script=__file__,
                    timeout=left() - reserve / 2)
            except TimeoutError as e:
                results["ttq"] = {"skipped": str(e)}
        if left() > (0 if a.dry_run else 20):
            try:
                results["extract"] = bench_methods.run_worker("extract", {
                    "out": str(tmp / "f.h5"), "teacher": str(teacher), "folder": str(folder), "samples": a.samples,
                    "batch": a.extract_batch, "device": a.device, "threads": threads}, worker_script=__file__,
                    timeout=max(left(), 30))
            except TimeoutError as e:
                results["extract"] = {"skipped": str(e)}
        else:
            results["extract"] = {"skipped": f"only {left():.0f} s left"}
    meta = {"device_name": device_name(a.device), "cuda": cuda, "preset": a.preset, "batch": a.batch,
            "steps": a.steps, "warmup": warmup, "samples": a.samples, "extract_batch": a.extract_batch,
            "methods": methods, "channels_last": not a.no_channels_last, "compile": a.compile,
            "dry_run": a.dry_run, "time_limit": a.time_limit, "minutes": (time.time() - start) / 60,
            "date": time.strftime("%Y-%m-%d"), "note": a.note, "batch_ttq": ttq_cfg["batch"],
            **{k: ttq_cfg[k] for k in ("teacher_preset", "teacher_steps", "teacher_sample_steps", "eval_samples",
                                       "eval_every")}}
    text = render(results, meta)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if a.md:
        Path(a.md).write_text(text + "\n")
    if a.write:
        write_section(text)


if __name__ == "__main__":
    main()
