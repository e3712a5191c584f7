"""Multi-process training and extraction on torch.distributed, as launched by ``torchrun``.

``torchrun --nproc_per_node=K probe train teacher ...`` starts K copies of the command with the
environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. The
functions here turn that into a process group (NCCL on CUDA, gloo on CPU) and give the training
loops and the extractor what they need; a plain single process (no WORLD_SIZE, or 1) makes every
helper a no-op: a single process is world size 1 of the same code path (the one student step,
``train/student/step.py``, and the teacher loop).

How runs stay equal whatever the number of processes K:

- Global randomness. Every rank draws the GLOBAL batch's random numbers (batch indices, sigmas,
  noise, z) from the same CPU ``torch.Generator`` seeded identically, then takes its own rows
  (``split_batch``). So the random stream, and the checkpointed generator state, do not depend
  on K, and exact resume works as in a single process.
- Global batch. ``split_batch(batch, K, rank, accum)`` gives each rank a contiguous block of the
  global batch, cut into ``accum`` micro-batches. Each micro-batch's mean loss is multiplied by
  ``Micro.scale = rows * K / batch``; DDP averages gradients over the K ranks, so the summed
  gradient is that of the mean over the whole global batch (also when rows do not divide evenly).
  Every accumulation round but the last runs under ``no_sync`` for every wrapped network.
- Rank-offset seeds. Random numbers that must differ between micro-batches and that a network
  or a method draws for itself from the shape of its input (a method's sigmas and noise, dropout)
  come from ``micro_generator(base, index)`` keyed by the GLOBAL micro-batch index
  ``rank * accum + a``, not by the rank alone: a run with K ranks and ``accum`` A then equals a
  single process with ``accum`` K * A (same rows, same seeds, same micro-batches).
- Files. Rank 0 writes (run directory, checkpoints after a barrier, metrics, feature files);
  every rank reads (resume). ``on_main`` runs a set-up step on rank 0 and hands its result, or its
  ``UserError``, to every rank, so all ranks stop with the same one-line message.
"""

from __future__ import annotations

import atexit
import inspect
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from probe.core.errors import UserError

MICRO_SEED_STRIDE = 1_000_003   # prime gap between the seeds of consecutive micro-batches


# ------------------------------------------------------------------------------ process group
def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: str = "auto") -> tuple[torch.device, bool]:
    """Join the process group torchrun describes; returns (this process's device, joined now).

    device : "auto" | "cpu" | "cuda" as in the configs; with several processes "cuda" becomes
             cuda:LOCAL_RANK (one GPU per process)                                 (default "auto")
    A single process, or one whose group is already initialised (by the caller), joins nothing.
    """
    from probe.core.runs import pick_device

    base = pick_device(device)
    if env_world_size() <= 1 and not is_distributed():
        return base, False
    if base.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) visible; "
                            "use --nproc_per_node <= the number of GPUs")
        base = torch.device("cuda", local_rank())
        torch.cuda.set_device(base)
    if is_distributed():
        return base, False
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE is set but {var} is not; launch with torchrun")
    if base.type == "cuda":
        dist.init_process_group("nccl", device_id=base)
    else:
        dist.init_process_group("gloo")
    # Left at exit, not after each command: re-creating the group on the same MASTER_PORT within one
    # process races with the other ranks reconnecting to the old rendezvous store (hangs).
    atexit.register(_destroy_at_exit)
    return base, True


