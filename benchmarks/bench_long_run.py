"""The default student's long-run curve: does its FD settle, drift or oscillate?

Trains (or reads) one ``probe train student`` run with every option at its default except the
step count, evaluation interval and checkpoint interval, then judges the FD curve over its last
half of evaluations against the floor's spread at the same sample count:

- trend = least-squares slope of FD over that window x the window's length (FD units);
- wobble = std of the residuals around that line;
- **drifting** (improving / worsening) when |trend| > 2 floor stds, **oscillating** when
  wobble > 2 floor stds, **settled** when neither (both can hold: then both are printed).

The floor comes from the run's own final ``eval.json`` (n held-out real images vs the reference,
5 resamples), the same protocol as every evaluation on the curve. One torch thread per process.

    python benchmarks/bench_long_run.py --teacher RUN --data scenes --steps 4000 --out runs/long --write
    python benchmarks/bench_long_run.py --run runs/long --write          # an existing run: tables only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

NAME = "bench_long_run"
ROOT = Path(__file__).resolve().parents[1]


def curve(run: Path) -> list[tuple[int, float]]:
    """[(step, FD)] of every evaluation in the run's metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((int(r["step"]), float(r["eval_fd"])) for r in rows if "eval_fd" in r)


def judge(points: list[tuple[int, float]], floor_std: float) -> dict:
    """Trend and wobble over the last half of the evaluations, and what they amount to (docstring rule)."""
    tail = points[len(points) // 2:]
    if len(tail) < 3:
        return {"verdict": "too few evaluations", "n_tail": len(tail)}
    steps = np.array([s for s, _ in tail], float)
    fds = np.array([f for _, f in tail], float)
    slope, intercept = np.polyfit(steps, fds, 1)
    trend = float(slope * (steps[-1] - steps[0]))
    wobble = float(np.std(fds - (slope * steps + intercept), ddof=2))
    words = []
    if abs(trend) > 2 * floor_std:
        words.append("drifting (" + ("improving" if trend < 0 else "worsening") + ")")
    if wobble > 2 * floor_std:
        words.append("oscillating")
    return {"verdict": " and ".join(words) or "settled", "trend": trend, "wobble": wobble,
            "floor_std": floor_std, "window": [int(steps[0]), int(steps[-1])], "n_tail": len(tail),
            "tail_mean": float(fds.mean()), "tail_min": float(fds.min()), "tail_max": float(fds.max())}


def train(teacher: str, data: str | None, steps: int, out: Path, eval_every: int) -> float:
    from train.student.loop import StudentConfig, train_student

    start = time.perf_counter()
    resume = (out / "state.pt").exists()
    train_student(StudentConfig(out=str(out), teacher=teacher, data=data, steps=steps, eval_every=eval_every,
                                checkpoint_every=max(eval_every, 250)), resume=resume, progress=True)
    return time.perf_counter() - start


def markdown(run: Path, points: list[tuple[int, float]], verdict: dict, final: dict, config: dict,
             teacher_fd: float | None) -> str:
    floor = final["floor"]
    data = config.get("data") or "the teacher's data set"
    lines = [f"<!-- {NAME}:start -->",
             "## The default student's long-run curve (`benchmarks/bench_long_run.py`)", "",
             f"`probe train student` with its defaults ({config['method']}, lr_g {config['lr_g']}, lr_aux "
             f"{config['lr_aux']}, batch {config['batch']}, EMA half-life {config['ema_halflife_images']:g} images) "
             f"on {data} from the teacher `{Path(config['teacher']).name}`"
             + (f" (its own FD, from its eval.json: {teacher_fd:.1f})" if teacher_fd is not None else "")
             + f", {config['steps']} steps, evaluated every {config['eval_every']} steps on the same "
             f"{config['eval_samples']} latents. Floor at n = {floor['n']}: "
             f"{floor['fd']:.2f} +- {floor['fd_std']:.2f}.",
             "", "| step | FD | step | FD | step | FD | step | FD |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cells = [f"{s} | {f:.1f}" for s, f in points]
    for i in range(0, len(cells), 4):
        row = cells[i:i + 4] + ["|"] * (4 - len(cells[i:i + 4]))
        lines.append("| " + " | ".join(row) + " |")
    best = min(points, key=lambda p: p[1])
    lines += ["", f"Best FD {best[1]:.1f} at step {best[0]}; final {points[-1][1]:.1f} at step {points[-1][0]}."]
    if "trend" in verdict:
        lines.append(f"Last half (steps {verdict['window'][0]}-{verdict['window'][1]}, {verdict['n_tail']} "
                     f"evaluations): mean {verdict['tail_mean']:.1f} (range {verdict['tail_min']:.1f}-"
                     f"{verdict['tail_max']:.1f}), trend {verdict['trend']:+.1f}, wobble {verdict['wobble']:.1f} "
                     f"against 2 floor stds = {2 * verdict['floor_std']:.1f}: **{verdict['verdict']}**.")
    else:
        lines.append(f"Verdict: {verdict['verdict']}.")
    lines += ["", "Rule: over the last half of the evaluations, trend = least-squares slope x window length, "
              "wobble = residual std; drifting when |trend| > 2 floor stds, oscillating when wobble > 2 floor "
              "stds, settled otherwise.", f"<!-- {NAME}:end -->"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="an existing student run to judge (no training)")
    parser.add_argument("--teacher", help="teacher run to train a student from")
    parser.add_argument("--data", help="real data (default: the teacher's)")
    parser.add_argument("--steps", type=int, default=4000, help="generator steps")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--out", default="runs/bench_long_run", help="where --teacher trains its student")
    parser.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()
    if bool(args.run) == bool(args.teacher):
        parser.error("give exactly one of --run or --teacher")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    run = Path(args.run or args.out)
    if args.teacher:
        train(args.teacher, args.data, args.steps, run, args.eval_every)
    config = json.loads((run / "config.json").read_text())["config"]
    final = json.loads((run / "eval.json").read_text())
    points = curve(run)
    verdict = judge(points, final["floor"]["fd_std"])
    teacher_eval = Path(config["teacher"]) / "eval.json"
    teacher_fd = json.loads(teacher_eval.read_text())["fd"] if teacher_eval.exists() else None
    text = markdown(run, points, verdict, final, config, teacher_fd)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_md import write_section

        write_section(NAME, text)


if __name__ == "__main__":
    main()
