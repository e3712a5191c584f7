"""Write side of the HDF5 feature store: features of any modules at many noise levels.

``extract(ExtractConfig(...))`` is what ``probe extract`` calls; ``extract_features(...)`` is the
same with keyword arguments. For every sample of a data split and every noise level sigma it runs
the model's denoiser on ``x = y + sigma * eps`` (``source="denoiser"``; sigma = 0 is the clean
image), or a one-step generator on its own input ``sigma_init * z`` (``source="generation"``), and
stores the pooled output of each hooked module in the layout of DESIGN.md (see probe/features/store.py).

Noise. Each sample gets ONE unit-Gaussian tensor ``eps`` determined by (noise_seed, sample_id)
alone, reused for every sigma (scaled by sigma). So the inputs do not depend on the batch size,
the model, the sigma list or its order, or on ``n_samples``: two models extracted with the same
data, seed and sigmas see exactly the same noisy inputs (row-aligned files, for CKA), and
comparisons across sigmas are not blurred by a fresh draw per level. ``source="generation"``
uses the same tensor as ``z``, so its inputs equal the denoiser's at sigma_init with y = 0.

Streaming and resume. Datasets /features/<layer> [S, N, D] are created up front (chunked, one
chunk per sigma and batch where it fits 1 MiB, compressed) and filled batch by batch, so memory
does not grow with N. Compression defaults to lzf: float activations shrink only 5-15% under
either filter, and gzip's cost is comparable to a small UNet's forward pass (benchmarks/RESULTS.md).
After each batch is flushed the root attribute ``rows_done`` advances;
``complete`` turns True only after the last row is flushed. Running the same extraction again
continues from ``rows_done`` (or does nothing when complete); a file at ``out`` made by another
model or with other arguments is refused and left untouched. A new file is first written as a
complete skeleton under a temporary name and renamed into place, so ``out`` never holds a file
without the header that identifies it. One process writes a file at a time (``probe/core/locks.py``:
a second one is refused at once, naming the holder); every chunk carries a fletcher32 checksum, so
a damaged chunk is a read error (``FeatureStore`` turns it into a one-line ``UserError``), never
silent garbage.

Several processes (``torchrun --nproc_per_node=K probe extract ...``, see probe/core/distributed.py):
the rows are processed in rounds of K batches; rank r runs the r-th batch of each round (the
same rows a single process would run as one batch), rank 0 gathers the K results and writes
the round. The file is therefore identical to a single process's, bit for bit in float32, and
resumes with any K.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from probe import __version__
from probe.core.distributed import barrier, distributed_session, gather_to_main, is_main, on_main, rank, world_size
from probe.core.errors import UserError
from probe.core.locks import exclusive
from probe.core.progress import progress_bar
from probe.core.runs import test_point
from probe.features.hooks import (
    FeatureHooks,
    parse_pooling,
    pooled_dim,
    resolve_layers,
    to_numpy_per_layer,
    trace_modules,
)
from probe.features.store import FORMAT, FORMAT_VERSION, LAYER_ORDER_ATTR

if TYPE_CHECKING:  # load_model is imported where a model is loaded
    from probe.core.models import LoadedModel

DEFAULT_SIGMAS = (0.0, 0.1, 0.5, 2.0, 10.0)   # clean, low, moderate, high, near pure noise
SOURCES = ("denoiser", "generation")
DTYPES = {"float32": np.float32, "float16": np.float16}
COMPRESSIONS = ("gzip", "lzf", "none")
CHUNK_BYTES = 1 << 20                         # target chunk size: h5py's default chunk cache


@dataclass
class ExtractConfig:
    model: str                          # MODEL: toolkit run dir or diffusers UNet2DModel / DDPMPipeline dir
    out: str                            # feature file (.h5) to write, or to resume when incomplete
    data: str = "digits"                # data set (probe/core/data.py); not read for source="generation"
    layers: tuple = ()                  # module paths / fnmatch patterns / "default"; () = default selection
    sigmas: tuple | None = None         # EDM noise levels, 0 = clean; None = DEFAULT_SIGMAS (generation: sigma_init)
    pooling: str = "mean"               # "mean" (global average) | "flatten" | "avgK" (K x K adaptive average)
    dtype: str = "float32"              # stored feature type: "float32" | "float16"
    batch: int = 256                    # samples per forward pass and process (does not change the noise)
    split: str = "test"                 # data split: "train" | "test"
    n_samples: int | None = None        # first n samples of the split; None = all (generation: required)
    noise_seed: int = 0                 # seed of the per-sample noise eps (>= 0)
    source: str = "denoiser"            # "denoiser": D(y + sigma eps; sigma) | "generation": G(z), one-step generators
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    data_root: str | None = None        # where mnist / cifar10 live; None = the toolkit's cache
    compression: str = "lzf"            # "lzf" (+ shuffle; fast, bundled with h5py) | "gzip" (level 1 + shuffle;
                                        # any HDF5 reader, ~3x slower) | "none"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad option values before any model is loaded or file written; runs on construction."""
        from probe.core import checks as c

        c.one_of(self.source, "source", SOURCES)
        if self.sigmas is not None:
            c.sigma_list(self.sigmas)
        if isinstance(self.layers, str) or not all(isinstance(x, str) for x in self.layers):
            raise UserError(f"layers must be a list of module paths or globs, got {self.layers!r}")
        parse_pooling(self.pooling)
        c.one_of(self.dtype, "dtype", tuple(DTYPES))
        c.one_of(self.compression, "compression", COMPRESSIONS)
        c.one_of(self.split, "split", ("train", "test"))
        c.positive_int(self.batch, "batch")
        if self.n_samples is not None:
            c.positive_int(self.n_samples, "n_samples")
        c.seed(self.noise_seed, "noise_seed")
        c.device(self.device)


