"""Image data sets, all returned as float32 tensors in [-1, 1] with labels and a fixed split.

Names accepted by ``load_dataset``:

- ``digits``   scikit-learn's handwritten digits (8x8 grey, 10 classes); ships inside the
               scikit-learn wheel, so it is the embedded default that needs no download.
- ``shapes``   procedural 16x16 RGB circles, squares and triangles; every generative factor
               (shape, colour, size, position) is stored so probes can ask which one a layer encodes.
- ``scenes``   procedural 16x16 RGB scenes: one large object (its shape is the class: circle,
               square, triangle, cross) in one of 6 colours over a two-colour gradient background;
               4096 train and 10,000 test images, every factor stored. A benchmark with headroom
               above the metric's floor whose default teacher still draws every class
               (docs/metric.md); ``generate_scenes(design=SCENE_DESIGN_RICH)`` adds rotation,
               shading and occluded small objects, more than a 10-minute teacher learns.
- ``mnist``, ``cifar10``  through torchvision when it is installed (and online for the first
               download); otherwise read directly from torchvision's on-disk layout under ``root``.
- ``folder:PATH``  an image folder, one sub-folder per class (or flat, labels unknown).

Splits are deterministic: they depend on nothing but the data set, never on a run's seed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from probe.core.errors import UserError

SPLIT_SEED = 20250211           # fixed seed of every train/test split (not a run's seed)
SPLITS = ("train", "test")
DATASETS = ("digits", "shapes", "scenes", "mnist", "cifar10", "folder:PATH")


@dataclass
class ImageDataset:
    """Images in [-1, 1] with labels; ``sample_ids`` index the samples within their split."""

    name: str
    split: str
    images: torch.Tensor                       # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor                       # int64 [N], -1 where unknown
    num_classes: int                           # 0 when labels are unknown
    factors: dict = field(default_factory=dict)  # name -> np.ndarray [N] (int or float)
    class_names: list = field(default_factory=list)

    @property
    def sample_ids(self) -> np.ndarray:
        return np.arange(len(self.images), dtype=np.int64)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)


def default_root() -> Path:
    return Path(os.environ.get("ONESTEP_PROBE_DATA", Path.home() / ".cache" / "onestep-probe" / "data"))


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 resolution: int | None = None) -> ImageDataset:
    """Load a data set by name (see the module docstring); ``resolution`` resizes folder images."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else default_root()
    if name == "digits":
        return _digits(split)
    if name == "shapes":
        return _shapes(split)
    if name == "scenes":
        return _scenes(split)
    if name == "mnist":
        return _mnist(split, root)
    if name == "cifar10":
        return _cifar10(split, root)
    if name.startswith("folder:"):
        return _folder(Path(name[len("folder:"):]), split, resolution)
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _split_indices(n: int, split: str, test_fraction: float) -> np.ndarray:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def _to_unit_range(x: np.ndarray, max_value: float) -> torch.Tensor:
    return torch.from_numpy((x.astype(np.float32) / max_value) * 2.0 - 1.0)


def _digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # ships with the wheel: no download

    d = load_digits()
    idx = _split_indices(len(d.images), split, test_fraction=0.2)
    images = _to_unit_range(d.images[idx][:, None], 16.0)
    labels = torch.from_numpy(d.target[idx].astype(np.int64))
    return ImageDataset("digits", split, images, labels, 10, class_names=[str(i) for i in range(10)])


# ---------------------------------------------------------------------------------- shapes
SHAPE_NAMES = ["circle", "square", "triangle"]
COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.4, 0.95],
                    [0.95, 0.85, 0.2], [0.8, 0.3, 0.9], [0.2, 0.85, 0.9]], dtype=np.float32)
SHAPES_SIZE = 16                # pixels per side
SHAPES_COUNT = {"train": 4096, "test": 1024}


