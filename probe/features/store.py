"""Read side of the HDF5 feature store, and the constants its writer shares.

The layout is a contract (see DESIGN.md) and must stay readable with plain h5py:

    /                 attrs: format, format_version, complete, model, model_sha256, dataset, split,
                      pooling, noise_seed, created_utc, toolkit_version (optional: source)
    /sigmas           float64 [S]
    /labels           int64   [N]   (-1 where unknown)
    /sample_ids       int64   [N]
    /factors/<name>   [N]           optional further targets
    /features/<layer> float32|float16 [S, N, D]   attrs: raw_shape, pooling

``FeatureStore`` opens such a file for the analyses (probes, CKA, UMAP). Everything a user can get
wrong with a path (missing, not HDF5, someone else's HDF5, written by a newer toolkit, interrupted
extraction, unknown layer or sigma, a damaged chunk or header, non-finite values) ends in a one-line
``UserError``. A file without its ``complete`` flag is refused (``probe extract`` resumes it), never
analysed as complete.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator

import h5py
import numpy as np

from probe.core.errors import UserError

FORMAT = "onestep-probe.features"
FORMAT_VERSION = 1

# Optional attribute of /features listing layer names in extraction order. Without it (or without
# track_order on the group) HDF5 iterates names alphabetically, which scrambles network order.
LAYER_ORDER_ATTR = "layer_order"

# Relative tolerance when a user names a sigma by value (values printed in CSVs are rounded).
_SIGMA_RTOL = 1e-3


def _decode(value):
    """HDF5 attributes come back as bytes / numpy scalars; give plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{text} (delete it and extract again)" if text else f"{type(err).__name__} (delete it and extract again)"


def _read(path: str, what: str, read):
    """``read()`` of HDF5 data; a damaged chunk (checksum or filter failure) becomes a one-line UserError,
    and so do values that are not finite (features of a working model always are)."""
    try:
        out = np.asarray(read(), dtype=np.float32)
    except OSError as err:
        raise UserError(f"{path} is damaged: reading {what} failed: {_reason(err)}") from None
    if not np.isfinite(out).all():
        raise UserError(f"{path} holds non-finite values in {what} (a damaged file or a diverged model); "
                        "extract it again")
    return out


