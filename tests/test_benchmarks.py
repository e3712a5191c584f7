"""The benchmark drivers: measurement helpers, summaries, successive halving, and the --dry-run paths."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_methods as bm  # noqa: E402
import bench_quality as bq  # noqa: E402

RESULTS = BENCH / "RESULTS.md"


def _speed_run(step_s, peak, after=400.0, aux=10):
    return {"step_s": step_s, "step_cpu_s": [t / 2 for t in step_s], "peak_rss_mib": peak, "after_imports_mib": after,
            "aux_parameters": aux, "threads": 1}


# ------------------------------------------------------------------------ pure helpers
def test_speed_summary_medians_ratios_flags_and_utilisation():
    raw = {"matmul": [{"peak_gflops": g, "peak_gflops_cpu": 2 * g} for g in (10.0, 20.0, 12.0)],
           "runs": {"tiny": {
               # steady: per-round medians 1.0, 1.1, 1.05 -> spread 0.1/1.05 < 20%
               "diffratio-js": [_speed_run([1.0, 1.0, 9.0], 500), _speed_run([1.1], 520), _speed_run([1.05], 510)],
               # noisy: 2, 3, 2 -> spread 0.5 > 20%
               "vsd": [_speed_run([2.0], 600), _speed_run([3.0], 600), _speed_run([2.0], 600)],
               "vsd@before": [_speed_run([4.0], 600), _speed_run([6.0], 600), _speed_run([4.0], 600)]}},
           "flops": {"tiny": {"diffratio-js": {"flops_per_step": 6e9}, "vsd": {"flops_per_step": 10e9}}}}
    s = bm.summarise_speed(raw)
    assert s["matmul_gflops"] == 12.0 and s["matmul_range"] == (10.0, 20.0)
    js, vsd, before = (s["sizes"]["tiny"][k] for k in ("diffratio-js", "vsd", "vsd@before"))
    assert js["step_s"] == pytest.approx(1.05) and not js["flag"]      # median of rounds, not of all steps
    assert vsd["step_s"] == 2.0 and vsd["flag"] and vsd["step_spread"] == pytest.approx(0.5)
    assert js["step_vs_vsd"] == pytest.approx(1.05 / 2.0) and js["cpu_vs_vsd"] == pytest.approx(1.05 / 2.0)
    assert js["cpu_s"] == pytest.approx(1.05 / 2) and vsd["cpu_flag"]
    assert js["peak_vs_vsd"] == pytest.approx(510 / 600)
    assert js["over_imports_vs_vsd"] == pytest.approx((510 - 400) / (600 - 400))
    assert js["gflops"] == pytest.approx(6 / 1.05) and js["utilisation"] == pytest.approx(6 / 1.05 / 12.0)
    assert js["utilisation_cpu"] == pytest.approx(6 / (1.05 / 2) / 24.0)   # CPU seconds against the CPU peak
    assert before["paired_variant_over_base"] == pytest.approx(2.0)   # 4/2, 6/3, 4/2 round by round
    assert before["step_vs_vsd"] == 1.0                                # variants compare with vsd@variant
    text = bm.render_speed({**raw, "loads": [1.0, 3.0], "meta": {
        "date": "d", "minutes": 1, "cpu": "cpu", "cpus": 2, "torch": "t", "threads": 1, "data": "digits", "batch": 4,
        "teacher": None, "teacher_size": "tiny", "rounds": 3, "timed_steps": 1, "warmup": 1,
        "matmul_sizes": [64], "compare_src": "/src", "note": ""}}, s)
    assert "| vsd ! |" in text and "| diffratio-js |" in text and "Before/after on `tiny`" in text
    assert "| vsd | 4000 | 2000 | 0.500 | 0.50-0.50 | 2000 | 1000 | 0.500 |" in text


def test_threshold_hits_take_the_first_evaluation_at_or_below_each_target():
    evals = [{"step": 0, "seconds": 0.0, "eval_fd": 50.0}, {"step": 100, "seconds": 9.0, "eval_fd": 14.0},
             {"step": 200, "seconds": 18.0, "eval_fd": 11.0}, {"step": 300, "seconds": 27.0, "eval_fd": 12.0}]
    hits = bq.threshold_hits(evals, {"1.5x": 15.0, "1.1x": 11.0, "1.0x": 10.0})
    assert hits == {"1.5x": {"step": 100, "seconds": 9.0}, "1.1x": {"step": 200, "seconds": 18.0}, "1.0x": None}


def test_sweep_grid_and_rungs():
    grid = bq.sweep_settings("sid", [1e-4, 2e-4], [1e-4, 2e-4, 4e-4], bq.KEY_OPTIONS)
    assert len(grid) == 2 * 3 * len(bq.KEY_OPTIONS["sid"][1]) and {"sid_alpha"} < set(grid[0])
    assert len(bq.sweep_settings("diffratio-js", [1e-4], [1e-4, 2e-4], bq.KEY_OPTIONS)) == 2
    assert bq.rung_steps(200, 9, 3, chunk=100) == [200, 600]           # 9 -> 3 settings
    assert bq.rung_steps(200, 18, 3, chunk=100) == [200, 600, 1800]    # 18 -> 6 -> 2
    assert bq.rung_steps(150, 18, 3, chunk=100) == [200, 500, 1400]    # rounded up to checkpoint chunks
    assert bq.rung_steps(200, 1, 3, chunk=100) == [200]


def test_successive_halving_keeps_the_best_third_and_picks_the_winner():
    # FD of setting i after s steps: 4, 7 and 0 lead after 100 steps, then 7 overtakes 4
    def fd(i, steps):
        if steps < 300:
            return {4: 1.0, 7: 2.0, 0: 3.0}.get(i, 10.0 + i)
        return {4: 9.0, 7: 5.0}.get(i, 20.0 + i)

    calls = []

    class FakeStudy:
        def run(self, method, setting, seed, stop_step, stop_at_targets, budget):
            calls.append((setting["i"], stop_step))
            return {"best_fd": fd(setting["i"], stop_step)}

    settings = [{"i": i} for i in (4, 7, 0, 1, 2, 3, 5, 6, 8)]
    sw = bq.successive_halving(FakeStudy(), "m", settings, [100, 300], eta=3, clock="steps")
    survivors = [i for i, s in calls if s == 300]
    assert sorted(survivors) == [0, 4, 7] and sw["best_setting"] == {"i": 7}
    assert len(calls) == 9 + 3


def test_sweep_on_the_seconds_clock_judges_a_costlier_setting_at_equal_time():
    # aux_steps=2 costs 2 s per step against 1 s and learns more per step (FD 100 - 0.3 x step against
    # 100 - 0.2 x step): at equal steps it wins, at equal seconds (the table's clock) the cheap one does
    cost = {1: 1.0, 2: 2.0}
    slope = {1: 0.2, 2: 0.3}

    class FakeStudy:
        def run(self, method, setting, seed, stop_step, stop_at_targets, budget):
            a = setting["aux_steps"]
            evals = [{"step": s, "seconds": s * cost[a], "fd": 100 - slope[a] * s}
                     for s in range(50, stop_step + 1, 50)]
            return {"evals": evals, "best_fd": evals[-1]["fd"], "train_s": evals[-1]["seconds"]}

    settings = [{"lr_g": 1e-4, "lr_aux": 1e-4, "aux_steps": a} for a in (1, 2)]
    by_steps = bq.successive_halving(FakeStudy(), "vsd", settings, [200], eta=3, clock="steps")
    assert by_steps["best_setting"]["aux_steps"] == 2 and by_steps["seconds"] == {}
    by_time = bq.successive_halving(FakeStudy(), "vsd", settings, [200], eta=3)
    assert by_time["clock"] == "seconds" and by_time["seconds"] == {200: pytest.approx(220.0)}  # 200 s + 10%
    # the cheap setting at step 200 (200 s): 60; the costly one reached step 110 in 220 s: FD 67, read off
    # the line between its evaluations at step 100 (200 s, 70) and 150 (300 s, 55)
    assert by_time["fd"] == {"0": {200: pytest.approx(60.0)}, "1": {200: pytest.approx(67.0)}}
    assert by_time["best_setting"]["aux_steps"] == 1
    assert by_time["judged_at"] == {"0": {200: 200}, "1": {200: pytest.approx(110)}}
    # an edge try is held to the same time limit: lr_g doubled, same cost, scored within 220 s
    bq.extend_at_edges(FakeStudy(), "vsd", by_time, {"lr_g": [5e-5, 1e-4]}, limit=1)
    assert by_time["edge"][0]["fd"] == {200: pytest.approx(60.0)} and not by_time["edge"][0]["adopted"]
    with pytest.raises(ValueError, match="clock"):
        bq.successive_halving(FakeStudy(), "vsd", settings, [200], eta=3, clock="minutes")


def test_fd_within_reads_between_evaluations_so_timing_noise_does_not_cost_an_interval():
    # two runs of equal cost; the second needed 2% more seconds (noise) than the limit for its last
    # evaluation: it is judged almost at that evaluation, not a whole interval (100 steps) earlier
    fast = {"evals": [{"step": 0, "seconds": 0.0, "fd": 400.0}, {"step": 100, "seconds": 50.0, "fd": 120.0},
                      {"step": 200, "seconds": 100.0, "fd": 80.0}]}
    slow = {"evals": [{"step": 0, "seconds": 0.0, "fd": 400.0}, {"step": 100, "seconds": 56.0, "fd": 120.0},
                      {"step": 200, "seconds": 112.2, "fd": 70.0}]}
    fd, step = bq.fd_within(slow, 110.0)
    assert step == pytest.approx(100 + 100 * 54 / 56.2) and fd == pytest.approx(120 - 50 * 54 / 56.2)
    assert fd < bq.fd_within(fast, 110.0)[0]  # slow's better curve still wins, as it would at equal steps
    assert bq.fd_within(fast, 110.0) == (80.0, 200.0)  # ended inside the limit: its last evaluation
    # the best evaluation inside the limit counts even when the line to the next one rises
    worse_after = {"evals": [{"step": 100, "seconds": 50.0, "fd": 60.0}, {"step": 200, "seconds": 100.0, "fd": 90.0}]}
    assert bq.fd_within(worse_after, 75.0) == (60.0, 150.0)
    assert bq.fd_within(worse_after, 10.0) == (math.inf, 0.0)


# ------------------------------------------------------------------ workers, in process
def test_flops_per_step_scale_with_batch_and_method(tiny_teacher, tmp_path):
    common = dict(teacher=str(tiny_teacher), threads=1, seed=0)
    js4 = bm.worker_flops({**common, "method": "diffratio-js", "batch": 4, "out": str(tmp_path / "a")})
    js8 = bm.worker_flops({**common, "method": "diffratio-js", "batch": 8, "out": str(tmp_path / "b")})
    vsd8 = bm.worker_flops({**common, "method": "vsd", "batch": 8, "out": str(tmp_path / "c")})
    assert js4["flops_per_step"] > 0
    assert js8["flops_per_step"] == pytest.approx(2 * js4["flops_per_step"], rel=0.02)  # linear in the batch
    # vsd: generator fwd+bwd, fake-score fwd+bwd, teacher and fake-score forwards: more than the classifier
    assert vsd8["flops_per_step"] > js8["flops_per_step"]


def test_speed_worker_reports_per_step_times(tiny_teacher, tmp_path):
    r = bm.worker_speed({"teacher": str(tiny_teacher), "method": "gan", "batch": 4, "threads": 1, "seed": 0,
                         "dataset": "digits", "warmup": 1, "timed_steps": 2, "out": str(tmp_path / "s")})
    assert len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
    # CPU seconds of the same steps: found for every step, never more than its wall time (one thread)
    assert all(c is not None and 0 < c <= 1.05 * t for c, t in zip(r["step_cpu_s"], r["step_s"]))
    assert r["hwm_mib"] >= r["after_imports_mib"] > 0 and r["threads"] == 1 and r["aux_parameters"] > 0


def test_run_worker_measures_the_child_and_honours_its_timeout():
    r = bm.run_worker("matmul", {"threads": 1, "sizes": [64], "repeats": 2, "flop_per_timing": 1e6})
    assert r["peak_gflops"] > 0 and r["peak_rss_mib"] > 10   # the child's own ru_maxrss
    with pytest.raises(TimeoutError):
        bm.run_worker("matmul", {"threads": 1, "sizes": [2048], "repeats": 50, "flop_per_timing": 1e12},
                      timeout=0.5)


# ----------------------------------------------------------------------- dry-run CLIs
@pytest.mark.slow
def test_quality_dry_run_sweeps_then_resumes_from_its_work_dir(tiny_teacher, tmp_path, capsys):
    before = RESULTS.read_text()
    argv = ["--dry-run", "--teacher", str(tiny_teacher), "--methods", "diffratio-js,vsd", "--seeds", "0,1",
            "--sweep", "--sweep-lr-g", "1e-4,2e-4", "--sweep-lr-aux", "1e-4", "--sweep-key", "vsd:aux_steps=1",
            "--settings", "vsd:sigma_dist=karras",   # held fixed under the sweep
            "--work-dir", str(tmp_path / "w"), "--json", str(tmp_path / "q.json")]
    bq.main(argv)
    first = capsys.readouterr().out
    q = json.loads((tmp_path / "q.json").read_text())
    assert set(q["runs"]) == {"diffratio-js", "vsd"} and [r["seed"] for r in q["runs"]["vsd"]] == [0, 1]
    assert set(q["targets"]) == {"1.5x", "1.1x"}
    assert q["targets"]["1.1x"] == pytest.approx(1.1 * q["teacher_fd"])
    for runs in q["runs"].values():
        for r in runs:
            assert r["evals"][0]["step"] == 0 and r["evals"][-1]["step"] == r["last_step"] <= 3
            assert [e["step"] for e in r["evals"]] == sorted(e["step"] for e in r["evals"])
            assert r["eval_s"] > 0   # evaluation time, measured apart from the training seconds
    assert q["sweeps"]["diffratio-js"]["rungs"] == [1] and len(q["sweeps"]["diffratio-js"]["settings"]) == 2
    assert all(st["sigma_dist"] == "karras" for st in q["sweeps"]["vsd"]["settings"])
    assert all(r["setting"]["sigma_dist"] == "karras" for r in q["runs"]["vsd"])
    assert "sigma_dist" not in q["runs"]["diffratio-js"][0]["setting"]
    assert q["meta"]["sweep_clock"] == "seconds" and set(q["sweeps"]["vsd"]["seconds"]) == {"1"}  # JSON keys
    assert "within the rung's training seconds" in first and " (step " in first.split("vsd:")[1]
    assert "## One-step methods: time to quality" in first
    assert "**(chosen)**" in first or "(beyond the edge; **chosen**)" in first   # a grid winner, or one past its edge
    results = sorted((tmp_path / "w" / "results").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    bq.main(argv)   # everything cached: no run repeats, same table
    assert capsys.readouterr().out.split("| method |")[1] == first.split("| method |")[1]
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert RESULTS.read_text() == before   # a dry run writes nothing it was not asked to


@pytest.mark.slow
def test_quality_run_in_a_fresh_worker_process_is_cached(tiny_teacher, tmp_path):
    # the long runs and the sweep train in a child `bench_quality.py --worker quality`, as a user's study does
    base = dict(teacher=str(tiny_teacher), batch=4, threads=1, device="cpu", eval_every=1, evals_per_chunk=1,
                eval_samples=16, max_steps=2, targets={"1.5x": 1e9})
    study = bq.Study(tmp_path / "w", base, inprocess=False)
    res = study.run("diffratio-js", {"lr_g": 1e-4}, 0, 2, stop_at_targets=False, budget=float("inf"))
    assert [e["step"] for e in res["evals"]] == [0, 1, 2] and res["peak_rss_mib"] > 0   # measured in the child
    assert res["hits"]["1.5x"] == {"step": 0, "seconds": 0.0}
    cached = sorted((tmp_path / "w" / "results").glob("*.json"))
    assert [p.name for p in cached] == ["diffratio-js_lr_g=0.0001_seed0-2.json"]
    assert study.run("diffratio-js", {"lr_g": 1e-4}, 0, 2, stop_at_targets=False, budget=float("inf")) == res


def test_quality_sweep_refuses_settings_that_fix_what_it_sweeps():
    for fixed in ("vsd:lr_g=1e-4", "vsd:aux_steps=2", "sid:sid_alpha=1"):
        with pytest.raises(SystemExit, match="which --sweep chooses"):
            bq.main(["--dry-run", "--sweep", "--settings", fixed])


@pytest.mark.slow
def test_speed_dry_run_cli(tmp_path):
    before = RESULTS.read_text()
    out = subprocess.run([sys.executable, str(BENCH / "bench_methods.py"), "speed", "--dry-run", "--methods",
                          "diffratio-js", "--json", str(tmp_path / "s.json")], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    raw = json.loads((tmp_path / "s.json").read_text())
    runs = raw["runs"]["test"]["diffratio-js"]
    assert len(runs) == 2 and all(r["peak_rss_mib"] > r["after_imports_mib"] > 0 for r in runs)
    assert raw["flops"]["test"]["diffratio-js"]["flops_per_step"] > 0 and len(raw["matmul"]) == 2
    assert "### UNet `test`" in out.stdout and "| diffratio-js" in out.stdout
    assert RESULTS.read_text() == before


def test_memory_dry_run_cli_and_training_state(tmp_path):
    from bench_methods import training_state_mib

    # generator x5 (weights, gradient, 2 Adam moments, EMA), aux x4, teacher x1 when kept; float32
    assert training_state_mib(2 ** 20, 2 ** 19, True) == 4 * (5 + 2 + 1)
    assert training_state_mib(2 ** 20, 0, False) == 20
    before = RESULTS.read_text()
    out = subprocess.run([sys.executable, str(BENCH / "bench_methods.py"), "memory", "--dry-run",
                          "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["diffratio-js", "vsd"]
    assert [r["uses_teacher"] for r in rows] == [False, True]
    assert all(r["peak_rss_mib"] > r["after_imports_mib"] > 0 for r in rows)
    assert "### `test`" in out.stdout and "| vsd |" in out.stdout and "| 1.00x |" in out.stdout
    assert RESULTS.read_text() == before


@pytest.mark.slow
def test_gpu_bench_dry_run_on_cpu(tmp_path):
    before = RESULTS.read_text()
    out = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--dry-run", "--methods", "diffratio-js,vsd",
                          "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    g = json.loads((tmp_path / "g.json").read_text())
    for m in ("diffratio-js", "vsd"):
        r = g["results"]["train"][m]
        assert r["img_per_s"] > 0 and r["peak_mib"] > 0
        q = g["results"]["ttq"]["results"][m]
        assert q["evals"] and set(q["hits"]) == {"1.5x", "1.1x"} and q["eval_s"] > 0
    assert g["results"]["extract"]["img_per_s"] > 0 and g["meta"]["dry_run"]
    assert "## GPU check" in out.stdout and "| diffratio-js | no |" in out.stdout
    assert RESULTS.read_text() == before


def test_factor_heads_table_places_each_change_in_floor_stds():
    import bench_factor_heads as fh
    import torch

    img = torch.zeros(2, 3, 16, 16)
    img[:, :, 2:14, 2:14] = 1.0
    assert fh.zoom(img).shape == img.shape and bool((fh.zoom(img) == 1).all())  # the crop fills the frame
    row = {"data": "shapes", "classifier": "factor heads", "n": 2000, "pool": 3000, "floor": 1.25, "floor_std": 0.25,
           "clean": 1.5, "rgb": 16.25, "zoom": 201.25, "heads": {"label": 1.0, "size": None}, "train_s": 20.0}
    text = fh.render([row])
    assert "| shapes | factor heads | 2000 / 3000 | 1.25 +- 0.25 | 1.50 (+1) | 16.25 (+60) | 201.2 (+800) |" in text
    assert "label 1.000, size -" in text and text.startswith("<!-- bench_factor_heads:start -->")


def test_ratio_to_vsd_is_a_bound_when_vsd_misses_the_threshold_in_some_seeds():
    def run(seconds, train_s):
        return {"hits": {"1.1x": {"step": 1, "seconds": seconds} if seconds is not None else None}, "train_s": train_s}

    assert bq.vsd_ratio([50.0], [run(100.0, 300.0), run(100.0, 300.0)], "1.1x") == "0.50x"
    # one VSD seed never reached it in 200 s: VSD's mean is at least (100 + 200) / 2, the ratio at most 50 / 150
    assert bq.vsd_ratio([50.0], [run(100.0, 300.0), run(None, 200.0)], "1.1x") == "< 0.33x (vsd 1/2)"
    assert bq.vsd_ratio([50.0], [run(None, 200.0)], "1.1x") == "< 0.25x (vsd 0/1)"
    assert bq.vsd_ratio([50.0], None, "1.1x") == "-"


def test_a_winner_on_the_grid_edge_is_tried_beyond_it():
    # best FD at the last rung falls with lr_g up to 8e-4 and rises after; lr_aux's optimum is inside the grid
    def fd(setting):
        return abs(setting["lr_g"] - 8e-4) * 1e4 + abs(setting["lr_aux"] - 1e-4) * 1e4

    calls = []

    class FakeStudy:
        def run(self, method, setting, seed, stop_step, stop_at_targets, budget):
            calls.append((dict(setting), stop_step, seed))
            return {"best_fd": fd(setting)}

    grid = {"lr_g": [5e-5, 1e-4, 2e-4], "lr_aux": [5e-5, 1e-4, 2e-4]}
    settings = bq.sweep_settings("m", grid["lr_g"], grid["lr_aux"], {})
    sw = bq.successive_halving(FakeStudy(), "m", settings, [50, 150], eta=3, clock="steps")
    assert sw["best_setting"] == {"lr_g": 2e-4, "lr_aux": 1e-4}          # the top edge of lr_g
    calls.clear()
    bq.extend_at_edges(FakeStudy(), "m", sw, grid, limit=3)
    tried = [t["setting"]["lr_g"] for t in sw["edge"]]
    assert tried == pytest.approx([4e-4, 8e-4, 1.6e-3])                   # doubled until it stops helping
    assert [t["adopted"] for t in sw["edge"]] == [True, True, False]
    assert sw["best_setting"] == pytest.approx({"lr_g": 8e-4, "lr_aux": 1e-4})
    assert all(seed == 0 for _, _, seed in calls) and {s for _, s, _ in calls} == {50, 150}  # every rung, seed 0
    text = bq.render_quality({"meta": {"teacher": "t", "teacher_steps": 18, "eval_samples": 500, "eval_every": 50,
                                       "budget": 200.0, "max_steps": 1000, "seeds": [0], "cpu": "c", "cpus": 2,
                                       "threads": 1, "torch": "x", "load": 0.0, "sweep_s": 60.0, "long_s": 60.0,
                                       "batch": 64, "eta": 3},
                              "targets": {"1.5x": 18.0}, "teacher_fd": 12.0, "runs": {}, "sweeps": {"m": sw}})
    assert "lr_g=0.0008, lr_aux=0.0001 (beyond the edge; **chosen**)" in text and "(chosen)**" not in text
    # a winner inside the grid is left alone
    inside = {"settings": [{"lr_g": 1e-4, "lr_aux": 1e-4}], "rungs": [50], "fd": {"0": {50: 1.0}}, "best": 0,
              "best_setting": {"lr_g": 1e-4, "lr_aux": 1e-4}}
    bq.extend_at_edges(FakeStudy(), "m", inside, {"lr_g": [5e-5, 1e-4, 2e-4]})
    assert inside["edge"] == [] and inside["best_setting"] == {"lr_g": 1e-4, "lr_aux": 1e-4}


def test_quality_settings_are_parsed_named_and_kept_apart_from_a_sweep(tiny_teacher, tmp_path):
    fixed = bq.parse_settings("diffratio-js:lr_g=2e-4,lr_aux=2e-4; vsd:lr_aux=1e-4,aux_steps=2")
    assert fixed == {"diffratio-js": {"lr_g": 2e-4, "lr_aux": 2e-4}, "vsd": {"lr_aux": 1e-4, "aux_steps": 2}}
    assert isinstance(fixed["vsd"]["aux_steps"], int) and bq.parse_settings("") == {}
    assert bq.parse_settings("vsd:sigma_dist=karras,lr_g=1e-4") == {"vsd": {"sigma_dist": "karras", "lr_g": 1e-4}}
    for bad in ("vds:lr_g=1e-4", "vsd", "vsd:lr_g"):
        with pytest.raises(SystemExit, match="--settings"):
            bq.parse_settings(bad)
    # each data set has its own RESULTS.md section; digits keeps the name its table was written under
    assert bq.teacher_data(tiny_teacher) == "digits" and bq.teacher_data(tiny_teacher / "unet") == "digits"  # no record
    from probe.core.models import load_model, save_model

    save_model(tmp_path / "t", load_model(tiny_teacher).denoiser, "teacher", "scenes")
    assert bq.teacher_data(tmp_path / "t") == "scenes"
    assert bq.quality_section("digits") == "bench_quality"
    assert bq.quality_section("scenes") == "bench_quality_scenes"
    meta = {"teacher": "t", "teacher_steps": 18, "eval_samples": 500, "eval_every": 50, "budget": 200.0,
            "max_steps": 1000, "seeds": [0], "cpu": "c", "cpus": 2, "threads": 1, "torch": "x", "load": 0.0,
            "sweep_s": 0.0, "long_s": 60.0, "batch": 64, "eta": 3, "data": "scenes", "settings": "fixed (--settings)"}
    run = {"setting": {"lr_g": 2e-4, "sigma_dist": "karras"}, "hits": {"1.5x": None}, "last_step": 100,
           "train_s": 50.0, "best_fd": 30.0,
           "best_step": 100, "last_fd": 30.0, "eval_s": 1.0, "n_evals": 2}
    text = bq.render_quality({"meta": meta, "targets": {"1.5x": 18.0}, "teacher_fd": 12.0,
                              "runs": {"diffratio-js": [run]}, "sweeps": {}})
    assert text.startswith("<!-- bench_quality_scenes:start -->") and "time to quality on scenes" in text
    assert "method settings fixed (--settings)" in text and "| diffratio-js | lr_g=0.0002, sigma_dist=karras |" in text
    assert "Heun-18 FD **12.00**" in text
    churned = bq.render_quality({"meta": {**meta, "teacher_steps": 100, "teacher_churn": 100.0},
                                 "targets": {"1.5x": 18.0}, "teacher_fd": 12.0, "runs": {}, "sweeps": {}})
    assert "Heun-100 with churn 100 (EDM's stochastic sampler) FD **12.00**" in churned


def test_teacher_fd_reuses_eval_json_only_for_the_same_sampler_and_count(tiny_teacher, tmp_path):
    """The thresholds come from the teacher's own eval.json only when it used the asked-for sampler
    and sample count; otherwise the teacher is scored again (here: a stochastic sampler)."""
    import shutil

    teacher = tmp_path / "t"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / "eval.json").write_text(json.dumps({"n": 16, "sampler": "heun-2", "fd": 123.0}))
    assert bq.teacher_fd(str(teacher), 16, 2, "cpu") == 123.0
    churned = bq.teacher_fd(str(teacher), 16, 2, "cpu", churn=5.0)
    assert churned != 123.0 and math.isfinite(churned)
    assert bq.teacher_fd(str(teacher), 16, 2, "cpu", churn=5.0) == churned   # seeded: the same figure again


def test_long_run_judge_tells_settled_drifting_and_oscillating_curves_apart(tmp_path):
    import bench_long_run as lr

    steps = list(range(0, 2100, 100))
    head = [(s, 400.0 - s / 10) for s in steps[:10]]           # the first half never enters the judgement
    flat = head + [(s, 20.0 + (0.2 if i % 2 else -0.2)) for i, s in enumerate(steps[10:])]
    falling = head + [(s, 40.0 - (s - 1000) / 50) for s in steps[10:]]       # -20 over the window
    swinging = head + [(s, 20.0 + (6.0 if i % 2 else -6.0)) for i, s in enumerate(steps[10:])]
    assert lr.judge(flat, floor_std=1.0)["verdict"] == "settled"
    v = lr.judge(falling, floor_std=1.0)
    assert v["verdict"] == "drifting (improving)" and v["trend"] == pytest.approx(-20.0) and v["window"] == [1000, 2000]
    assert lr.judge(swinging, floor_std=1.0)["verdict"] == "oscillating"
    assert lr.judge(swinging, floor_std=4.0)["verdict"] == "settled"  # the same swing within a wider floor
    assert lr.judge(flat[:4], floor_std=1.0)["verdict"] == "too few evaluations"

    # the section from a run directory's files
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_fd": f}) + "\n" for s, f in swinging)
                                       + json.dumps({"step": 2000, "loss_g": 1.0}) + "\n")
    assert lr.curve(run) == swinging
    config = {"method": "diffratio-js", "lr_g": 1e-4, "lr_aux": 1e-4, "batch": 64, "ema_halflife_images": 5000.0,
              "data": "scenes", "teacher": "/x/teacher", "steps": 2000, "eval_every": 100, "eval_samples": 500}
    final = {"floor": {"n": 500, "fd": 4.0, "fd_std": 1.0}}
    text = lr.markdown(run, swinging, lr.judge(swinging, 1.0), final, config, teacher_fd=15.8)
    assert text.startswith("<!-- bench_long_run:start -->") and text.endswith("<!-- bench_long_run:end -->")
    assert "| 0 | 400.0 | 100 | 390.0 |" in text and "**oscillating**" in text and "eval.json: 15.8" in text


def test_ema_bench_tracks_reproduce_the_loops_own_average_and_merge_over_seeds(tiny_teacher, tmp_path):
    """Every average rides on one run; the track with the run's own setting gives the loop's own FD."""
    import bench_ema as be

    runs = [be.train(str(tiny_teacher), None, steps=4, seed=seed, eval_every=2, out=tmp_path / f"s{seed}",
                     batch=4, eval_samples=64) for seed in (0, 1)]
    records = [json.loads((r / "tracks.json").read_text()) for r in runs]
    for rec in records:
        assert rec["own_track"] == "20k-r0.1" and rec["data"] == "digits"  # the default is one of the tracks
        assert rec["own_track_max_abs_diff"] == 0.0  # same weights, same latents: the loop's own FD
        assert set(rec["curves"]) == set(be.TRACKS)
        assert all([s for s, _ in c] == [0, 2, 4] for c in rec["curves"].values())
        # a 4-step run at batch 4 (16 images) has barely left the start under a 20000-image half-life,
        # while the raw weights have moved: the tracks are not copies of one another
        assert rec["curves"]["raw"][-1][1] != rec["curves"]["20k"][-1][1]
    text = be.markdown({"digits": records})
    assert text.startswith("<!-- bench_ema:start -->") and text.endswith("<!-- bench_ema:end -->")
    assert "### digits: 2 seeds (0, 1), 4 steps" in text and "| raw (no EMA) |" in text
    assert "| 20000, ramp-up 0.1 |" in text


def test_ema_bench_teacher_tracks_include_the_runs_own_average_exactly(tmp_path):
    import bench_ema as be

    rec = be.train_teacher_tracks("digits", tmp_path / "t", n_samples=64, sample_steps=2, preset="test", steps=4,
                                  batch=16, checkpoint_every=2)
    assert rec["own_track_max_abs_weight_diff"] == 0.0   # the 12.5k track is the run's own saved average
    assert set(rec["scores"]) == set(be.TEACHER_TRACKS) and all(s["fd"] > 0 for s in rec["scores"].values())
    # a half-life that is a share of the images seen is short this early: those tracks differ from 12.5k
    assert rec["scores"]["share 0.15"]["fd"] != rec["scores"]["12.5k"]["fd"]
    assert json.loads((tmp_path / "t" / "teacher_tracks.json").read_text())["steps"] == 4
    from probe.core.models import load_model

    assert load_model(tmp_path / "t" / "tracks" / "share-0.3").kind == "teacher"  # each average is a teacher
    text = be.markdown({}, [rec])
    assert "| 12500 | 12,500 |" in text and "| 0.3 x images seen | 19 |" in text  # 4 steps x 16 images x 0.3