# ------------------------------------------------------------------------------------- noise
def sample_noise(noise_seed: int, sample_ids, shape: tuple) -> torch.Tensor:
    """Unit Gaussian [len(sample_ids), *shape], a fixed function of (noise_seed, sample_id).

    Hand-written because numpy's ``standard_normal`` consumes a variable number of random words,
    so per-sample streams would need one generator per sample (~60 us each). Instead sample i owns
    a fixed block range [i * stride, (i + 1) * stride) of the counter-based Philox stream keyed by
    noise_seed; Box-Muller turns pairs of its uniforms into normals. A contiguous run of ids is one
    vectorised draw, and the result is the same whatever the batching.
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    size = int(np.prod(shape))
    pairs = (size + 1) // 2
    stride = (2 * pairs + 3) // 4                 # Philox yields 4 uint64 words per counter block
    out = np.empty((len(ids), size), dtype=np.float32)
    if len(ids) == 0:
        return torch.from_numpy(out.reshape(0, *shape))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(np.arange(len(ids)), breaks):
        first = int(ids[run[0]])
        bitgen = np.random.Philox(key=int(noise_seed), counter=[first * stride, 0, 0, 0])
        words = bitgen.random_raw(len(run) * stride * 4).reshape(len(run), stride * 4)[:, : 2 * pairs]
        u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53      # [0, 1), 53 random bits
        u1, u2 = 1.0 - u[:, 0::2], u[:, 1::2]                            # u1 in (0, 1]: log is finite
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.empty((len(run), 2 * pairs))
        z[:, 0::2], z[:, 1::2] = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
        out[run] = z[:, :size]
    return torch.from_numpy(out.reshape(len(ids), *shape))


# ---------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    """Everything resolved before the first forward pass."""

    model: LoadedModel
    layers: list
    sigmas: np.ndarray                  # float64 [S]
    images: torch.Tensor | None         # [N, C, H, W] in [-1, 1]; None for source="generation"
    labels: np.ndarray                  # int64 [N]
    sample_ids: np.ndarray              # int64 [N]
    factors: dict
    dataset: str
    split: str
    shape: tuple                        # (C, H, W) of one input
    raw_shapes: dict                    # layer -> un-pooled output shape of one sample
    identity: dict                      # what makes two extractions the same (checked on resume)


def check_config(cfg: ExtractConfig) -> None:
    """Refuse bad arguments before any model is loaded."""
    cfg.validate()  # again: fields may have been changed after construction
    if Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a directory; give a file name such as features.h5")


def _plan(cfg: ExtractConfig, device) -> _Plan:
    from probe.core.data import load_dataset
    from probe.core.models import load_model

    model = load_model(cfg.model, device)
    order, raw_shapes, calls = trace_modules(model)
    usable = {p for p in raw_shapes if calls[p] == 1}
    layers = resolve_layers(model.unet, list(cfg.layers), order, usable=usable)
    shape = (model.channels, model.resolution, model.resolution)
    if cfg.source == "generation":
        if model.generator is None:
            raise UserError(f"source 'generation' needs a one-step generator; {cfg.model} is a {model.kind}")
        sigma_init = model.generator.sigma_init
        if cfg.sigmas is not None and not (len(cfg.sigmas) == 1 and math.isclose(float(cfg.sigmas[0]), sigma_init,
                                                                                  rel_tol=1e-6)):
            raise UserError(f"source 'generation' runs at the generator's sigma_init = {sigma_init:g} only; "
                            "leave sigmas out or pass exactly that value")
        if cfg.n_samples is None:
            raise UserError("source 'generation' needs n_samples (how many noise inputs z to draw)")
        n = int(cfg.n_samples)
        sigmas, images, dataset, split = [sigma_init], None, "generation", "none"
        labels, factors = np.full(n, -1, np.int64), {}
        data_hash = "none"
    else:
        data = load_dataset(cfg.data, cfg.split, cfg.data_root)
        if (data.channels, data.resolution) != shape[:2]:
            raise UserError(f"{cfg.model} takes {shape[0]}x{shape[1]}x{shape[2]} images but {cfg.data} has "
                            f"{data.channels}x{data.resolution}x{data.resolution}")
        n = len(data) if cfg.n_samples is None else int(cfg.n_samples)
        if n > len(data):
            raise UserError(f"n_samples {n} exceeds the {len(data)} samples of {cfg.data} ({cfg.split})")
        sigmas = list(DEFAULT_SIGMAS) if cfg.sigmas is None else [float(s) for s in cfg.sigmas]
        images, dataset, split = data.images[:n], data.name, cfg.split
        labels = data.labels[:n].numpy().astype(np.int64)
        factors = {k: np.asarray(v)[:n] for k, v in data.factors.items()}
        data_hash = hashlib.sha256(images.numpy().tobytes() + labels.tobytes()).hexdigest()
    raw_shapes = {layer: raw_shapes[layer] for layer in layers}
    identity = {"model_sha256": model.sha256(), "source": cfg.source, "dataset": dataset, "split": split,
                "data_sha256": data_hash, "n_samples": n, "layers": layers, "sigmas": [float(s) for s in sigmas],
                "pooling": cfg.pooling, "dtype": cfg.dtype, "noise_seed": int(cfg.noise_seed)}
    return _Plan(model, layers, np.asarray(sigmas, np.float64), images, labels, np.arange(n, dtype=np.int64),
                 factors, dataset, split, shape, raw_shapes, identity)


# ------------------------------------------------------------------------------ the HDF5 file
def _existing_state(path: Path, identity: dict) -> tuple[str, int]:
    """("new", 0) | ("resume", rows_done) | ("complete", n); refuses a foreign file untouched."""
    if not path.exists():
        return "new", 0
    hint = "choose another --out, or delete the file to start over"
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} exists and is not a feature file; refusing to overwrite it ({hint})")
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            args = f.attrs.get("args_json")
            done, complete = int(f.attrs.get("rows_done", 0)), bool(f.attrs.get("complete", False))
    except (OSError, ValueError, TypeError) as err:  # we hold its lock, so no other extraction writes it
        raise UserError(f"{path} is damaged: cannot read its header ({str(err)[:120]}); {hint}") from None
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt != FORMAT or args is None:
        raise UserError(f"{path} exists and is not an onestep-probe feature file; refusing to overwrite it ({hint})")
    try:
        old = json.loads(args)["identity"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} has an unreadable args_json attribute; refusing to touch it ({hint})") from None
    changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if changed:
        raise UserError(f"{path} holds another extraction (different {', '.join(changed)}); "
                        f"refusing to touch it ({hint})")
    if complete:
        return "complete", identity["n_samples"]
    if not 0 <= done <= identity["n_samples"]:
        raise UserError(f"{path} is damaged (rows_done={done}); delete it to start over")
    return "resume", done


def _chunk_rows(batch: int, row_bytes: int) -> int:
    """Rows per chunk: the whole batch if it fits CHUNK_BYTES, else the largest divisor of batch
    that does, so each batch write fills whole chunks (no read-modify-write of compressed chunks)."""
    fit = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return max(d for d in range(1, min(batch, fit) + 1) if batch % d == 0)


def _create(path: Path, cfg: ExtractConfig, plan: _Plan) -> None:
    """Write the complete skeleton (header, side arrays, empty feature datasets) and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n, s = len(plan.sample_ids), len(plan.sigmas)
    dtype = DTYPES[cfg.dtype]
    filters = {"gzip": dict(compression="gzip", compression_opts=1, shuffle=True),
               "lzf": dict(compression="lzf", shuffle=True), "none": {}}[cfg.compression]
    args = {"config": dataclasses.asdict(cfg), "identity": plan.identity}
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "model": str(cfg.model),
             "model_sha256": plan.identity["model_sha256"], "dataset": plan.dataset, "split": plan.split,
             "pooling": cfg.pooling, "noise_seed": int(cfg.noise_seed),
             "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "toolkit_version": __version__, "source": cfg.source,
             "args_json": json.dumps(args, sort_keys=True, default=str), "rows_done": 0}
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            f.create_dataset("sigmas", data=plan.sigmas)
            f.create_dataset("labels", data=plan.labels)
            f.create_dataset("sample_ids", data=plan.sample_ids)
            if plan.factors:
                g = f.create_group("factors")
                for name, values in plan.factors.items():
                    g.create_dataset(name, data=values)
            g = f.create_group("features", track_order=True)
            g.attrs[LAYER_ORDER_ATTR] = plan.layers
            for layer in plan.layers:
                d = pooled_dim(plan.raw_shapes[layer], cfg.pooling)
                rows = _chunk_rows(min(int(cfg.batch), n), d * np.dtype(dtype).itemsize)
                # fletcher32: a checksum per chunk, so a damaged chunk is an error on read, never silent garbage
                ds = g.create_dataset(layer, shape=(s, n, d), dtype=dtype, chunks=(1, rows, d), fletcher32=True,
                                      **filters)
                ds.attrs["raw_shape"] = np.asarray(plan.raw_shapes[layer], np.int64)
                ds.attrs["pooling"] = cfg.pooling
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------- extraction
@torch.no_grad()
def _batch_features(plan: _Plan, hooks: FeatureHooks, source: str, ids: np.ndarray, rows: slice,
                    noise_seed: int, device) -> dict:
    """{layer: float32 [S, B, D]} for one batch of samples at every sigma."""
    eps = sample_noise(noise_seed, ids, plan.shape).to(device)
    per_sigma = []
    for sigma in plan.sigmas:
        if source == "generation":
            assert plan.model.generator is not None  # _plan refuses generation from a non-generator
            plan.model.generator(eps)                        # D(sigma_init * z; sigma_init)
        else:
            assert plan.images is not None  # images are loaded for every source but generation
            y = plan.images[rows].to(device)
            plan.model.denoiser(y + float(sigma) * eps, float(sigma))
        per_sigma.append(hooks.take())
    return to_numpy_per_layer(per_sigma, plan.layers)


