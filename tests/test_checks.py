"""probe/core/checks.py: the shared rules behind every config's validate()."""

import math

import numpy as np
import pytest

from probe.core import checks
from probe.core.errors import UserError


@pytest.mark.parametrize("value", [0, -1, True, 2.0, 2.5, "3", None, float("nan")])
def test_positive_int_refuses(value):
    with pytest.raises(UserError, match=r"^n must be an integer >= 1, got "):
        checks.positive_int(value, "n")


def test_integers_of_any_integral_type_pass():
    assert checks.positive_int(np.int64(3), "n") == 3 and type(checks.nonneg_int(np.int32(0), "n")) is int
    assert checks.seed(2 ** 63 - 1) == 2 ** 63 - 1
    with pytest.raises(UserError, match="below 2\\*\\*63"):
        checks.seed(2 ** 63)


@pytest.mark.parametrize("value", [0.0, -0.0, -1e-300, float("nan"), float("inf"), float("-inf"), "1", None, False])
def test_positive_float_refuses(value):
    with pytest.raises(UserError, match=r"^x must be a finite number > 0, got "):
        checks.positive_float(value, "x")


def test_bounds_and_lists():
    assert checks.nonneg_float(0, "x") == 0.0 and checks.finite(-3, "x") == -3.0
    assert checks.betas((0, 0.99)) == (0.0, 0.99)
    with pytest.raises(UserError, match="betas must be a finite number >= 0 and < 1, got 1"):
        checks.betas((0.9, 1.0))
    assert checks.sigma_range(None) is None and checks.sigma_range([0.5, 0.5]) == (0.5, 0.5)
    for bad in [(2, 1), (0, 1), (1, math.inf), (1,), "1,2"]:
        with pytest.raises(UserError, match="sigma_range"):
            checks.sigma_range(bad)
    assert checks.sigma_list([0, 2.5]) == (0.0, 2.5)
    for bad, match in [([], "is empty"), ([0, -1], "each of sigmas"), ([math.nan], "each of sigmas"), (3.0, "a list")]:
        with pytest.raises(UserError, match=match):
            checks.sigma_list(bad)
    assert checks.eval_samples(0) == 0 and checks.eval_samples(4) == 4
    with pytest.raises(UserError, match="0 \\(skip\\) or an integer >= 4"):
        checks.eval_samples(3)


def test_device_names():
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert checks.device(ok) == ok
    for bad in ("gpu", "cuda:", "CPU", "", None):
        with pytest.raises(UserError, match="unknown device"):
            checks.device(bad)


def test_writable_output(tmp_path):
    (tmp_path / "f").write_text("x")
    assert checks.writable_output(tmp_path / "new" / "deeper" / "out.h5") == tmp_path / "new" / "deeper" / "out.h5"
    with pytest.raises(UserError, match="is a file, not a directory"):
        checks.writable_output(tmp_path / "f" / "out.h5")
    assert not (tmp_path / "new").exists()  # checking creates nothing