def render_shape(shape: int, colour: np.ndarray, radius: float, cx: float, cy: float,
                 size: int = SHAPES_SIZE) -> np.ndarray:
    """One anti-aliased-free shape on a black background, [3, size, size] in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == 0:
        mask = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == 1:
        mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    else:  # upward triangle: below the two slanted edges and above the base
        mask = (dy <= radius * 0.8) & (dy >= -radius + 2.0 * np.abs(dx))
    return mask[None].astype(np.float32) * colour[:, None, None]


def _shapes(split: str) -> ImageDataset:
    # Each split has its own seed so train and test never share an image by construction.
    rng = np.random.default_rng(SPLIT_SEED + (0 if split == "train" else 1))
    n = SHAPES_COUNT[split]
    shape = rng.integers(0, 3, n)
    colour = rng.integers(0, len(COLOURS), n)
    radius = rng.uniform(2.5, 5.0, n).astype(np.float32)
    cx = rng.uniform(5.5, SHAPES_SIZE - 5.5, n).astype(np.float32)
    cy = rng.uniform(5.5, SHAPES_SIZE - 5.5, n).astype(np.float32)
    images = np.stack([render_shape(shape[i], COLOURS[colour[i]], radius[i], cx[i], cy[i])
                       for i in range(n)])
    factors = {"shape": shape.astype(np.int64), "colour": colour.astype(np.int64),
               "size": radius, "x": cx, "y": cy}
    return ImageDataset("shapes", split, _to_unit_range(images, 1.0),
                        torch.from_numpy(shape.astype(np.int64)), 3, factors, SHAPE_NAMES)


# ---------------------------------------------------------------------------------- scenes
SCENE_CLASSES = ["circle", "square", "triangle", "cross"]  # = SCENE_DESIGN["classes"]
SCENE_SIZE = 16                 # pixels per side (32 would make the default teacher 4.5x slower, measured)
SCENE_COUNT = {"train": 4096, "test": 10_000}  # test = the metric's held-out pool (floor resamples)
SCENE_SEEDS = {"train": SPLIT_SEED + 10, "test": SPLIT_SEED + 11}  # one stream per split: disjoint by construction
# Bright, saturated object colours, far from every background so the objects stay salient.
SCENE_COLOURS = np.array([[0.95, 0.25, 0.2], [0.95, 0.75, 0.15], [0.3, 0.85, 0.25],
                          [0.2, 0.8, 0.9], [0.3, 0.4, 1.0], [0.9, 0.35, 0.9]], dtype=np.float32)
# Dark backgrounds, each a pair of colours blended along a random direction.
SCENE_BACKGROUNDS = np.array([[[0.05, 0.05, 0.2], [0.1, 0.3, 0.35]], [[0.25, 0.12, 0.05], [0.3, 0.3, 0.1]],
                              [[0.1, 0.1, 0.1], [0.3, 0.3, 0.35]], [[0.2, 0.05, 0.2], [0.35, 0.1, 0.1]]],
                             dtype=np.float32)
SCENE_MAX_DISTRACTORS = 2
SHAPE_OUTLINES = ["circle", "square", "triangle", "cross", "wide bar", "tall bar"]  # what _scene_sdf can draw
# The design's knobs (how hard the data is for the default teacher): classes (outlines, by name),
# main size range (px), rotation range (+- degrees), largest shading, P(0, 1, 2 distractors),
# distractor sizes (px). The default is the one whose default teacher (tiny, 2400 steps, about 9
# minutes on 2 cores) draws recognisable objects of every class; with rotation, shading or
# distractors added it drew blobs (benchmarks/RESULTS.md, "Benchmark headroom", every variant tried).
SCENE_DESIGN = dict(classes=("circle", "square", "triangle", "cross"), size=(4.0, 6.0), rotation=0.0,
                    shade=0.0, distractors=(1.0, 0.0, 0.0), distractor_size=(1.8, 2.8))
SCENE_RENDER_CHUNK = 256  # scenes drawn at once by generate_scenes: bounds its temporaries, not its output
# The first design (shipped until the default teacher was measured on it): rotation, shading and up
# to two small objects partly hidden behind the main one. For a harder benchmark and larger teachers.
SCENE_DESIGN_RICH = {**SCENE_DESIGN, "rotation": 45.0, "shade": 0.5, "distractors": (0.3, 0.4, 0.3)}


def _scene_sdf(shape: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of each object's outline at local coordinates (u right, v up).

    ``shape`` indexes SHAPE_OUTLINES; ``r`` is the size (circle radius; the others are scaled to
    a similar area). Arrays broadcast as [N, 1, 1] against [N, H, W]. Polygons use the maximum of
    their edges' half-plane distances, exact inside and near the edges, which is all the
    anti-aliasing needs.
    """
    circle = np.sqrt(u ** 2 + v ** 2) - r
    square = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    # equilateral triangle, apex up, centroid at the origin, circumradius 1.25 r
    rt = 1.25 * r
    edge = lambda nx, ny: nx * u + ny * v - 0.5 * rt  # noqa: E731 - inradius = circumradius / 2
    triangle = np.maximum(np.maximum(edge(0.0, -1.0), edge(np.sqrt(3) / 2, 0.5)), edge(-np.sqrt(3) / 2, 0.5))
    w = 0.4 * r  # half-width of the cross's arms
    cross = np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - w), np.maximum(np.abs(u) - w, np.abs(v) - r))
    # bars: a 2.2:1 rectangle of about the circle's area, lying or standing
    wide = np.maximum(np.abs(u) - 1.3 * r, np.abs(v) - 0.6 * r)
    tall = np.maximum(np.abs(u) - 0.6 * r, np.abs(v) - 1.3 * r)
    return np.choose(shape.reshape(-1, 1, 1).astype(np.int64), [circle, square, triangle, cross, wide, tall])


