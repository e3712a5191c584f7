"""GPU benchmark: one-step training throughput and peak memory, and extraction throughput.

    .venv/bin/python benchmarks/gpu_bench.py                         # CUDA: prints a markdown section
    .venv/bin/python benchmarks/gpu_bench.py --write                 # also replaces it in RESULTS.md
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --steps 2  # smoke test of the driver on a CPU

Run by ``benchmarks/gpu_check.sh`` on a lent GPU machine. Needs no internet: the teacher is the
CIFAR-10-sized UNet (probe/core/models.py preset "cifar", the google/ddpm-cifar10-32 configuration,
35.7M parameters) with random weights, and the "real" data is a folder of random 32x32 RGB
images. Numbers measure speed and memory only, never quality.

- training: ``train.student.loop.train_student`` end to end for each method (``diffratio-js``: generator
  + ratio classifier, teacher never evaluated; ``vsd``: generator + fake-score net + frozen
  teacher), each in a fresh process. Throughput = generated images per second over the timed
  steps (from the run's own per-step ``seconds``, after ``--warmup`` steps); peak memory =
  ``torch.cuda.max_memory_allocated`` over the whole run (CPU: peak RSS).
- extraction: ``probe.extract.extract`` of the default layers at the 5 default sigmas into a fresh
  HDF5 file; throughput = samples x sigmas (forward passes of one image) per second, set-up
  (model and data loading, tracing) excluded by timing a second call on the complete file.
CUDA runs use bf16 autocast and TF32 in training (probe/core/distributed.py), float32 in extraction.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAME = "gpu_check"
METHODS = ("diffratio-js", "vsd")


def _peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


def worker_train(a: dict) -> dict:
    """Throughput and peak memory of one method (runs in its own process)."""
    import torch

    from probe.core.runs import read_metrics
    from train.student.loop import StudentConfig, train_student

    if a["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    steps = a["warmup"] + a["steps"]
    cfg = StudentConfig(out=a["out"], teacher=a["teacher"], method=a["method"], data=f"folder:{a['folder']}",
                        batch=a["batch"], steps=steps, log_every=1, checkpoint_every=10 ** 9, eval_every=0,
                        device=a["device"], seed=0)
    train_student(cfg, progress=False)
    sec = {r["step"]: r["seconds"] for r in read_metrics(Path(a["out"])) if "seconds" in r}
    timed = sec[steps] - sec[a["warmup"]]
    return {"img_per_s": a["batch"] * a["steps"] / timed, "step_s": timed / a["steps"],
            "peak_mib": _peak_mib(a["device"])}


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


def run_worker(kind: str, args: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(args)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def render(results: dict, meta: dict) -> str:
    lines = [f"<!-- {NAME}:start -->", "## GPU check (`benchmarks/gpu_check.sh`, `benchmarks/gpu_bench.py`)", "",
             f"Device: {meta['device_name']}. UNet preset `{meta['preset']}` with random weights, random "
             f"32x32 RGB data; training batch {meta['batch']}, {meta['steps']} timed steps after "
             f"{meta['warmup']} warm-up steps; extraction of {meta['samples']} samples x 5 sigmas, batch "
             f"{meta['extract_batch']}. Speed and memory only.", "",
             "| work | img/s | step (ms) | peak memory (MiB) |", "|---|---:|---:|---:|"]
    for method in meta["methods"]:
        r = results[method]
        lines.append(f"| train {method} | {r['img_per_s']:.1f} | {1000 * r['step_s']:.1f} | {r['peak_mib']:.0f} |")
    r = results["extract"]
    lines.append(f"| extract (forward passes) | {r['img_per_s']:.1f} | - | {r['peak_mib']:.0f} |")
    lines += ["", f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from results_md import write_section as write  # benchmarks/ is on sys.path when a script runs

    write(NAME, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cpu (cpu: a smoke test of the driver)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated one-step methods")
    ap.add_argument("--preset", default="cifar", help="UNet preset (probe/core/models.py)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 64 on cuda, 2 on cpu)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on cuda, 1 on cpu)")
    ap.add_argument("--samples", type=int, default=None, help="extraction samples (default 2048 cuda, 8 cpu)")
    ap.add_argument("--extract-batch", type=int, default=256, help="extraction samples per forward pass")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--md", help="also write the markdown section here")
    ap.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, args = a.worker[0], json.loads(a.worker[1])
        print(json.dumps({"train": worker_train, "extract": worker_extract}[kind](args)))
        return
    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available (use --device cpu for a smoke test)")
    batch = a.batch or (64 if cuda else 2)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    samples = a.samples or (2048 if cuda else 8)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    methods = [m for m in a.methods.split(",") if m]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, teacher = make_inputs(tmp, max(samples + samples // 8 + 2, batch + 2), a.preset, seed=0)
        for method in methods:
            results[method] = run_worker("train", {"out": str(tmp / method), "teacher": str(teacher),
                                                   "folder": str(folder), "method": method, "batch": batch,
                                                   "steps": a.steps, "warmup": warmup, "device": a.device}, threads)
            print(f"{method}: {results[method]}", file=sys.stderr)
        results["extract"] = run_worker("extract", {"out": str(tmp / "f.h5"), "teacher": str(teacher),
                                                    "folder": str(folder), "samples": samples,
                                                    "batch": a.extract_batch, "device": a.device}, threads)
        print(f"extract: {results['extract']}", file=sys.stderr)
    meta = {"device_name": device_name(a.device), "preset": a.preset, "batch": batch, "steps": a.steps,
            "warmup": warmup, "samples": samples, "extract_batch": a.extract_batch, "methods": methods}
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
