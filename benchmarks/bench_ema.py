"""Which average of the generator should a student report? Several EMAs of one run, side by side.

The EMA changes no training step: it only averages the weights the run visits. So one run can
carry several averages at once (half-lives with and without EDM's ramp-up, and no average at
all), each evaluated on the same latents, at the same steps, by the same evaluator as the loop's
own evaluation. Their curves then differ by the averaging alone, not by seed or by trajectory.
The track with the run's own settings must reproduce the loop's FD (``metrics.jsonl``): checked
and printed.

``teacher`` does the same for the default teacher: one run carries fixed half-lives and
half-lives that are a share of the images seen; each is scored once at the end of the run.

Per student track and data set, over seeds (one process per seed, one torch thread each):
- FD at fixed budgets, mean +- std over seeds;
- best FD and its step;
- ``bench_long_run.judge`` over the last half of the evaluations: trend and wobble against 2
  floor stds (settled / drifting / oscillating).

    python benchmarks/bench_ema.py train --teacher RUN --data scenes --steps 4000 --seed 0 --out runs/ema/scenes-0
    python benchmarks/bench_ema.py teacher --data scenes --out runs/ema/teacher
    python benchmarks/bench_ema.py tables runs/ema/scenes-* runs/ema/digits-* runs/ema/teacher --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

NAME = "bench_ema"
ROOT = Path(__file__).resolve().parents[1]
# name: (half-life in images, ramp-up ratio); "raw" = the generator's own weights, no average
TRACKS = {"raw": (0.0, 0.0), "5k": (5_000.0, 0.0), "20k": (20_000.0, 0.0), "20k-r0.05": (20_000.0, 0.05),
          "20k-r0.1": (20_000.0, 0.1), "50k-r0.1": (50_000.0, 0.1)}
BUDGETS = (200, 400, 1000, 2000, 4000)  # steps at which the table shows FD (those a run reaches)
# the teacher's averages: fixed half-lives, and half-lives that are a fixed share of the images seen
# (EDM's ramp-up with no cap), which scale with the run's length by themselves
TEACHER_TRACKS = {"12.5k": (12_500.0, 0.0), "25k": (25_000.0, 0.0), "50k": (50_000.0, 0.0),
                  "share 0.15": (float("inf"), 0.15), "share 0.3": (float("inf"), 0.3)}


def start_tracks(tracks: dict, net) -> dict:
    """One EMA per averaged track (all but "raw"), each starting from ``net``'s weights, as the loop's own does."""
    from probe.core.ema import EMA

    return {name: EMA(net, halflife) for name, (halflife, _) in tracks.items() if name != "raw"}


def update_tracks(emas: dict, tracks: dict, step: int, net, batch: int) -> None:
    """After step ``step``: every average moves towards ``net`` with its own (ramped) half-life."""
    from probe.core.ema import rampup_halflife

    for name, ema in emas.items():
        halflife, rampup = tracks[name]
        ema.halflife_images = rampup_halflife(halflife, rampup, step * batch)
        ema.update(net, batch)


def train(teacher: str, data: str | None, steps: int, seed: int, eval_every: int, out: Path,
          **overrides) -> Path:
    """One default student run that also keeps every track of TRACKS; writes ``tracks.json`` into it.

    ``overrides``: other StudentConfig fields (tests use a small batch and few samples)."""
    import torch

    from probe.core.models import load_model
    from probe.quality.metrics import QualityEvaluator
    from train.student.loop import StudentConfig, one_step_samples, train_student

    cfg = StudentConfig(out=str(out), teacher=teacher, data=data, steps=steps, seed=seed, eval_every=eval_every,
                        checkpoint_every=steps, **overrides)
    model = load_model(teacher)
    dataset = data or model.dataset  # what the loop evaluates on (train/student/loop.py: _data_for)
    evaluator = QualityEvaluator(dataset, n_samples=cfg.eval_samples, seed=cfg.eval_seed)
    shape = (model.channels, model.resolution, model.resolution)
    del model
    # the loop's own evaluation latents (train/student/loop.py), so the "own" track can be checked against it
    z = torch.randn((max(cfg.eval_samples, 64), *shape), generator=torch.Generator().manual_seed(cfg.eval_seed))
    z = z[:cfg.eval_samples]
    emas: dict = {}
    curves: dict[str, list] = {name: [] for name in TRACKS}

    def fd(net) -> float:
        return float(evaluator.evaluate(one_step_samples(net, cfg.sigma_init, z, "cpu"))["fd"])

    def observe(step: int, net) -> None:
        if step == 0:  # the initial generator: every average starts from it, so one score serves all tracks
            emas.update(start_tracks(TRACKS, net))
            start = fd(next(iter(emas.values())).net)  # an average's copy: in eval mode, like the loop's own
            for name in TRACKS:
                curves[name].append([0, start])
            return
        update_tracks(emas, TRACKS, step, net, cfg.batch)
        if step % eval_every == 0 or step == steps:
            for name in TRACKS:
                curves[name].append([step, fd(net if name == "raw" else emas[name].net)])

    train_student(cfg, progress=True, on_step=observe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    own = {int(r["step"]): float(r["eval_fd"]) for r in rows if "eval_fd" in r}
    own_name = next((n for n, (h, r) in TRACKS.items() if (h, r) == (cfg.ema_halflife_images, cfg.ema_rampup)), None)
    check = (max(abs(own[s] - f) for s, f in curves[own_name]) if own_name else None)
    final = json.loads((out / "eval.json").read_text())
    record = {"data": dataset,
              "teacher": teacher, "seed": seed, "steps": steps, "eval_every": eval_every, "batch": cfg.batch,
              "eval_samples": cfg.eval_samples, "floor": final["floor"], "tracks": TRACKS, "curves": curves,
              "own_track": own_name, "own_track_max_abs_diff": check}
    (out / "tracks.json").write_text(json.dumps(record, indent=1))
    print(f"track {own_name} vs the loop's own FD: max |difference| {check}")
    return out


def train_teacher_tracks(data: str, out: Path, n_samples: int, sample_steps: int = 18, **overrides) -> dict:
    """The default teacher on ``data``, keeping every average of TEACHER_TRACKS; each is scored at the end.

    Every track samples the same latents with the same Heun sampler and is scored by one evaluator
    (n_samples images against its reference, plus the floor); writes ``teacher_tracks.json``."""
    import torch

    from probe.core.data import load_dataset
    from probe.core.edm import heun_sample
    from probe.quality.metrics import QualityEvaluator
    from train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(out=str(out), data=data, eval_samples=0, **overrides)
    assert cfg.steps is not None
    emas: dict = {}

    def observe(step: int, net) -> None:
        if step == 0:
            emas.update(start_tracks(TEACHER_TRACKS, net))
        else:
            update_tracks(emas, TEACHER_TRACKS, step, net, cfg.batch)

    real = load_dataset(data, "train")
    start = time.perf_counter()
    train_teacher(cfg, progress=True, on_step=observe)
    train_s = time.perf_counter() - start
    evaluator = QualityEvaluator(data, n_samples=n_samples, seed=0)
    z = torch.randn((n_samples, real.channels, real.resolution, real.resolution),
                    generator=torch.Generator().manual_seed(1))
    scores = {}
    from probe.core.models import save_model

    for name, ema in emas.items():
        # each average as a loadable teacher (load_model), so it can be scored again or trained from
        save_model(out / "tracks" / name.replace(" ", "-"), ema.net, "teacher", data,
                   extra={"steps": cfg.steps, "ema_track": name})
        with torch.no_grad():
            x = torch.cat([heun_sample(ema.net.eval(), zb, sample_steps) for zb in z.split(500)])
        scores[name] = {k: v for k, v in evaluator.evaluate(x).items() if isinstance(v, (int, float))}
        print(name, {k: round(v, 3) for k, v in scores[name].items()}, flush=True)
    from probe.core.models import load_model

    # the loop's own average (saved in the run) must be the 12.5k track: same weights, same samples
    own = load_model(out).denoiser
    own_diff = max(float((a - b).abs().max()) for a, b in zip(own.state_dict().values(),
                                                              emas["12.5k"].net.state_dict().values()))
    record = {"data": data, "steps": cfg.steps, "batch": cfg.batch, "train_seconds": train_s,
              "sample_steps": sample_steps, "n_samples": n_samples, "tracks": TEACHER_TRACKS, "scores": scores,
              "floor": evaluator.floor(), "own_track": "12.5k", "own_track_max_abs_weight_diff": own_diff}
    (out / "teacher_tracks.json").write_text(json.dumps(record, indent=1))
    print(f"track 12.5k vs the run's saved EMA: max |weight difference| {own_diff}")
    return record


def summarise(records: list[dict]) -> dict:
    """Per track: FD at each budget (mean, std over seeds), best, and the last-half judgement per seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_long_run import judge

    floor_std = float(np.mean([r["floor"]["fd_std"] for r in records]))
    out = {}
    for name in records[0]["curves"]:
        per_seed = [dict(map(tuple, r["curves"][name])) for r in records]
        at = {}
        for b in (*BUDGETS, records[0]["steps"]):
            vals = [c[b] for c in per_seed if b in c]
            if len(vals) == len(per_seed):
                at[b] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        best = [min(c.values()) for c in per_seed]
        judged = [judge(sorted(c.items()), floor_std) for c in per_seed]
        nan = float("nan")  # too few evaluations to judge: no trend, wobble or tail
        out[name] = {"at": at, "best": (float(np.mean(best)), float(np.std(best, ddof=1)) if len(best) > 1 else 0.0),
                     "tail_mean": float(np.mean([j.get("tail_mean", nan) for j in judged])),
                     "wobble": [j.get("wobble", nan) for j in judged], "trend": [j.get("trend", nan) for j in judged],
                     "verdicts": [j["verdict"] for j in judged]}
    return {"floor_std": floor_std, "tracks": out}