def extract(cfg: ExtractConfig, progress: bool = True, stop_after_batches: int | None = None,
            overwrite: bool = False) -> Path:
    """Extract (or resume, or confirm complete) the feature file ``cfg.out``; returns its path.

    progress           : show a rich progress bar (rank 0 only)                         (default True)
    stop_after_batches : return after this many rounds of one batch per process, leaving
                         the file incomplete; simulates a kill for tests                   (default None)
    overwrite          : replace whatever file is at ``cfg.out`` instead of refusing it (default False)
    Under torchrun every process calls this with the same config.
    """
    check_config(cfg)
    with distributed_session(cfg.device) as device:
        return _extract(cfg, device, progress and is_main(), stop_after_batches, overwrite)


def _prepare_file(out: Path, cfg: ExtractConfig, plan: _Plan, overwrite: bool) -> tuple[str, int]:
    """(state, rows_done) of ``out`` after creating it when new; checks it can be opened for writing."""
    state, done = ("new", 0) if overwrite else _existing_state(out, plan.identity)
    if state == "complete":
        return state, done
    if state == "new":
        _create(out, cfg, plan)
    try:
        h5py.File(out, "r+").close()
    except OSError as err:  # HDF5's own lock: a reader (an analysis) has it open
        raise UserError(f"cannot open {out} for writing: {str(err)[:120]} (is an analysis reading it?)") from None
    return state, done


