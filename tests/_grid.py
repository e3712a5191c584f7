"""The pieces of the tiny ablation grids that tests write as TOML, and writing + running one.

A grid test needs a student short enough to finish in seconds and, often, a teacher trained as a
prerequisite on the "test" preset; both are spelled out here once so every such test trains the same.
"""

from __future__ import annotations

from pathlib import Path

# two steps, evaluated and checkpointed at the end, a metrics row per step
TINY_STUDENT = """
[student]
steps = 2
batch = 8
eval_every = 2
eval_samples = 64
checkpoint_every = 2
log_every = 1
"""

# the body of a [prereq.NAME] table that trains a teacher of a few thousand parameters for two steps
TINY_TEACHER = """kind = "teacher"
preset = "test"
steps = 2
batch = 8
checkpoint_every = 2
sample_steps = 2
eval_samples = 0
"""


def run_grid(root: Path, text: str) -> Path:
    """Write ``text`` to ROOT/grid.toml, run the whole grid into ROOT/abl; returns ROOT/abl."""
    from probe.pipeline import run_ablation
    from train.ablation.grid import AblationConfig

    (root / "grid.toml").write_text(text)
    out = root / "abl"
    run_ablation(AblationConfig(config=str(root / "grid.toml"), out=str(out)), progress=False)
    return out
