"""Initialisation of the one-step generator from an init spec (docs/method.md §4-5).

The one replaceable step between the teacher and the student loop: ``train/student/loop.py`` calls
``initialise_generator`` and nothing else, so a new kind of initialisation changes only the
grammar in ``train/initspec.py``.
"""

from __future__ import annotations

from probe.core.edm import Denoiser
from train.initspec import apply_init_spec


def initialise_generator(spec: str, teacher, seed: int = 0) -> tuple[Denoiser, dict]:
    """A trainable denoiser with the teacher's architecture, initialised according to ``spec``.

    Args:
        spec:    an init spec (grammar in train/initspec.py): ``"teacher"`` (a copy of the teacher's
                 weights, the default), ``"random"``, ``"reinit:GLOBS"``, ``"keep:GLOBS"``,
                 ``"shuffle[:GLOBS]"``, ``"from:PATH"`` and combinations joined with ``+`` / ``;``.
        teacher: a ``LoadedModel`` (probe/core/models.py); its denoiser class and DDPM schedule (if
                 any) are kept, so the generator is ``D(sigma_init z; sigma_init)`` in the same units.
        seed:    seed of every random draw the spec makes (the global RNG is left untouched).

    Returns:
        (denoiser in train mode with gradients on, report) where ``report`` is a JSON-able dict
        recorded in the run: the spec, and where every tensor came from with counts and fractions
        per source and per top-level module (``train.initspec.build_report``), plus the flat
        counts ``tensors_copied`` / ``parameters_copied`` / ``tensors_reinitialised`` /
        ``parameters_reinitialised``.

    Raises:
        UserError for a spec outside the grammar, a glob matching nothing, a missing or
        mismatching ``from:`` model; the message names the offending part.
    """
    return apply_init_spec(spec, teacher, seed)