def _one_line_close_matches(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return f"{hint} (available: {', '.join(choices) if choices else 'none'})"


class FeatureStore:
    """A read-only view of one feature file; use ``FeatureStore.open(path)``."""

    def __init__(self, path: str, h5: h5py.File):
        self._path = str(path)
        self._h5 = h5
        self._attrs = {k: _decode(v) for k, v in h5.attrs.items()}
        self._sigmas = np.asarray(h5["sigmas"][()], dtype=np.float64)
        self._labels = np.asarray(h5["labels"][()], dtype=np.int64)
        self._sample_ids = np.asarray(h5["sample_ids"][()], dtype=np.int64)
        self._factors = {name: np.asarray(ds[()]) for name, ds in h5["factors"].items()} if "factors" in h5 else {}
        self._layers = self._read_layer_order(h5["features"]) if "features" in h5 else []

    # ----------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, path, allow_incomplete: bool = False) -> FeatureStore:
        """Open ``path`` for reading; refuse anything that is not a complete feature file."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise UserError(f"feature file not found: {path}")
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory, not a feature file (.h5)")
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file (expected a feature file written by `probe extract`)")
        try:
            h5 = h5py.File(path, "r")
        except OSError as err:  # typically the file lock of a writer that is still running
            raise UserError(f"cannot open {path}: {err} (is `probe extract` still writing it?)") from None
        try:
            cls._check_header(path, h5, allow_incomplete)
            return cls(path, h5)
        except (OSError, KeyError, ValueError, TypeError) as err:  # h5py's errors for a damaged file
            h5.close()
            raise UserError(f"{path} is damaged: {_reason(err)}") from None
        except BaseException:
            h5.close()
            raise

    @staticmethod
    def _check_header(path: str, h5: h5py.File, allow_incomplete: bool) -> None:
        fmt = _decode(h5.attrs.get("format"))
        if fmt != FORMAT:
            raise UserError(f"{path} is not an onestep-probe feature file (format attribute is {fmt!r}, "
                            f"expected {FORMAT!r})")
        version = _decode(h5.attrs.get("format_version"))
        if not isinstance(version, int):
            raise UserError(f"{path} has no valid format_version attribute; not a feature file this toolkit wrote")
        if version > FORMAT_VERSION:
            raise UserError(f"{path} has format_version {version}, newer than this toolkit reads "
                            f"({FORMAT_VERSION}); upgrade onestep-probe")
        if not allow_incomplete and not bool(_decode(h5.attrs.get("complete", False))):
            raise UserError(f"{path} is incomplete (extraction was interrupted); "
                            "run the same `probe extract` again to resume")
        missing = [name for name in ("sigmas", "labels", "sample_ids", "features") if name not in h5]
        if missing:
            raise UserError(f"{path} is damaged: missing {', '.join('/' + m for m in missing)}")

    @staticmethod
    def _read_layer_order(group: h5py.Group) -> list[str]:
        names = list(group.keys())  # creation order when the writer set track_order, else by name
        order = _decode(group.attrs.get(LAYER_ORDER_ATTR))
        if isinstance(order, list) and sorted(order) == sorted(names):
            return [str(n) for n in order]
        return names

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FeatureStore({self._path!r}, layers={len(self._layers)}, sigmas={len(self._sigmas)}, "
                f"n={self.n_samples})")

    # ----------------------------------------------------------------------------------- properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def name(self) -> str:
        """Short label for tables and figure titles: the model attribute, else the file name."""
        return str(self._attrs.get("model") or os.path.basename(self._path))

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def sigmas(self) -> np.ndarray:
        return self._sigmas.copy()

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @property
    def sample_ids(self) -> np.ndarray:
        return self._sample_ids.copy()

    @property
    def factors(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._factors.items()}

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @property
    def source(self) -> str | None:
        value = self._attrs.get("source")
        return None if value is None else str(value)

    @property
    def n_samples(self) -> int:
        return int(self._sample_ids.shape[0])

    # -------------------------------------------------------------------------------------- lookups

    def check_layer(self, layer: str) -> str:
        """Return ``layer`` if the file has it, else raise a UserError naming close matches."""
        if layer not in self._layers:
            raise UserError(f"unknown layer {layer!r} in {self._path};" + _one_line_close_matches(layer, self._layers))
        return layer

    def sigma_index(self, sigma: float) -> int:
        """Index of the stored noise level equal (or very close) to ``sigma``."""
        sigma = float(sigma)
        close = np.isclose(self._sigmas, sigma, rtol=_SIGMA_RTOL, atol=1e-9)
        if not close.any():
            avail = ", ".join(f"{s:g}" for s in self._sigmas)
            raise UserError(f"sigma {sigma:g} is not in {self._path} (available: {avail})")
        candidates = np.flatnonzero(close)
        return int(candidates[np.argmin(np.abs(self._sigmas[candidates] - sigma))])

    def _check_sigma_index(self, sigma_index: int) -> int:
        s = len(self._sigmas)
        if not -s <= int(sigma_index) < s:
            raise UserError(f"sigma index {sigma_index} out of range for {self._path} ({s} sigmas)")
        return int(sigma_index) % s

    def _dataset(self, layer: str) -> h5py.Dataset:
        try:
            ds = self._h5["features"][self.check_layer(layer)]
        except (OSError, KeyError) as err:
            raise UserError(f"{self._path} is damaged: cannot open /features/{layer}: {_reason(err)}") from None
        if ds.ndim != 3 or ds.shape[0] != len(self._sigmas) or ds.shape[1] != self.n_samples:
            raise UserError(f"{self._path} is damaged: /features/{layer} has shape {ds.shape}, "
                            f"expected ({len(self._sigmas)}, {self.n_samples}, D)")
        return ds

    def shape(self, layer: str) -> tuple[int, int, int]:
        """(S, N, D) of one layer's features."""
        n_sigmas, n, d = (int(x) for x in self._dataset(layer).shape)  # _dataset checked it is 3-D
        return n_sigmas, n, d

    def layer_attrs(self, layer: str) -> dict:
        return {k: _decode(v) for k, v in self._dataset(layer).attrs.items()}

    # -------------------------------------------------------------------------------------- reading

    def load(self, layer: str, sigma_index: int, rows=None) -> np.ndarray:
        """Features of ``layer`` at ``sigmas[sigma_index]`` as float32 [N, D] (or [len(rows), D]).

        ``rows`` may be None (all), a slice, or integer indices in any order (returned in that order).
        """
        ds = self._dataset(layer)
        s = self._check_sigma_index(sigma_index)
        what = f"/features/{layer} at sigma {self._sigmas[s]:g}"
        if rows is None:
            return _read(self._path, what, lambda: ds[s])
        if isinstance(rows, slice):
            return _read(self._path, what, lambda: ds[s, rows])
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be one-dimensional")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_samples):
            raise UserError(f"row index out of range for {self._path} (n={self.n_samples})")
        # h5py wants strictly increasing indices: read the unique sorted rows, then reorder.
        uniq, inverse = np.unique(rows, return_inverse=True)
        if not uniq.size:
            return np.empty((0, ds.shape[2]), np.float32)
        return _read(self._path, what, lambda: ds[s, uniq][inverse])

    def iter_rows(self, layer: str, sigma_index: int, batch_rows: int, seed: int | None = None) -> Iterator[np.ndarray]:
        """Yield float32 blocks of at most ``batch_rows`` rows covering every row exactly once.

        With ``seed=None`` the blocks are consecutive rows (cheap, chunk-sized reads). With a seed the
        rows are shuffled first, so blocks are random minibatches even when the file is sorted by class;
        two stores iterated with the same seed yield aligned blocks.
        """
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        s = self._check_sigma_index(sigma_index)
        ds = self._dataset(layer)
        n = self.n_samples
        if seed is None:
            what = f"/features/{layer} at sigma {self._sigmas[s]:g}"
            for start in range(0, n, batch_rows):
                yield _read(self._path, what, lambda start=start: ds[s, start:start + batch_rows])
            return
        perm = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, batch_rows):
            yield self.load(layer, s, perm[start:start + batch_rows])


def check_aligned(a: FeatureStore, b: FeatureStore) -> None:
    """Raise a UserError unless ``a`` and ``b`` hold the same inputs row by row.

    Same data split, same sample ids in the same order, same sigmas and same noise seed means row i
    of both files is the same noised image, which CKA between models needs.
    """
    diffs = []
    for key in ("dataset", "split", "noise_seed"):
        va, vb = a.attrs.get(key), b.attrs.get(key)
        if va != vb:
            diffs.append(f"{key} {va!r} vs {vb!r}")
    if a.sample_ids.shape != b.sample_ids.shape or not np.array_equal(a.sample_ids, b.sample_ids):
        diffs.append(f"sample_ids (n={a.n_samples} vs n={b.n_samples}, or different order)")
    if a.sigmas.shape != b.sigmas.shape or not np.allclose(a.sigmas, b.sigmas, rtol=1e-9, atol=0):
        diffs.append("sigmas " + ",".join(f"{s:g}" for s in a.sigmas) + " vs " + ",".join(f"{s:g}" for s in b.sigmas))
    if diffs:
        raise UserError(f"{a.path} and {b.path} are not row-aligned: " + "; ".join(diffs)
                        + " (extract both with the same data, sigmas and --noise-seed)")