def generate_scenes(n: int, seed: int, size: int = SCENE_SIZE,
                    design: dict | None = None) -> tuple[np.ndarray, dict]:
    """``n`` scenes from ``seed``: float32 images [n, 3, size, size] in [0, 1] and their factors.

    ``design`` overrides SCENE_DESIGN's knobs (for trying variants; ``load_dataset`` uses the default).

    Vectorised (10,000 images in well under a second). Factors, one array [n] each (int =
    categorical, float = continuous; -1 / NaN where a factor does not apply, i.e. a distractor
    that is absent). A factor the design holds fixed (rotation 0, no shading, no distractors: the
    default) is not stored, since nothing could be learned or probed from it:

    - ``shape`` (the class), ``colour`` (SCENE_COLOURS index), ``size`` (pixels), ``x``, ``y``
      (centre, pixels from the top-left corner), ``rotation`` (degrees, counter-clockwise, in
      [-45, 45) by default), ``shade`` (how much darker the object's bottom is than its top, 0-0.5) of the
      main object;
    - ``background`` (SCENE_BACKGROUNDS index), ``bg_angle`` (degrees, direction of its gradient);
    - ``n_objects`` (1 + distractors), and per distractor k = 1, 2: ``d{k}_shape`` (0 disc,
      1 square), ``d{k}_colour``, ``d{k}_size``, ``d{k}_x``, ``d{k}_y`` and ``d{k}_visible``
      (share of its area not hidden by objects drawn after it: occlusion).
    """
    rng = np.random.default_rng(seed)
    f: dict[str, np.ndarray] = {}
    d = {**SCENE_DESIGN, **(design or {})}
    outline = np.array([SHAPE_OUTLINES.index(c) for c in d["classes"]])
    f["shape"] = rng.integers(0, len(d["classes"]), n)
    f["colour"] = rng.integers(0, len(SCENE_COLOURS), n)
    lo, hi = d["size"]
    f["size"] = rng.uniform(lo, hi, n).astype(np.float32)
    f["x"] = rng.uniform(6.0, size - 6.0, n).astype(np.float32)
    f["y"] = rng.uniform(6.0, size - 6.0, n).astype(np.float32)
    f["rotation"] = rng.uniform(-d["rotation"], d["rotation"], n).astype(np.float32)
    f["shade"] = rng.uniform(0.0, d["shade"], n).astype(np.float32)
    f["background"] = rng.integers(0, len(SCENE_BACKGROUNDS), n)
    f["bg_angle"] = rng.uniform(0.0, 360.0, n).astype(np.float32)
    n_distractors = rng.choice(SCENE_MAX_DISTRACTORS + 1, n, p=list(d["distractors"]))
    f["n_objects"] = 1 + n_distractors
    d_shape = rng.integers(0, 2, (SCENE_MAX_DISTRACTORS, n))
    # never the main object's colour: a distractor touching it would otherwise change its outline
    d_colour = (f["colour"] + rng.integers(1, len(SCENE_COLOURS), (SCENE_MAX_DISTRACTORS, n))) % len(SCENE_COLOURS)
    lo, hi = d["distractor_size"]
    d_size = rng.uniform(lo, hi, (SCENE_MAX_DISTRACTORS, n)).astype(np.float32)
    d_x = rng.uniform(2.5, size - 2.5, (SCENE_MAX_DISTRACTORS, n)).astype(np.float32)
    d_y = rng.uniform(2.5, size - 2.5, (SCENE_MAX_DISTRACTORS, n)).astype(np.float32)

    # Render in chunks: every temporary below is [chunk, size, size], so the process keeps little
    # heap after generation (in one piece, 10,000 scenes left ~280 MB resident for 29 MB of images;
    # training reused that heap, a process that only loads and evaluates kept it). Each image depends
    # only on its own factors, so the chunking changes no value.
    img = np.empty((n, 3, size, size), np.float32)
    visible = np.empty((SCENE_MAX_DISTRACTORS, n), np.float32)
    distractors = (d_shape, d_colour, d_size, d_x, d_y)
    for lo in range(0, n, SCENE_RENDER_CHUNK):
        part = slice(lo, min(lo + SCENE_RENDER_CHUNK, n))
        img[part], visible[:, part] = _render_scenes({k: v[part] for k, v in f.items()}, n_distractors[part],
                                                     [a[:, part] for a in distractors], outline, size)
    for k in range(SCENE_MAX_DISTRACTORS):
        present = k < n_distractors
        f[f"d{k + 1}_shape"] = np.where(present, d_shape[k], -1)
        f[f"d{k + 1}_colour"] = np.where(present, d_colour[k], -1)
        for name, values in (("size", d_size[k]), ("x", d_x[k]), ("y", d_y[k]), ("visible", visible[k])):
            f[f"d{k + 1}_{name}"] = np.where(present, values, np.nan).astype(np.float32)
    fixed = set()
    if d["rotation"] == 0:
        fixed.add("rotation")
    if d["shade"] == 0:
        fixed.add("shade")
    if d["distractors"][0] == 1:  # never a distractor: n_objects is 1 and every d{k}_* unknown
        fixed |= {"n_objects"} | {k for k in f if k.startswith("d") and k[1:2].isdigit()}
    factors = {k: (v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32))
               for k, v in f.items() if k not in fixed}
    return img, factors