def _extract(cfg: ExtractConfig, device, progress: bool, stop_after_batches: int | None, overwrite: bool) -> Path:
    plan = _plan(cfg, device)
    with ExitStack() as stack:
        # one writer per feature file (probe/core/locks.py), held by rank 0; a refusal stops every rank
        on_main(lambda: str(stack.enter_context(exclusive(cfg.out, "feature extraction"))))
        try:
            return _extract_locked(cfg, plan, device, progress, stop_after_batches, overwrite)
        except OSError as err:  # HDF5 write / flush failures: disk full, a file damaged under us
            raise UserError(f"cannot write {cfg.out}: {str(err)[:160]}; rows written before stay, rerun to "
                            "resume") from None


def _extract_locked(cfg: ExtractConfig, plan: _Plan, device, progress: bool, stop_after_batches: int | None,
                    overwrite: bool) -> Path:
    out = Path(cfg.out)
    state, done = on_main(_prepare_file, out, cfg, plan, overwrite)  # rank 0 owns the file
    if state == "complete":
        return out
    if state == "resume" and is_main():
        print(f"resumed from row {done} of {len(plan.sample_ids)} ({out})", file=sys.stderr)
    n, batch, me = len(plan.sample_ids), int(cfg.batch), rank()
    per_round = batch * world_size()
    np_dtype = DTYPES[cfg.dtype]
    with ExitStack() as stack:
        f = stack.enter_context(h5py.File(out, "r+")) if is_main() else None
        hooks = stack.enter_context(FeatureHooks(plan.model.unet, plan.layers, cfg.pooling))
        advance = stack.enter_context(progress_bar(n, f"extract {Path(cfg.model).name}", progress, completed=done))
        dsets = {layer: f["features"][layer] for layer in plan.layers} if f is not None else {}
        for count, r0 in enumerate(range(done, n, per_round), start=1):
            end = min(r0 + per_round, n)
            mine = slice(min(r0 + me * batch, end), min(r0 + (me + 1) * batch, end))  # this rank's batch
            feats = None
            if mine.stop > mine.start:
                feats = _batch_features(plan, hooks, cfg.source, plan.sample_ids[mine], mine, int(cfg.noise_seed),
                                        device)
            parts = [p for p in gather_to_main(feats) or [] if p is not None]   # rank order = row order
            if f is not None:
                for layer in plan.layers:
                    values = parts[0][layer] if len(parts) == 1 else np.concatenate([p[layer] for p in parts], 1)
                    dsets[layer][:, r0:end, :] = values.astype(np_dtype)   # one slab per layer and round
                f.flush()                      # data on disk before the counter says so
                f.attrs["rows_done"] = end
                f.flush()
                test_point(f"rows:{end}")
            advance(end - r0)
            if stop_after_batches is not None and count >= stop_after_batches and end < n:
                barrier()
                return out
        if f is not None:
            f.attrs["complete"] = True
            f.flush()
    barrier()  # no rank returns before rank 0 has closed the complete file
    return out


def extract_features(model_path, data: str = "digits", layers=(), sigmas=None, out: str = "features.h5",
                     progress: bool = True, stop_after_batches: int | None = None, overwrite: bool = False,
                     **options) -> Path:
    """Keyword form of ``extract``: ``options`` are the other ExtractConfig fields (pooling, dtype,
    batch, split, n_samples, noise_seed, source, device, data_root, compression)."""
    known = {f.name for f in dataclasses.fields(ExtractConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown extraction option(s): {', '.join(unknown)}")
    layers = (layers,) if isinstance(layers, str) else tuple(layers or ())
    sigmas = None if sigmas is None else tuple(float(s) for s in sigmas)
    cfg = ExtractConfig(model=str(model_path), out=str(out), data=data, layers=layers, sigmas=sigmas, **options)
    return extract(cfg, progress=progress, stop_after_batches=stop_after_batches, overwrite=overwrite)
