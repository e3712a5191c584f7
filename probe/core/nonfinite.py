"""One NaN policy for every training loop (teacher, student, regression).

A step whose loss or gradient is not finite is skipped: the optimiser does not move, so Adam's
moments and the weights are never poisoned. ``NonFiniteGuard`` counts skipped steps (logged as
``skipped_steps`` and ``nonfinite_in_a_row``, and saved in the checkpoint for exact resume) and
stops the run with ``RunDiverged`` (exit code 3, one line) after ``max_in_a_row`` bad steps in a
row. Checkpoints only ever hold finite weights: ``check_finite`` refuses to save anything else,
so the last good checkpoint stays on disk.

Under torch.distributed every rank reaches the same decision: gradients are compared after DDP's
all-reduce (identical on every rank), and the loss flag is reduced over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from probe.core.errors import RunDiverged

DEFAULT_MAX_NONFINITE = 10   # bad steps in a row that stop a run


def _all_ranks_finite(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() == 0.0)


def guarded_step(opt: torch.optim.Optimizer, params: list, grad_clip: float,
                 loss_finite: bool = True) -> tuple[float, bool]:
    """Optimiser step on gradients already accumulated (and all-reduced); returns (norm, stepped).

    A non-finite gradient norm, or ``loss_finite`` False on any rank, skips the step (gradients are
    dropped). ``grad_clip`` > 0 clips the total norm first.
    """
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
    if not _all_ranks_finite(bool(torch.isfinite(norm)) and loss_finite):
        opt.zero_grad(set_to_none=True)
        return float(norm), False
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(norm), True


def is_finite(value) -> bool:
    """A loss (tensor or float) is finite."""
    return bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all())


class NonFiniteGuard:
    """Counts bad steps and stops the run after too many in a row.

    max_in_a_row : bad steps in a row that raise RunDiverged                     (default 10)
    state        : a previous ``state_dict()`` (resume)                          (default None)
    """

    def __init__(self, max_in_a_row: int = DEFAULT_MAX_NONFINITE, state: dict | None = None):
        self.max_in_a_row = int(max_in_a_row)
        state = state or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.last_good_checkpoint = state.get("last_good_checkpoint")

    def update(self, ok: bool, step: int, where: str, log=None) -> None:
        """Record step ``step`` (1-based) as good or bad; raises RunDiverged after too many bad ones.

        where : the run directory, named in the message
        log   : a MetricsLog that gets a last row (step, counters, ``diverged``) before the stop (default None)
        """
        if ok:
            self.in_a_row = 0
            return
        self.skipped_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            if log is not None:
                log.log(step=step, diverged=True, **self.metrics())
            kept = (f"the last checkpoint (step {self.last_good_checkpoint}) is kept"
                    if self.last_good_checkpoint is not None else "no checkpoint was written")
            raise RunDiverged(f"run diverged: {self.in_a_row} steps in a row (up to step {step}) had a non-finite "
                              f"loss or gradient and were skipped; {kept} in {where}; lower the learning rate "
                              f"or clip gradients and start a new run")

    def saved(self, step: int) -> None:
        self.last_good_checkpoint = int(step)

    def metrics(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.in_a_row}

    def state_dict(self) -> dict:
        return {**self.metrics(), "last_good_checkpoint": self.last_good_checkpoint}


def check_finite(modules: dict, where: str) -> None:
    """Refuse to checkpoint non-finite weights: RunDiverged naming the first bad tensor."""
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RunDiverged(f"run diverged: {name} weight {key} is not finite; the checkpoint in {where} "
                                  "was not overwritten; lower the learning rate and start a new run")