def _destroy_at_exit() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: str = "auto"):
    """``with distributed_session(cfg.device) as device:`` joins the group when torchrun started
    this process (once per process; it is left at exit, so several commands may run in one)."""
    dev, _ = init_distributed(device)
    yield dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its (picklable) result on every rank.

    A ``UserError`` raised on rank 0 is raised on every rank with the same message, so a refused
    run directory or feature file stops all processes cleanly instead of hanging them.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[tuple[str, Any] | None] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except UserError as err:
            box[0] = ("error", (type(err), str(err)))   # the class keeps its exit code (RunDiverged: 3)
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None  # rank 0 filled it in before the broadcast
    status, value = box[0]
    if status == "error":
        raise value[0](value[1])
    return value


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_mean(values: dict, device: torch.device | None = None) -> dict:
    """Mean over ranks of a dict of float scalars (logged losses, accuracies); unchanged when alone.

    device : where the reduction tensor lives; must be a CUDA device under NCCL (default: CPU)
    """
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------- batch splitting
@dataclass(frozen=True)
class Micro:
    """One micro-batch of one rank: rows of the global batch and its loss weight."""

    index: int          # global micro-batch index, rank * accum + a (keys micro_generator)
    rows: slice         # rows of the global batch
    scale: float        # multiply the micro-batch's MEAN loss by this (rows * world / global batch)

    def weight(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``; exactly ``loss`` when scale is 1 (single process, no accumulation)."""
        return loss if self.scale == 1.0 else loss * self.scale

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


def _even_bounds(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Cut [start, stop) into ``parts`` contiguous pieces whose sizes differ by at most one."""
    n = stop - start
    cuts = [start + (n * i) // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def split_batch(global_batch: int, world: int | None = None, rank_: int | None = None,
                accum: int = 1) -> list[Micro]:
    """This rank's micro-batches of a global batch: a contiguous block per rank, cut into ``accum``.

    global_batch : rows of the global batch (the config's ``batch``)
    world        : number of processes                          (default: the current world size)
    rank_        : this process's rank                           (default: the current rank)
    accum        : micro-batches per process and step            (default 1)
    """
    world = world_size() if world is None else int(world)
    rank_ = rank() if rank_ is None else int(rank_)
    if accum < 1:
        raise UserError(f"accum must be >= 1, got {accum}")
    if global_batch < world * accum:
        raise UserError(f"batch {global_batch} is smaller than processes x accum = {world} x {accum}; "
                        "every micro-batch needs at least one row")
    lo, hi = _even_bounds(0, global_batch, world)[rank_]
    return [Micro(rank_ * accum + a, slice(a0, a1), (a1 - a0) * world / global_batch)
            for a, (a0, a1) in enumerate(_even_bounds(lo, hi, accum))]


def micro_generator(base_seed: int, micro: Micro | int, device: str = "cpu") -> torch.Generator:
    """A generator for randomness drawn per micro-batch, keyed by the GLOBAL micro index.

    base_seed : a seed drawn once per step from the run's main generator (same on every rank)
    micro     : the Micro (or its global index)
    """
    index = micro.index if isinstance(micro, Micro) else int(micro)
    return torch.Generator(device).manual_seed((int(base_seed) + MICRO_SEED_STRIDE * index) % (2 ** 63))


def step_seed(rng: torch.Generator) -> int:
    """One seed per step from the main generator (advances it identically on every rank)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=rng))


# ------------------------------------------------------------------------------------ DDP
def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around a TRAINABLE network; the module itself when alone.

    Frozen networks (a teacher) stay unwrapped. Buffers are constants here (noise schedules), so
    they are not re-broadcast at every forward. Keep the unwrapped module for state_dict, EMA and
    optimisers; call the wrapper for the forward passes whose gradients must be averaged.

    find_unused : let DDP tolerate parameters without gradients (costs a graph walk) (default False)
    """
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    # newer torch renamed broadcast_buffers (and warns on the old name); buffers are equal at init anyway
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    sync: dict[str, Any] = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused, **sync)


@contextmanager
def no_sync(*modules: nn.Module, enabled: bool = True):
    """Skip the gradient all-reduce of every DDP-wrapped module (accumulation rounds but the last).

    Forward AND backward of the round must happen inside. Non-DDP modules are ignored, so this is
    a no-op in a single process.
    """
    with ExitStack() as stack:
        if enabled:
            for m in modules:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield


@contextmanager
def swap_attr(obj, name: str, value):
    """Temporarily set ``obj.name = value`` (e.g. a method's ``aux`` to its DDP wrapper)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield obj
    finally:
        setattr(obj, name, old)


# ------------------------------------------------------------------------------------- CUDA
def cuda_speedups(device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on CUDA (no effect on CPU).

    TF32 keeps float32 range with a 10-bit mantissa in tensor-core products; training losses and
    optimiser states stay float32. CUDA runs are not promised bitwise determinism (CPU runs are).
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (range of float32, no loss scaling needed); disabled on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