def teacher_markdown(record: dict) -> list[str]:
    """The teacher's averages, one row each, scored once at the end of the run."""
    floor = record["floor"]
    lines = [f"### The default teacher on {record['data']}: {record['steps']} steps of {record['batch']}, one run, "
             f"each average scored once at the end (Heun-{record['sample_steps']}, n = {record['n_samples']}, the "
             f"same latents; floor FD {floor['fd']:.2f} +- {floor['fd_std']:.2f}, precision "
             f"{floor['precision']:.3f})", "",
             f"The `{record['own_track']}` track against the run's own saved average: max |weight difference| "
             f"{record['own_track_max_abs_weight_diff']:.2g}. Training took {record['train_seconds']:.0f} s "
             "(one thread, beside other jobs).", "",
             "| average | half-life at the end (images) | FD | KID | FD-infinity | precision | recall | coverage |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    images = record["steps"] * record["batch"]
    for name, (halflife, rampup) in record["tracks"].items():
        s = record["scores"][name]
        end = min(halflife, images * rampup) if rampup > 0 else halflife
        label = f"{halflife:g}" if rampup <= 0 else f"{rampup:g} x images seen"
        lines.append(f"| {label} | {end:,.0f} | {s['fd']:.2f} | {s['kid']:.2f} | {s['fd_inf']:.2f} | "
                     f"{s['precision']:.3f} | {s['recall']:.3f} | {s['coverage']:.2f} |")
    return lines + [""]


def markdown(groups: dict[str, list[dict]], teachers: list[dict] | None = None) -> str:
    lines = [f"<!-- {NAME}:start -->", "## Which EMA should the student report? (`benchmarks/bench_ema.py`)", "",
             "One default `probe train student` run per seed carries every average below at once (same trajectory, "
             "same latents, same evaluator, n = eval samples); the averages differ by half-life (images) and "
             "EDM's ramp-up (half-life <= ratio x images seen). Cells: FD mean +- std over seeds. Last half: mean "
             "FD, and trend / wobble per seed against 2 floor stds (`bench_long_run.judge`).", ""]
    for data, records in groups.items():
        s = summarise(records)
        steps = records[0]["steps"]
        budgets = [b for b in BUDGETS if b < steps] + [steps]  # and the end of the run
        checks = [r["own_track_max_abs_diff"] for r in records]
        lines += [f"### {data}: {len(records)} seeds ({', '.join(str(r['seed']) for r in records)}), {steps} steps, "
                  f"batch {records[0]['batch']}, evaluated every {records[0]['eval_every']} steps at n = "
                  f"{records[0]['eval_samples']}; floor std {s['floor_std']:.2f}, so 2 floor stds = "
                  f"{2 * s['floor_std']:.2f}", "",
                  f"The `{records[0]['own_track']}` track (the run's own setting) against the loop's own FD: max "
                  f"|difference| {max(checks):.2g} over seeds.", "",
                  "| average | " + " | ".join(f"FD @ {b}" for b in budgets)
                  + " | best | last-half mean | trend per seed | wobble per seed | verdicts |",
                  "|---|" + "---:|" * (len(budgets) + 5)]
        for name, t in s["tracks"].items():
            halflife, rampup = TRACKS[name]
            label = "raw (no EMA)" if name == "raw" else f"{halflife:g}" + (f", ramp-up {rampup:g}" if rampup else "")
            cells = [f"{t['at'][b][0]:.1f} +- {t['at'][b][1]:.1f}" if b in t["at"] else "-" for b in budgets]
            lines.append(f"| {label} | " + " | ".join(cells)
                         + f" | {t['best'][0]:.1f} +- {t['best'][1]:.1f} | {t['tail_mean']:.1f} | "
                         + ", ".join(f"{v:+.1f}" for v in t["trend"]) + " | "
                         + ", ".join(f"{v:.1f}" for v in t["wobble"]) + " | " + " / ".join(t["verdicts"]) + " |")
        lines.append("")
    for record in teachers or []:
        lines += teacher_markdown(record)
    lines.append(f"<!-- {NAME}:end -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one seed: train a default student and keep every average")
    t.add_argument("--teacher", required=True)
    t.add_argument("--data", help="real data (default: the teacher's)")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--out", required=True)
    te = sub.add_parser("teacher", help="the default teacher with several averages, each scored at the end")
    te.add_argument("--data", default="scenes")
    te.add_argument("--n", type=int, default=2000, help="samples per score")
    te.add_argument("--out", required=True)
    m = sub.add_parser("tables", help="merge runs (grouped by data set) into the RESULTS section")
    m.add_argument("runs", nargs="+")
    m.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.cmd == "train":
        import torch

        torch.set_num_threads(1)
        train(args.teacher, args.data, args.steps, args.seed, args.eval_every, Path(args.out))
        return
    if args.cmd == "teacher":
        import torch

        torch.set_num_threads(1)
        train_teacher_tracks(args.data, Path(args.out), args.n)
        return
    groups: dict[str, list[dict]] = {}
    teachers = []
    for run in map(Path, args.runs):
        if (run / "teacher_tracks.json").exists():
            teachers.append(json.loads((run / "teacher_tracks.json").read_text()))
            continue
        record = json.loads((run / "tracks.json").read_text())
        groups.setdefault(str(record["data"]), []).append(record)
    text = markdown(groups, teachers)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_md import write_section

        write_section(NAME, text)


if __name__ == "__main__":
    main()
