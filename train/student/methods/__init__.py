"""Registry of one-step methods: name -> Method class (see ``base.py`` for the interface)."""

from __future__ import annotations

from probe.core.errors import UserError
from train.student.methods.base import Method
from train.student.methods.diffratio import DiffRatioFKL, DiffRatioJS, DiffRatioKL
from train.student.methods.gan import DiffusionGAN
from train.student.methods.sid import SiD
from train.student.methods.vsd import VSD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in
                                    (DiffRatioJS, DiffRatioKL, DiffRatioFKL, VSD, SiD, DiffusionGAN)}
DEFAULT_METHOD = "diffratio-js"


def get_method(name: str) -> type[Method]:
    """The Method class registered under ``name``; a UserError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "DEFAULT_METHOD", "Method", "get_method"]
