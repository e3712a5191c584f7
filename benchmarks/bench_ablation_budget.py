"""Measure what one arm of the paper grid costs, for the runtime arithmetic in docs/verdict.md.

Trains nothing to convergence (the weights do not change the cost of a step). On one thread it
times, as the DIFFERENCE of a short and a longer run (so loading and set-up cancel out):

- teacher steps ("tiny" preset, batch 64): the teacher-kind prerequisites (full, band, single level);
- student steps (diffratio-js, batch 64, the paper grid's options, evaluation off);
- one sample-quality evaluation (500 samples: one-step generation, classifier features, FD);
- the regressed generator's pairs (18-step Heun each) and its regression steps;
- one step-0 feature extraction + CKA (analysis/step0.py) with the paper grid's [extract] options.

Each figure is given as wall seconds and as CPU seconds of this process: on a machine shared with
other jobs the wall time is inflated by the load, the CPU time much less, so CPU seconds estimate
what a quiet core takes. The load average is printed with them.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_ablation_budget.py [--student-steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from analysis.cka import cka_table
from probe.core.data import load_dataset
from probe.core.models import load_model, save_model
from probe.features.extract import extract_features
from probe.features.store import FeatureStore
from probe.quality.metrics import QualityEvaluator
from train.init import initialise_generator
from train.regress import RegressConfig, regress_generator
from train.student.loop import StudentConfig, one_step_samples, train_student
from train.teacher import TeacherConfig, train_teacher


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def per_unit(short: Clock, long: Clock, units: int) -> dict:
    return {"wall_s": round((long.wall - short.wall) / units, 4), "cpu_s": round((long.cpu - short.cpu) / units, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--student-steps", type=int, default=30)
    ap.add_argument("--regress-pairs", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-ablation-"))
    report = {"load_average_start": os.getloadavg(), "threads": torch.get_num_threads()}

    def teacher(name: str, steps: int) -> tuple[Path, Clock]:
        with Clock() as c:
            path = train_teacher(TeacherConfig(out=str(root / name), preset="tiny", steps=steps, batch=64, lr_warmup=1,
                                               checkpoint_every=steps, sample_steps=2, eval_samples=0, device="cpu"),
                                 progress=False)
        return path, c

    _, t_short = teacher("teacher-short", 5)
    t_path, t_long = teacher("teacher", 5 + args.teacher_steps)
    report["teacher_step"] = per_unit(t_short, t_long, args.teacher_steps)

    def student(name: str, steps: int) -> tuple[Path, Clock]:
        with Clock() as c:
            path = train_student(StudentConfig(out=str(root / name), teacher=str(t_path), method="diffratio-js",
                                               sigma_init=2.5, steps=steps, batch=64, eval_every=0,
                                               checkpoint_every=steps, log_every=steps, device="cpu"), progress=False)
        return path, c

    _, s_short = student("student-short", 5)
    s_path, s_long = student("student", 5 + args.student_steps)
    report["student_step"] = per_unit(s_short, s_long, args.student_steps)

    ev = QualityEvaluator("digits", n_samples=500, seed=0, progress=False)
    data = load_dataset("digits", "test")
    gen = load_model(s_path)
    z = torch.randn(500, data.channels, data.resolution, data.resolution, generator=torch.Generator().manual_seed(0))
    ev.evaluate(one_step_samples(gen.denoiser, 2.5, z, "cpu"))   # warm-up (classifier features of the reference)
    with Clock() as c:
        ev.evaluate(one_step_samples(gen.denoiser, 2.5, z, "cpu"))
    report["evaluation_500"] = {"wall_s": round(c.wall, 3), "cpu_s": round(c.cpu, 3)}

    def regress(name: str, pairs: int, steps: int) -> Clock:
        with Clock() as c:
            regress_generator(RegressConfig(out=str(root / name), teacher=str(t_path), n_pairs=pairs, n_val=8,
                                            steps=steps, batch=64, checkpoint_every=steps, log_every=steps,
                                            eval_samples=0, device="cpu"), progress=False)
        return c

    r_short, r_pairs, r_steps = regress("r1", 8, 5), regress("r2", 8 + args.regress_pairs, 5), regress("r3", 8, 25)
    report["regress_pair"] = per_unit(r_short, r_pairs, args.regress_pairs)
    report["regress_step"] = per_unit(r_short, r_steps, 20)

    opts = dict(data="digits", sigmas=(0.0, 0.5, 2.5, 10.0), n_samples=300, split="test", noise_seed=0, batch=256,
                source="denoiser", device="cpu", progress=False)
    t_feat = extract_features(str(t_path), out=str(root / "teacher.h5"), **opts)
    with Clock() as c:
        net, _ = initialise_generator("random", load_model(t_path), 0)
        save_model(root / "init", net, "generator", "digits", sigma_init=2.5)
        s_feat = extract_features(str(root / "init"), out=str(root / "init.h5"), **opts)
        with FeatureStore.open(t_feat) as a, FeatureStore.open(s_feat) as b:
            cka_table(a, b, mode="pair", estimator="debiased", n_perm=0)
    report["step0_cka_per_init"] = {"wall_s": round(c.wall, 3), "cpu_s": round(c.cpu, 3)}
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