def _render_scenes(f: dict, n_distractors: np.ndarray, distractors: list, outline: np.ndarray,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw scenes from their factors: images [n, 3, size, size] in [0, 1] (float32) and the share
    of each distractor left visible [SCENE_MAX_DISTRACTORS, n]. Pure: no random draws."""
    d_shape, d_colour, d_size, d_x, d_y = distractors
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    yy, xx = yy[None], xx[None]

    def col(a):  # per-image values as [n, 1, 1] for broadcasting against the pixel grid
        return np.asarray(a, np.float32).reshape(-1, 1, 1)

    # Background: linear blend of its two colours along bg_angle, over the image's diagonal extent.
    a = np.deg2rad(f["bg_angle"])
    t = ((xx - size / 2) * col(np.cos(a)) + (yy - size / 2) * col(np.sin(a))) / (size / np.sqrt(2)) * 0.5 + 0.5
    pair = SCENE_BACKGROUNDS[f["background"]]                      # [n, 2, 3]
    img = (pair[:, 0, :, None, None] * (1 - t[:, None]) + pair[:, 1, :, None, None] * t[:, None])

    # Distractors first, so the main object (and the second distractor) can hide them.
    alphas = []
    for k in range(SCENE_MAX_DISTRACTORS):
        present = k < n_distractors
        du, dv = xx - col(d_x[k]), -(yy - col(d_y[k]))
        sdf = np.where(col(d_shape[k]) == 0, np.sqrt(du ** 2 + dv ** 2) - col(d_size[k]),
                       np.maximum(np.abs(du), np.abs(dv)) - 0.85 * col(d_size[k]))
        alpha = np.clip(0.5 - sdf, 0.0, 1.0) * col(present)  # coverage of each pixel: anti-aliased edges
        img = img * (1 - alpha[:, None]) + SCENE_COLOURS[d_colour[k]][:, :, None, None] * alpha[:, None]
        alphas.append(alpha)

    # Main object in its own rotated frame (u right, v up), shaded from top (full colour) to bottom.
    th = np.deg2rad(f["rotation"])
    dx, dy = xx - col(f["x"]), -(yy - col(f["y"]))
    c, s = col(np.cos(th)), col(np.sin(th))
    u, v = c * dx + s * dy, -s * dx + c * dy
    sdf = _scene_sdf(outline[f["shape"]], u, v, col(f["size"]))
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)
    light = 1 - col(f["shade"]) * np.clip(0.5 - v / (2 * col(f["size"])), 0.0, 1.0)
    colour = SCENE_COLOURS[f["colour"]][:, :, None, None] * light[:, None]
    img = img * (1 - alpha[:, None]) + colour * alpha[:, None]

    # What is left of each distractor after everything drawn over it.
    hidden_by = [alphas[1], alpha], [alpha]
    visible = []
    for k in range(SCENE_MAX_DISTRACTORS):
        left = alphas[k].copy()
        for over in hidden_by[k]:
            left *= 1 - over
        visible.append(left.sum((1, 2)) / np.maximum(alphas[k].sum((1, 2)), 1e-6))
    return np.clip(img, 0.0, 1.0).astype(np.float32), np.stack(visible)


_SCENE_CACHE: dict[str, tuple[np.ndarray, dict]] = {}  # split -> (images, factors), generated once per process


def _scenes(split: str) -> ImageDataset:
    if split not in _SCENE_CACHE:
        _SCENE_CACHE[split] = generate_scenes(SCENE_COUNT[split], SCENE_SEEDS[split])
    images, factors = _SCENE_CACHE[split]
    factors = {k: v.copy() for k, v in factors.items()}  # callers may edit theirs; the cache stays intact
    return ImageDataset("scenes", split, _to_unit_range(images, 1.0),
                        torch.from_numpy(factors["shape"].copy()), len(SCENE_CLASSES), factors,
                        list(SCENE_CLASSES))


# --------------------------------------------------------------------- torchvision data sets
def _torchvision_or_none():
    try:
        import torchvision  # optional and heavy; its PyPI wheel needs a matching torch
        return torchvision
    except Exception:  # ImportError, or a wheel built against another torch
        return None


class _download_lock:
    """One downloader per data root: torchvision writes and unpacks its files in place, so two
    processes fetching the same data set at once would overwrite each other's half-written files.
    The others wait, then find the files complete. No lock where the root cannot be created."""

    _lock: FileLock | None  # None where the root cannot be created

    def __init__(self, root: Path, name: str):
        self.path = Path(root) / f".{name}.download.lock"

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.path))
            self._lock.acquire()
        except OSError:  # read-only root: torchvision will fail to download and we read what is there
            self._lock = None
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
        return False


def _offline_message(name: str, root: Path, expected: str, err: Exception | None) -> str:
    why = f" ({type(err).__name__}: {err})" if err else ""
    return (f"{name} not found under {root} (expected {expected}) and could not be downloaded{why}; "
            f"download it once while online (pip install torchvision, then rerun) or copy it there")


def _mnist(split: str, root: Path) -> ImageDataset:
    tv, err = _torchvision_or_none(), None
    if tv is not None:
        try:
            with _download_lock(root, "mnist"):
                ds = tv.datasets.MNIST(str(root), train=split == "train", download=True)
            images, labels = ds.data.numpy(), ds.targets.numpy()
            return _mnist_like(images, labels, split)
        except Exception as e:  # offline or corrupt: fall back to reading the files ourselves
            err = e
    raw = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    try:
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
    except FileNotFoundError:
        raise UserError(_offline_message("MNIST", root, "MNIST/raw/*-idx?-ubyte", err)) from None
    return _mnist_like(images, labels, split)


def _mnist_like(images: np.ndarray, labels: np.ndarray, split: str) -> ImageDataset:
    return ImageDataset("mnist", split, _to_unit_range(images[:, None], 255.0),
                        torch.from_numpy(labels.astype(np.int64)), 10,
                        class_names=[str(i) for i in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or .gz, as torchvision stores it."""
    if not path.exists() and Path(str(path) + ".gz").exists():
        path = Path(str(path) + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar10(split: str, root: Path) -> ImageDataset:
    tv, err = _torchvision_or_none(), None
    if tv is not None:
        try:
            with _download_lock(root, "cifar10"):
                ds = tv.datasets.CIFAR10(str(root), train=split == "train", download=True)
            return _cifar_like(ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets), split)
        except Exception as e:
            err = e
    base = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        batches = [_unpickle(base / n) for n in names]
    except FileNotFoundError:
        raise UserError(_offline_message("CIFAR-10", root, "cifar-10-batches-py/", err)) from None
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return _cifar_like(images, labels, split)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_like(images: np.ndarray, labels: np.ndarray, split: str) -> ImageDataset:
    return ImageDataset("cifar10", split, _to_unit_range(images, 255.0),
                        torch.from_numpy(labels.astype(np.int64)), 10, class_names=CIFAR_CLASSES)


# ---------------------------------------------------------------------------------- folders
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _folder(path: Path, split: str, resolution: int | None) -> ImageDataset:
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files = ([(f, c) for c, name in enumerate(classes) for f in sorted((path / name).rglob("*"))]
             if classes else [(f, -1) for f in sorted(path.iterdir())])
    files = [(f, c) for f, c in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(files) < 2:
        raise UserError(f"image folder {path} holds fewer than 2 images")
    arrays, modes = [], set()
    for f, _ in files:
        im = Image.open(f)
        modes.add("L" if im.mode in ("L", "1", "I;16") else "RGB")
        arrays.append(im)
    mode = "L" if modes == {"L"} else "RGB"
    size = resolution or arrays[0].size[0]
    data = np.stack([np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BICUBIC)) for im in arrays])
    data = data[:, None] if mode == "L" else data.transpose(0, 3, 1, 2)
    labels = np.array([c for _, c in files], dtype=np.int64)
    idx = _split_indices(len(files), split, test_fraction=0.1)
    name = f"folder:{path}"
    return ImageDataset(name, split, _to_unit_range(data[idx], 255.0), torch.from_numpy(labels[idx]),
                        len(classes), class_names=classes)


def dataset_fingerprint(ds: ImageDataset) -> str:
    """Short hash of a data set's pixels and labels, for caches keyed on the data."""
    h = hashlib.sha256()
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]
