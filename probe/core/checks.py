"""Checks of numeric options, shared by every config's ``validate()`` and by the CLI.

Each check returns the value (converted where that is lossless) or raises ``UserError`` with one
line naming the option, the rule and the value, e.g. ``steps must be an integer >= 1, got -5``.
Configs call them before anything is created, so a bad value never leaves a half-made run
directory or file behind, whether it came from the command line, a grid TOML file or Python.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path

from probe.core.errors import UserError

SEED_MAX = 2 ** 63 - 1   # the largest seed every consumer takes (torch.Generator, numpy's default_rng)


def _fail(name: str, rule: str, value) -> None:
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    raise UserError(f"{name} must be {rule}, got {shown}")


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (bool and float are refused, 2.0 included: a TOML ``steps = 2.5`` is a mistake)."""
    rule = "an integer" + (f" >= {minimum}" if minimum is not None else "") + \
        (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, rule, value)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(name, rule, value)
    return value


def positive_int(value, name: str) -> int:
    return integer(value, name, minimum=1)


def nonneg_int(value, name: str) -> int:
    return integer(value, name, minimum=0)


def seed(value, name: str = "seed") -> int:
    value = integer(value, name, minimum=0)
    if value > SEED_MAX:
        _fail(name, "an integer below 2**63", value)
    return value


def number(value, name: str, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None) -> float:
    """A finite real number with optional bounds: ``above`` (>), ``at_least`` (>=), ``below`` (<)."""
    parts = ([f"> {above:g}"] if above is not None else []) + ([f">= {at_least:g}"] if at_least is not None else []) \
        + ([f"< {below:g}"] if below is not None else [])
    rule = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, rule, value)
    value = float(value)
    if not math.isfinite(value) or (above is not None and not value > above) \
            or (at_least is not None and not value >= at_least) or (below is not None and not value < below):
        _fail(name, rule, value)
    return value


def finite(value, name: str) -> float:
    return number(value, name)


def positive_float(value, name: str) -> float:
    return number(value, name, above=0.0)


def nonneg_float(value, name: str) -> float:
    return number(value, name, at_least=0.0)


def sigma(value, name: str = "sigma") -> float:
    """An EDM noise level: finite and >= 0 (0 = the clean input)."""
    return number(value, name, at_least=0.0)


def sigma_list(values, name: str = "sigmas") -> tuple:
    """A non-empty list of noise levels, each finite and >= 0."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UserError(f"{name} must be a list of noise levels, got {values!r}")
    out = tuple(sigma(v, f"each of {name}") for v in values)
    if not out:
        raise UserError(f"{name} is empty; give at least one noise level (0 = clean input)")
    return out


def sigma_range(value, name: str = "sigma_range") -> tuple | None:
    """None, or (lo, hi) with 0 < lo <= hi, both finite."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise UserError(f"{name} must be two numbers LO,HI with 0 < LO <= HI, got {value!r}")
    lo, hi = (number(v, name, above=0.0) for v in value)
    if lo > hi:
        raise UserError(f"{name} must be two numbers LO,HI with 0 < LO <= HI, got {lo:g},{hi:g}")
    return lo, hi


def betas(value, name: str = "betas") -> tuple:
    """Adam's (beta1, beta2), each in [0, 1)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise UserError(f"{name} must be two numbers in [0, 1), got {value!r}")
    return tuple(number(v, name, at_least=0.0, below=1.0) for v in value)


def one_of(value, name: str, allowed) -> str:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, allowed))}")
    return value


def writable_output(path, name: str = "--out") -> Path:
    """A path that can be created: no existing parent of it is a regular file or read-only.

    Checked before any work starts, so a run does not train for minutes and then fail to write."""
    path = Path(path)
    parent = path.parent
    while not parent.exists():  # the nearest existing ancestor decides
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{name} {path}: {parent} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path}: {parent} is not writable")
    return path


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def device(value, name: str = "device") -> str:
    """auto | cpu | cuda | cuda:N | mps (whether CUDA is present is checked when the device is picked)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(DEVICES)}")
    return value


def eval_samples(value, name: str = "eval_samples", minimum: int = 4) -> int:
    """0 (no evaluation) or at least ``minimum`` samples (precision/recall use 3 neighbours)."""
    value = nonneg_int(value, name)
    if 0 < value < minimum:
        raise UserError(f"{name} must be 0 (skip) or an integer >= {minimum}, got {value}")
    return value
