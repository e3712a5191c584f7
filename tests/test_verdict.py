"""The verdict on made-up summaries: every declared contrast judged on its own, supported / contradicted /
inconclusive when it should be, refused when its declared match is not met; the claim rule; grid
parsing of [contrasts]; the learning-curve columns; the attribution fit where the truth is known."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.ablation_summary import budget_steps, curve_figures, with_curve_figures
from analysis.attribution import attribute, attribution_ready, fit_standardised
from analysis.verdict import combine, decide, mean_ci, pooled_sd, trend_words, verdict, verdict_from_dir
from probe.core.errors import UserError
from train.ablation.grid import check_contrasts, check_grid, load_grid, parse_contrast

GROUP = {"full": "teacher", "random": "random", "io-reinit": "features", "band": "no-features",
         "regressed": "other", "shuffled": "no-features", "encoder": "partial"}
REFERENCE = {"fd": 10.0, "floor": {"fd": 2.0, "fd_std": 0.4}, "sampler": "heun-18"}


def _summary(means: dict, sd: float = 0.5, seeds: int = 5, method: str = "diffratio-js", seed: int = 0,
             start: dict | None = None):
    """Runs with FD = mean + sd * (fixed standard-normal draws) per init; fd_start per init from ``start``."""
    rng = np.random.default_rng(seed)
    start = start or {}
    rows = []
    for init, mean in means.items():
        for s, e in enumerate(rng.standard_normal(seeds)):
            rows.append(dict(init=init, init_group=GROUP.get(init, "other"), method=method, seed=s, status="done",
                             steps_done=300, fd_final=mean + sd * e, precision_final=0.5,
                             fd_start=start.get(init, 600.0), cka_start=np.nan))
    return pd.DataFrame(rows)


def C(name, arm, versus, predicted, claim="2", **kw):
    return parse_contrast(name, dict(arm=arm, versus=versus, isolates=f"{arm} against {versus}", predicted=predicted,
                                     claim=claim, **kw))


PAPER = [C("full-vs-reference", "full", "reference", "arm no worse", claim="1"),
         C("random-vs-full", "random", "full", "arm worse"),
         C("band-vs-full", "band", "full", "arm worse", match={"property": "fd_start", "tolerance": "10%"}),
         C("io-reinit-vs-random", "io-reinit", "random", "arm better"),
         C("io-reinit-vs-shuffled", "io-reinit", "shuffled", "arm better")]


def _by_name(v):
    return {c.name: c for c in v.contrasts}


def test_paper_like_results_are_supported_contrast_by_contrast():
    df = _summary({"full": 10.2, "random": 40.0, "io-reinit": 20.0, "band": 30.0, "shuffled": 38.0, "encoder": 25.0},
                  start={"full": 584.0, "band": 610.0, "random": 2200.0, "io-reinit": 2300.0})
    v = verdict(df, reference=REFERENCE, contrasts=PAPER)
    got = _by_name(v)
    assert {n: c.verdict for n, c in got.items()} == {n: "supported" for n in got}
    band = got["band-vs-full"]
    arm, ver = df[df.init == "band"].fd_final, df[df.init == "full"].fd_final
    assert band.effect == pytest.approx(arm.mean() - ver.mean()) and band.ci_low > 0
    assert band.match == {"property": "fd_start", "arm": 610.0, "versus": 584.0, "tolerance": pytest.approx(58.4),
                          "met": True, "declared": "10%"}
    assert got["io-reinit-vs-random"].effect < 0 and "better, as predicted" in got["io-reinit-vs-random"].reason
    assert [c.verdict for c in v.claims] == ["supported", "supported"]
    assert v.claims[1].contrasts == ["random-vs-full", "band-vs-full", "io-reinit-vs-random", "io-reinit-vs-shuffled"]
    assert v.margin == pytest.approx(max(2.0 * 0.4, 0.10 * 10.0))
    assert "arms in no contrast (not judged): encoder" in v.notes
    text = v.text()
    assert "[band-vs-full]" in text and "match on fd_start: 610 vs 584" in text and "rule: supported when every" in text
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))   # schema 2, JSON without NaN
    assert d["schema"] == 2 and d["floor"] == {"mean": 2.0, "std": 0.4}
    assert d["reference"] == {"fd": 10.0, "steps": 18, "sampler": "heun-18"}
    first = d["contrasts"][2]
    for key in ("name", "claim", "arm", "versus", "isolates", "predicted", "metric", "effect", "ci_low", "ci_high",
                "n_arm", "n_versus", "match", "verdict", "reason"):
        assert key in first
    assert d["claims"][1]["verdict"] == "supported" and "rule" in d["claims"][1]


def test_opposite_results_are_contradicted():
    df = _summary({"full": 30.0, "random": 20.0, "io-reinit": 35.0, "band": 15.0, "shuffled": 18.0},
                  start={"full": 584.0, "band": 600.0})
    got = _by_name(verdict(df, reference=REFERENCE, contrasts=PAPER))
    for name in ("random-vs-full", "band-vs-full", "io-reinit-vs-random", "io-reinit-vs-shuffled"):
        assert got[name].verdict == "contradicted", name
    assert "against the prediction" in got["random-vs-full"].reason
    assert got["full-vs-reference"].verdict == "contradicted"    # 20 FD worse than the teacher, margin 1.0


def test_equivalent_results_are_contradicted_and_noise_is_inconclusive():
    same = _summary({"full": 10.0, "random": 10.0}, sd=0.05, seeds=6)
    v = verdict(same, reference=REFERENCE, contrasts=PAPER[:2])
    assert [c.verdict for c in v.contrasts] == ["supported", "contradicted"]   # claim 1 within the margin
    assert "inside +-margin" in v.contrasts[1].reason
    noisy = _summary({"full": 10.0, "random": 12.0}, sd=8.0, seeds=3)
    assert verdict(noisy, reference=REFERENCE, contrasts=PAPER[1:2]).contrasts[0].verdict == "inconclusive"
    one_seed = verdict(_summary({"full": 10.0, "random": 40.0}, seeds=1), reference=REFERENCE, contrasts=PAPER[1:2])
    assert one_seed.contrasts[0].verdict == "inconclusive"
    assert "fewer than 2 finished runs" in one_seed.contrasts[0].reason
    missing = verdict(_summary({"full": 10.0}), reference=None, contrasts=PAPER[:2])
    assert missing.contrasts[0].verdict == "inconclusive" and "teacher's own figure" in missing.contrasts[0].reason
    assert missing.contrasts[1].verdict == "inconclusive"
    assert "no finished runs of random" in missing.contrasts[1].reason
    assert [c.verdict for c in missing.claims] == ["inconclusive", "inconclusive"]


def test_unmatched_arms_are_refused_not_compared():
    # the regressed generator starts far better than the teacher init: it is no mapping-matched control
    df = _summary({"full": 19.0, "regressed": 9.5}, start={"full": 584.0, "regressed": 8.3})
    spec = C("regressed-vs-full", "regressed", "full", "arm worse", match={"property": "fd_start", "tolerance": "10%"})
    (r,) = verdict(df, reference=REFERENCE, contrasts=[spec]).contrasts
    assert r.verdict == "refused" and math.isnan(r.effect) and math.isnan(r.ci_low)
    assert r.match["met"] is False and "8.3 vs full 584" in r.reason and "not compared" in r.reason
    # an absolute tolerance, the floor's spread, and a property that was never measured
    near = _summary({"full": 19.0, "band": 30.0}, start={"full": 584.0, "band": 600.0})
    absolute = C("b", "band", "full", "arm worse", match={"property": "fd_start", "tolerance": 20})
    floor = C("f", "band", "full", "arm worse", match={"property": "fd_start", "tolerance": "floor"})
    cka = C("k", "band", "full", "arm worse", match={"property": "cka_start", "tolerance": 0.05})
    got = _by_name(verdict(near, reference=REFERENCE, contrasts=[absolute, floor, cka]))
    assert got["b"].verdict == "supported" and got["b"].match["tolerance"] == 20.0
    assert got["f"].verdict == "refused" and got["f"].match["tolerance"] == pytest.approx(0.8)  # 2 x floor std
    assert got["k"].verdict == "refused" and "cannot be measured" in got["k"].reason
    # without the floor's spread a "floor" tolerance cannot be checked either
    assert verdict(near, reference=None, contrasts=[floor]).contrasts[0].verdict == "refused"


def test_claim_rule_over_contrasts_never_pools():
    df = _summary({"full": 10.2, "random": 40.0, "band": 30.0, "io-reinit": 20.0, "shuffled": 38.0},
                  start={"full": 584.0, "band": 900.0})        # band's match fails -> refused
    v = verdict(df, reference=REFERENCE, contrasts=PAPER)
    assert _by_name(v)["band-vs-full"].verdict == "refused"
    assert v.claims[1].verdict == "inconclusive"                 # a refused in-claim contrast blocks support
    reported = [c if c.name != "band-vs-full" else C("band-vs-full", "band", "full", "arm worse", in_claim=False,
                                                     match={"property": "fd_start", "tolerance": "10%"})
                for c in PAPER]
    v2 = verdict(df, reference=REFERENCE, contrasts=reported)
    assert v2.claims[1].verdict == "supported" and "band-vs-full" not in v2.claims[1].contrasts
    assert combine(["supported", "contradicted", "refused"]) == "contradicted"
    assert combine(["supported", "inconclusive"]) == combine([]) == "inconclusive"
    # each contrast sees only its own two arms: changing another arm changes nothing else
    other = df.copy()
    other.loc[other.init == "shuffled", "fd_final"] += 500.0
    a, b = _by_name(v), _by_name(verdict(other, reference=REFERENCE, contrasts=PAPER))
    for name in ("random-vs-full", "io-reinit-vs-random"):
        assert (a[name].effect, a[name].ci_low, a[name].ci_high) == (b[name].effect, b[name].ci_low, b[name].ci_high)


def test_grid_without_contrasts_gets_only_derived_ones():
    df = _summary({"full": 10.2, "random": 40.0, "band": 30.0, "io-reinit": 20.0})
    v = verdict(df, reference=REFERENCE)
    assert [c.name for c in v.contrasts] == ["full-vs-reference", "random-vs-full"]
    assert v.contrasts[1].verdict == "supported" and not v.contrasts[1].in_claim
    assert v.claims[1].verdict == "inconclusive" and v.claims[1].contrasts == []
    assert any("undeclared arms (not judged): band, io-reinit" in n for n in v.notes)


def test_vsd_comparison_and_unfinished_runs():
    dr = _summary({"full": 14.0}, seed=1)
    vsd = _summary({"full": 10.0}, method="vsd", seed=2)
    partial = _summary({"full": 1000.0}, seeds=2).assign(status="partial")
    df = pd.concat([dr, vsd, partial])
    (t,) = verdict(df, reference=None).contrasts          # derived: DiffRatio vs VSD, same init
    assert t.name == "full-diffratio-js-vs-vsd" and t.verdict == "contradicted"   # 4 FD worse, margin 1.0
    assert t.mean_arm == pytest.approx(dr.fd_final.mean()) and t.mean_versus == pytest.approx(vsd.fd_final.mean())
    declared = C("dr-vs-vsd", "full", "full", "arm no worse", claim="1", method="diffratio-js", versus_method="vsd")
    assert verdict(df, contrasts=[declared]).contrasts[0].effect == pytest.approx(t.effect)
    with pytest.raises(UserError, match="both 'full'"):
        C("x", "full", "full", "arm no worse", claim="1")


def test_not_plateaued_arms_are_named_and_cannot_contradict_non_inferiority():
    df = _summary({"full": 19.0, "random": 600.0}).assign(plateau=0.0)
    v = verdict(df, reference=REFERENCE, contrasts=PAPER[:2])
    ref, rnd = v.contrasts
    assert ref.verdict == "inconclusive" and "had not plateaued and may still get there" in ref.reason
    assert rnd.verdict == "supported" and "not convergence" in rnd.reason and rnd.not_plateaued == ["random", "full"]
    assert "had not plateaued" in v.claims[0].note
    settled = verdict(df.assign(plateau=1.0), reference=REFERENCE, contrasts=PAPER[:1]).contrasts[0]
    assert settled.verdict == "contradicted"
    # with the trend columns the note says how each such arm moved: still improving, or swinging only
    steps = list(range(100, 2100, 100))
    rng = np.random.default_rng(0)
    falling = [(s, 40.0 - s / 100) for s in steps]           # last half: steps 1100-2000, so -9 over it
    swinging = [(s, 600.0 + (150.0 if i % 2 else -150.0) + rng.normal(0, 20)) for i, s in enumerate(steps)]
    figures = {"full": curve_figures(falling, 2000, 100), "random": curve_figures(swinging, 2000, 100)}
    assert figures["full"]["fd_trend"] == pytest.approx(-9.0) and figures["full"]["fd_trend_se"] < 1e-9
    assert abs(figures["random"]["fd_trend"]) < 2 * figures["random"]["fd_trend_se"]
    trended = df.assign(fd_trend=[figures[i]["fd_trend"] for i in df.init],
                        fd_trend_se=[figures[i]["fd_trend_se"] for i in df.init])
    rnd = verdict(trended, reference=REFERENCE, contrasts=PAPER[:2]).contrasts[1]
    assert "random (no trend resolved in 5/5 runs over the last half) and full (still improving in 5/5 runs " \
           "over the last half) had not plateaued" in rnd.reason
    mixed = trended.assign(fd_trend=np.where((trended.init == "random") & (trended.seed == 0), 500.0, trended.fd_trend))
    assert trend_words(mixed[mixed.init == "random"]) == ("no trend resolved in 4/5 runs, worsening in 1/5 runs "
                                                           "over the last half")
    assert trend_words(df) == ""                                                # no columns, no words


def test_steps_to_threshold_counts_unreached_runs_at_their_budget():
    df = _summary({"full": 10.0, "random": 40.0})
    df["steps_to_150pct"] = np.where(df.init == "full", 200.0 + df.seed, np.nan)   # random never reaches it
    spec = C("s", "random", "full", "arm worse", metric="steps_to_150pct")
    (r,) = verdict(df, reference=REFERENCE, contrasts=[spec]).contrasts
    assert r.mean_arm == 300.0 and r.verdict == "supported" and "5 random and 0 full runs did not reach" in r.reason
    (r,) = verdict(df, reference=None, contrasts=[spec]).contrasts
    assert r.verdict == "inconclusive" and "needs the teacher's figure" in r.reason


def test_effect_size_and_intervals_follow_their_definitions():
    df = _summary({"full": 10.0, "random": 13.0}, sd=1.0, seeds=8)
    (t,) = verdict(df, reference=REFERENCE, n_boot=4000, contrasts=PAPER[1:2]).contrasts
    a = df[df.init == "full"].fd_final.to_numpy()
    b = df[df.init == "random"].fd_final.to_numpy()
    sp = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    assert t.effect == pytest.approx(b.mean() - a.mean())
    assert t.standardised == pytest.approx((b.mean() - a.mean()) / sp)
    assert pooled_sd([a, b]) == pytest.approx(sp)
    # the percentile interval is close to the normal approximation mean +- 1.96 standard errors
    se = np.sqrt(a.var(ddof=0) / len(a) + b.var(ddof=0) / len(b))
    assert t.ci_low == pytest.approx(t.effect - 1.96 * se, abs=0.25 * se * 1.96)
    assert t.ci_high == pytest.approx(t.effect + 1.96 * se, abs=0.25 * se * 1.96)
    # higher-is-better metrics flip the sign: "worse" stays positive
    df["precision_final"] = np.where(df.init == "random", 0.2, 0.8)
    (t,) = verdict(df, contrasts=[C("p", "random", "full", "arm worse", metric="precision_final")]).contrasts
    assert t.effect == pytest.approx(0.6) and t.verdict == "supported"
    lo, hi = mean_ci([3.0, 3.0, 3.0])
    assert lo == hi == 3.0 and np.isnan(mean_ci([])[0])


def test_decision_rules():
    assert decide("arm worse", 0.5, 2.0, 0.1)[0] == "supported"
    assert decide("arm worse", -2.0, -0.5, 0.1)[0] == "contradicted"
    assert decide("arm worse", -0.05, 0.08, 0.1)[0] == "contradicted"
    assert decide("arm worse", -0.5, 2.0, 0.1)[0] == "inconclusive"
    assert decide("arm better", -2.0, -0.5, 0.1)[0] == "supported"
    assert decide("arm better", 0.5, 2.0, 0.1)[0] == "contradicted"
    assert decide("arm better", -0.05, 0.08, 0.1)[0] == "contradicted"
    assert decide("arm better", -2.0, 0.5, 0.1)[0] == "inconclusive"
    assert decide("arm no worse", -1.0, 0.05, 0.1)[0] == "supported"
    assert decide("arm no worse", 0.2, 0.5, 0.1)[0] == "contradicted"
    assert decide("arm no worse", 0.0, 0.5, 0.1)[0] == "inconclusive"
    with pytest.raises(UserError, match="fd_best"):
        verdict(pd.DataFrame({"init": ["full"], "method": ["diffratio-js"]}), metric="fd_best",
                contrasts=[C("x", "full", "reference", "arm no worse", claim="1", metric="fd_best")])


# ------------------------------------------------------------------------------ grid parsing
GRID = """
teacher = "@t"
methods = ["diffratio-js"]
seeds = [0]
[student]
eval_every = 2
[inits]
full = "teacher"
random = "random"
[prereq.t]
kind = "teacher"
preset = "test"
[contrasts.random-vs-full]
arm = "random"
versus = "full"
isolates = "all teacher weights removed"
predicted = "arm worse"
claim = "2"
"""


@pytest.mark.parametrize("change, message", [
    (('predicted = "arm worse"', 'predicted = "worse"'), "predicted must be one of"),
    (('claim = "2"', 'claim = "3"'), "claim must be one of"),
    (('isolates = "all teacher weights removed"\n', ''), "missing 'isolates'"),
    (('claim = "2"', 'claim = "2"\nmetric = "fd_median"'), "metric 'fd_median' is not a summary column"),
    (('claim = "2"', 'claim = "2"\ncolour = 1'), "unknown key 'colour'"),
    (('versus = "full"', 'versus = "random"'), "arm and versus are both 'random'"),
    (('versus = "full"', 'versus = "reference"\nmetric = "fd_auc"'), "reference figure has no 'fd_auc'"),
    (('claim = "2"', 'claim = "2"\nmatch = { property = "fd_start" }'), "match must be"),
    (('claim = "2"', 'claim = "2"\nmatch = { property = "fd_start", tolerance = "close" }'), "tolerance must be"),
    (('claim = "2"', 'claim = "2"\nmatch = { property = "cka_start", tolerance = "floor" }'), "is not an FD"),
    (('claim = "2"', 'claim = "2"\nmatch = { property = "mood", tolerance = 1 }'), "'mood' is not a summary column"),
    (('claim = "2"', 'claim = "2"\nin_claim = "no"'), "in_claim must be true or false"),
])
def test_bad_contrasts_are_refused_when_the_grid_is_read(tmp_path, change, message):
    text = GRID.replace(*change)
    assert text != GRID
    (tmp_path / "g.toml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_grid(str(tmp_path / "g.toml"))


@pytest.mark.parametrize("change, message", [
    (('arm = "random"', 'arm = "randm"'), r"arm 'randm' is not an init label of this grid \(labels: full, random\)"),
    (('versus = "full"', 'versus = "teacher"'), "versus 'teacher' is not an init label"),
    (('claim = "2"', 'claim = "2"\nmethod = "vsd"'), "method 'vsd' is not one of the grid's methods"),
    (('claim = "2"', 'claim = "2"\nversus_method = "gan"'), "versus_method 'gan' is not one of the grid's methods"),
])
def test_unknown_labels_are_a_one_line_error_at_grid_check_time(tmp_path, change, message):
    (tmp_path / "g.toml").write_text(GRID.replace(*change))
    grid = load_grid(str(tmp_path / "g.toml"))
    with pytest.raises(UserError, match=message) as e:
        check_contrasts(grid)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=message):
        check_grid(grid, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_declared_contrasts_travel_through_grid_json(tmp_path):
    (tmp_path / "g.toml").write_text(GRID)
    grid = load_grid(str(tmp_path / "g.toml"))
    check_contrasts(grid)
    d = tmp_path / "abl"
    d.mkdir()
    (d / "grid.json").write_text(json.dumps({"grid": dataclasses.asdict(grid)}))
    _summary({"full": 10.0, "random": 40.0}).to_csv(d / "summary.csv", index=False)
    v = verdict_from_dir(d)
    assert [c.name for c in v.contrasts] == ["random-vs-full"] and v.contrasts[0].verdict == "supported"
    assert v.claims[1].verdict == "supported"


# ------------------------------------------------------------------------------ learning curves
def test_learning_curve_columns_follow_their_definitions():
    assert budget_steps(400, 50) == [100, 200, 400]
    assert budget_steps(300, 100) == [100, 200, 300]        # 75 -> 100 (nearest), 150 -> 200 (tie: later)
    curve = [(0, 600.0), (100, 100.0), (200, 30.0), (300, 14.0), (400, 13.5)]
    row = curve_figures(curve, 400, 100, reference_fd=10.0, floor_std=0.5)
    assert row["fd_at_100"] == 100.0 and row["fd_at_200"] == 30.0 and row["fd_at_400"] == 13.5
    x = np.log10(1 + np.array([0, 100, 200, 300, 400.0]))
    y = np.array([s[1] for s in curve])
    assert row["fd_auc"] == pytest.approx(np.trapezoid(y, x) / x[-1])
    assert row["steps_to_150pct"] == 300.0 and math.isnan(row["steps_to_110pct"])   # 11 never reached
    assert row["plateau_spread"] == pytest.approx(0.5) and row["plateau"] == 1.0    # last 2 of 4: 14, 13.5
    assert row["fd_tail"] == pytest.approx(13.75)                                   # their mean
    # fd_trend: the line through the last half (at least 3) of the evaluations after step 0, against scipy's
    from scipy.stats import linregress

    fit = linregress([200, 300, 400], [30.0, 14.0, 13.5])
    assert row["fd_trend"] == pytest.approx(fit.slope * 200) and row["fd_trend_se"] == pytest.approx(fit.stderr * 200)
    moving = curve_figures(curve[:-1] + [(400, 11.0)], 400, 100, reference_fd=10.0, floor_std=0.5)
    assert moving["plateau"] == 0.0 and moving["steps_to_110pct"] == 400.0
    unfinished = curve_figures(curve[:3], 400, 100, reference_fd=10.0, floor_std=0.5)
    assert all(math.isnan(unfinished[k]) for k in ("fd_auc", "fd_tail", "plateau", "fd_at_400", "fd_trend"))
    assert math.isnan(curve_figures(curve, 400, 100)["plateau"])     # no floor: cannot be told
    table = pd.DataFrame({"fd_curve": [json.dumps([list(p) for p in curve])]})
    figures = with_curve_figures(table, 400, 100, {"fd": 10.0, "floor": {"fd_std": 0.5}})
    assert figures["fd_auc"].iloc[0] == row["fd_auc"]


def test_a_run_stopped_at_its_plateau_holds_its_last_fd_to_the_budget():
    stopped = [(0, 600.0), (100, 20.0), (200, 20.2)]               # the loop stopped it at step 200
    row = curve_figures(stopped, 400, 100, reference_fd=10.0, floor_std=0.5, stopped_at=200)
    ran_on = curve_figures(stopped + [(300, 20.2), (400, 20.2)], 400, 100, reference_fd=10.0, floor_std=0.5)
    assert row == ran_on                                              # as if it had run on, flat
    unstopped = curve_figures(stopped, 400, 100, reference_fd=10.0, floor_std=0.5)
    assert math.isnan(unstopped["fd_auc"]) and math.isnan(unstopped["fd_at_400"])  # unfinished, not held


# ---------------------------------------------------------------------------------- attribution
def _attribution_data(truth: str, arms: int = 12, seeds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Arms with independent step-0 FD (log-uniform 10..3000) and CKA (uniform 0..1); the final FD
    depends on one of them only, plus per-run noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(arms):
        log_fd, cka = rng.uniform(1, 3.5), rng.uniform(0, 1)
        for s in range(seeds):
            driver = -1.5 * cka if truth == "features" else 0.6 * log_fd
            rows.append(dict(init=f"arm{a}", method="diffratio-js", status="done", seed=s, fd_start=10 ** log_fd,
                             cka_start=cka, fd_final=10 ** (2 + driver + rng.normal(0, 0.08)),
                             steps_to_150pct=np.nan if driver > 0.9 else 400 * (1 + driver) + rng.normal(0, 10)))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("truth", ["features", "mapping"])
def test_attribution_finds_the_explanation_that_matters(truth):
    df = _attribution_data(truth)
    assert attribution_ready(df)
    result = attribute(df, n_boot=500)
    fit = result.fits[0]
    assert fit.outcome == "log10 fd_final" and fit.n_runs == 60 and fit.n_arms == 12
    mapping, features = fit.terms
    assert mapping.predictor == "log10 fd_start" and features.predictor == "cka_start"
    real, null = (features, mapping) if truth == "features" else (mapping, features)
    sign = -1 if truth == "features" else 1          # more similar features / worse start -> higher FD
    assert sign * real.coef > 0.8 and (real.coef_ci[0] > 0 or real.coef_ci[1] < 0)
    assert sign * real.partial_r > 0.8 and (real.partial_ci[0] > 0 or real.partial_ci[1] < 0)
    assert null.coef_ci[0] < 0 < null.coef_ci[1] and abs(null.coef) < 0.2
    steps = result.fits[1]
    assert steps.outcome == "steps_to_150pct" and steps.n_runs + steps.n_left_out == 60
    assert "steps_to_110pct" in result.notes[0] and "Attribution" in result.text()
    json.dumps(result.to_dict(), allow_nan=False)


def test_attribution_says_when_it_cannot_separate_the_explanations():
    df = _attribution_data("features")
    df["fd_start"] = 10 ** (3 - 2 * df["cka_start"])      # the two step-0 properties move together
    fit = attribute(df, n_boot=200).fits[0]
    assert abs(fit.predictor_corr) > 0.99 and "cannot separate" in fit.note
    assert all(math.isnan(t.coef) for t in fit.terms)                  # not identified, so not reported
    few = df[df.init.isin(["arm0", "arm1", "arm2"])]
    assert not attribution_ready(few) and "fewer than 4 arms" in attribute(few, n_boot=10).fits[0].note
    assert not attribution_ready(df.assign(cka_start=np.nan))
    beta, partial, r2 = fit_standardised(np.array([1.0, 2, 3, 4]), np.array([[1.0, 0], [2, 1], [3, 0], [4, 1]]))
    assert beta[0] == pytest.approx(1.0) and abs(beta[1]) < 1e-9 and r2 == pytest.approx(1.0)
