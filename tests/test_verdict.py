"""The verdict on made-up summaries: it must be able to say supported, not supported and inconclusive."""

import numpy as np
import pandas as pd
import pytest

from probe.core.errors import UserError
from analysis.verdict import decide, mean_ci, pooled_sd, verdict

GROUP = {"full": "teacher", "random": "random", "io-reinit": "features", "band": "no-features",
         "regressed": "no-features", "shuffled": "no-features", "encoder": "partial"}


def _summary(means: dict, sd: float = 0.5, seeds: int = 5, method: str = "diffratio-js", seed: int = 0):
    """Runs with FD = mean + sd * (fixed standard-normal draws) per init."""
    rng = np.random.default_rng(seed)
    rows = []
    for init, mean in means.items():
        for s, e in enumerate(rng.standard_normal(seeds)):
            rows.append(dict(init=init, init_group=GROUP[init], method=method, seed=s, status="done",
                             fd_final=mean + sd * e, precision_final=0.5))
    return pd.DataFrame(rows)


REFERENCE = {"fd": 10.0, "floor": {"fd": 2.0, "fd_std": 0.4}, "sampler": "heun-18"}


def test_paper_like_results_are_supported():
    df = _summary({"full": 10.2, "random": 40.0, "io-reinit": 12.0, "band": 30.0, "regressed": 28.0,
                   "shuffled": 38.0, "encoder": 20.0})
    v = verdict(df, reference=REFERENCE)
    assert [c.outcome for c in v.claims] == ["supported", "supported"]
    t2b = v.claims[1].tests[1]
    assert t2b.effect == pytest.approx(np.mean([30, 28, 38]) - 12.0, abs=1.0) and t2b.ci[0] > 0
    assert v.settings["margin"] == pytest.approx(max(2.0 * 0.4, 0.05 * 10.0))
    text = v.text()
    assert "Claim 1" in text and "Claim 2" in text and "SUPPORTED" in text
    assert v.to_dict()["claims"][0]["outcome"] == "supported"


def test_opposite_results_are_not_supported():
    # random beats the teacher init, the mapping-only controls beat the feature-keeping init, and
    # the teacher-initialised DiffRatio students are far from the teacher's own figure
    df = _summary({"full": 30.0, "random": 20.0, "io-reinit": 35.0, "band": 15.0, "regressed": 16.0,
                   "shuffled": 18.0})
    v = verdict(df, reference=REFERENCE)
    assert [c.outcome for c in v.claims] == ["not supported", "not supported"]
    assert [t.outcome for t in v.claims[1].tests] == ["not supported", "not supported"]
    assert "opposite direction" in v.claims[1].tests[0].reason
    assert "NOT SUPPORTED" in v.text()


def test_equivalent_results_are_not_supported_and_noise_is_inconclusive():
    same = _summary({"full": 10.0, "random": 10.0, "io-reinit": 10.0, "band": 10.0}, sd=0.05, seeds=6)
    v = verdict(same, reference=REFERENCE)
    assert v.claims[1].tests[0].outcome == "not supported"
    assert "equivalence" in v.claims[1].tests[0].reason
    assert v.claims[0].outcome == "supported"           # within the margin of the teacher's figure
    noisy = _summary({"full": 10.0, "random": 12.0, "io-reinit": 10.0, "band": 12.0}, sd=8.0, seeds=3)
    assert verdict(noisy, reference=REFERENCE).claims[1].outcome == "inconclusive"
    one_seed = _summary({"full": 10.0, "random": 40.0, "io-reinit": 10.0, "band": 40.0}, seeds=1)
    t = verdict(one_seed, reference=REFERENCE).claims[1].tests[0]
    assert t.outcome == "inconclusive" and "fewer than 2 runs" in t.reason
    missing = verdict(_summary({"full": 10.0, "random": 40.0}), reference=None)
    assert missing.claims[0].outcome == "inconclusive"   # no teacher figure, no VSD runs
    assert missing.claims[1].tests[1].outcome == "inconclusive"


def test_vsd_comparison_and_unfinished_runs():
    dr = _summary({"full": 14.0}, seed=1)
    vsd = _summary({"full": 10.0}, method="vsd", seed=2)
    partial = _summary({"full": 1000.0}, seeds=2).assign(status="partial")
    v = verdict(pd.concat([dr, vsd, partial]), reference=None)
    (t,) = v.claims[0].tests
    assert t.name == "1b" and t.outcome == "not supported"       # 4 FD worse than VSD, margin 0.7
    assert t.mean_b == pytest.approx(dr.fd_final.mean())        # the partial runs are ignored


def test_effect_size_and_intervals_follow_their_definitions():
    df = _summary({"full": 10.0, "random": 13.0}, sd=1.0, seeds=8)
    t = verdict(df, reference=REFERENCE, n_boot=4000).claims[1].tests[0]
    a = df[df.init == "full"].fd_final.to_numpy()
    b = df[df.init == "random"].fd_final.to_numpy()
    sp = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    assert t.effect == pytest.approx(b.mean() - a.mean())
    assert t.standardised == pytest.approx((b.mean() - a.mean()) / sp)
    assert pooled_sd([a, b]) == pytest.approx(sp)
    # the percentile interval is close to the normal approximation mean +- 1.96 standard errors
    se = np.sqrt(a.var(ddof=0) / len(a) + b.var(ddof=0) / len(b))
    assert t.ci[0] == pytest.approx(t.effect - 1.96 * se, abs=0.25 * se * 1.96)
    assert t.ci[1] == pytest.approx(t.effect + 1.96 * se, abs=0.25 * se * 1.96)
    # higher-is-better metrics flip the sign: "worse" stays positive
    df["precision_final"] = np.where(df.init == "random", 0.2, 0.8)
    t = verdict(df, metric="precision_final").claims[1].tests[0]
    assert t.effect == pytest.approx(0.6)
    lo, hi = mean_ci([3.0, 3.0, 3.0])
    assert lo == hi == 3.0 and np.isnan(mean_ci([])[0])


def test_decision_rules():
    assert decide("directional", 0.5, 2.0, 0.1)[0] == "supported"
    assert decide("directional", -2.0, -0.5, 0.1)[0] == "not supported"
    assert decide("directional", -0.05, 0.08, 0.1)[0] == "not supported"
    assert decide("directional", -0.5, 2.0, 0.1)[0] == "inconclusive"
    assert decide("non-inferiority", -1.0, 0.05, 0.1)[0] == "supported"
    assert decide("non-inferiority", 0.2, 0.5, 0.1)[0] == "not supported"
    assert decide("non-inferiority", 0.0, 0.5, 0.1)[0] == "inconclusive"
    with pytest.raises(UserError, match="fd_best"):
        verdict(pd.DataFrame({"init": ["full"], "method": ["diffratio-js"]}), metric="fd_best")
