"""A small CNN classifier per data set: the feature space of the sample-quality metrics.

Standard FID uses an ImageNet Inception network, which means nothing on 8x8 digits or 16x16
shapes and needs weights this toolkit cannot download. Instead each data set gets its own small
convolutional classifier, trained once on the data set's train split, scored on its test split,
and cached on disk. Its penultimate layer (``feature_dim`` values after a ReLU, the analogue of
Inception's pool3) is where Fréchet distance and precision/recall are measured, and its class
predictions give the class coverage of generated samples.

Factor heads: a network trained on the class label alone only keeps what tells the classes apart
(on ``shapes``, trained on the shape, it was blind to colour: permuting RGB scored at the floor).
When a data set stores its generative factors (``ImageDataset.factors``), every factor gets its
own head on the same penultimate layer, so the features must encode all of them:

- integer factors with at most ``MAX_CATEGORIES`` values: a linear classification head,
  cross-entropy (negative values = unknown, ignored);
- float factors (size, position, ...): a linear regression head, mean squared error on the
  factor standardised with the train split's mean and std (non-finite values ignored). Regression
  keeps the order of the values (a size off by a little costs little), which bins would discard,
  and standardising puts every head's loss on the scale of a unit-variance target, comparable with
  the cross-entropies, so no weight between factors is needed;
- a factor equal to the class label (``shapes``' shape) or constant is left out.

The loss is the label's cross-entropy plus the *mean* of the factor heads' losses, so the label
weighs as much as all factors together. Summing them instead let 21 factor heads of ``scenes``
drown the label: its test accuracy fell from 0.989 (label only) to 0.747, against 0.958 with the
mean, while colour, position and size kept their scores (0.99 / 0.91 / 0.81; measured with the
default config, seed 0). Translation augmentation is switched off when a
regression head is trained: a stored position would be wrong by up to ``max_shift`` pixels. Every
head's test score (accuracy, or R^2 for a regression head) is recorded in ``info["heads"]``. A
data set without factors (digits) trains exactly the label-only network it always did, under the
same cache key.

Cache: ``<cache_dir>/<dataset>-<hash>.safetensors`` (weights) plus ``.json`` (config, test
accuracy, the heads, the weights' sha256). The hash covers the config, the architecture version, a
fingerprint of the training data and, when factor heads are trained, the heads and a fingerprint
of the factors, so a changed data set, config or head set trains a new classifier instead of
reusing a stale one (an old label-only ``shapes`` entry is never taken for the factor-head one).
``cache_dir`` defaults to ``$ONESTEP_PROBE_CACHE/classifiers`` or ``~/.cache/onestep-probe/classifiers``.

Training is lazy: the first evaluation on a fresh machine trains the classifier, from whatever
context it is called in (the teacher's end-of-run evaluation runs under ``torch.no_grad``), so
training switches gradients on itself. Several processes may ask for the same entry at once (an
ablation grid, two terminals): a file lock beside the entry lets one train while the others wait
and then load its result. Both files are written to a temporary name, fsynced and renamed; the
``.json`` goes last and records the weights' sha256, so a pair that does not match (a kill between
the two renames, a damaged file) is never loaded: it is trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from rich.progress import Progress
from safetensors.torch import load_file, save
from torch import nn

from probe.core.data import dataset_fingerprint, load_dataset
from probe.core.errors import UserError
from probe.core.runs import atomic_write_bytes

ARCH_VERSION = 1                # bump when FeatureClassifier changes: old cache entries are then ignored
MAX_CATEGORIES = 32             # an integer factor with more distinct values is regressed, not classified


@dataclass(frozen=True)
class ClassifierConfig:
    """How the feature classifier is built and trained; every field enters the cache key."""

    width: int = 16             # channels of the first conv stage; the next two have 2x and 4x
    feature_dim: int = 128      # width of the penultimate layer = dimension of the metric feature space
    steps: int = 1000           # optimiser steps (AdamW, cosine decay to 0)
    batch_size: int = 64        # images per step
    lr: float = 2e-3            # peak learning rate
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW)
    max_shift: int = 1          # random translation augmentation, pixels in each direction (0 = none)
    seed: int = 0               # initialisation, batch order and augmentation
    factor_heads: bool = True   # also train one head per stored factor (module doc); False = label only


class FeatureClassifier(nn.Module):
    """Three conv stages, adaptive pooling to 4x4, a ``feature_dim`` layer, then the class logits
    (``head``) and one linear head per factor (``factor_heads``, outputs given by ``factor_outputs``).

    Adaptive pooling makes one architecture serve any channel count and resolution (8x8 digits
    to 32x32 CIFAR-10); stages halve the spatial size only while it is above 4 pixels.
    """

    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 16,
                 feature_dim: int = 128, factor_outputs: list[int] | tuple[int, ...] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = channels, resolution
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            if i > 0 and size > 4:  # downsample between stages, never below 4x4
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        # Built after the label head, so a network without factors is initialised exactly as before.
        self.factor_heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in factor_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, [N, feature_dim]."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def features_and_predictions(self, images: torch.Tensor, batch_size: int = 500
                                 ) -> tuple[np.ndarray, np.ndarray]:
        """Features (float64) and predicted classes of images in [-1, 1], in eval mode, batched."""
        self.eval()
        device = next(self.parameters()).device
        feats, preds = [], []
        with single_thread():
            for start in range(0, len(images), batch_size):
                f = self.features(images[start:start + batch_size].to(device, torch.float32))
                feats.append(f.double().cpu())
                preds.append(self.head(f).argmax(1).cpu())
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()

    @torch.no_grad()
    def factor_outputs(self, images: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
        """Every factor head's outputs on images in [-1, 1], eval mode: one [N, outputs] tensor per head."""
        self.eval()
        device = next(self.parameters()).device
        outs: list[list[torch.Tensor]] = [[] for _ in self.factor_heads]
        with single_thread():
            for start in range(0, len(images), batch_size):
                f = self.features(images[start:start + batch_size].to(device, torch.float32))
                for out, head in zip(outs, self.factor_heads):
                    out.append(head(f).cpu())
        return [torch.cat(o) for o in outs]


class single_thread:
    """Run torch on one CPU thread inside the block, restoring the caller's setting afterwards.

    The classifier's ops are tiny: thread start-up costs more than it saves, and on a busy
    2-core machine two threads ran 7x slower than one (measured). One thread also makes the
    float reductions, and so the trained weights, independent of the machine's core count.
    """

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        return False


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge pixels replicated)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [n, 1, 1, w]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def labelled(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only images whose label is known (folder data sets may mix in -1)."""
    keep = labels >= 0
    return images[keep], labels[keep]


def accuracy(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, preds = model.features_and_predictions(images)
    return float((preds == labels.numpy()).mean())


def factor_heads(factors: dict, labels: torch.Tensor | np.ndarray) -> list[dict]:
    """The heads to train for a data set's stored factors (name -> array [N]), from its train split.

    Each head is a json-able dict: ``{"name", "kind": "categorical", "levels": [values]}`` or
    ``{"name", "kind": "continuous", "mean", "std"}``. Left out: factors equal to the class label
    (the label head already learns them), factors with a single value (nothing to learn) and
    anything that is not one number per image.
    """
    labels = np.asarray(labels)
    heads: list[dict] = []
    for name, values in factors.items():
        v = np.asarray(values)
        numeric = np.issubdtype(v.dtype, np.number) or v.dtype == bool
        if not numeric or v.ndim != 1 or len(v) != len(labels) or np.array_equal(v, labels):
            continue  # one number per image only (names, vectors are not factors this network learns)
        if np.issubdtype(v.dtype, np.integer) or v.dtype == bool:
            levels = np.unique(v[v >= 0]).tolist()
            if len(levels) <= MAX_CATEGORIES:
                if len(levels) > 1:
                    heads.append({"name": str(name), "kind": "categorical", "levels": [int(x) for x in levels]})
                continue
        x = v.astype(np.float64)
        x = x[np.isfinite(x)]
        if len(x) > 1 and x.std() > 0:
            heads.append({"name": str(name), "kind": "continuous", "mean": float(x.mean()), "std": float(x.std())})
    return heads


def head_outputs(heads: list[dict]) -> list[int]:
    return [len(h["levels"]) if h["kind"] == "categorical" else 1 for h in heads]


def factor_targets(factors: dict, heads: list[dict]) -> list[torch.Tensor]:
    """Training targets per head: class indices (-1 = unknown) or standardised floats (NaN = unknown)."""
    out = []
    for h in heads:
        v = np.asarray(factors[h["name"]])
        if h["kind"] == "categorical":
            levels = np.asarray(h["levels"])
            idx = np.clip(np.searchsorted(levels, v), 0, len(levels) - 1)
            out.append(torch.from_numpy(np.where(levels[idx] == v, idx, -1).astype(np.int64)))
        else:
            x = v.astype(np.float64)
            z = np.where(np.isfinite(x), (x - h["mean"]) / h["std"], np.nan)
            out.append(torch.from_numpy(z.astype(np.float32)))
    return out


def head_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Cross-entropy or MSE over the batch's known targets; None when none is known."""
    known = target >= 0 if kind == "categorical" else torch.isfinite(target)
    if not known.any():
        return None
    if kind == "categorical":
        return F.cross_entropy(output[known], target[known])
    return F.mse_loss(output[known, 0], target[known])


def head_scores(model: FeatureClassifier, images: torch.Tensor, factors: dict, heads: list[dict]) -> dict:
    """Each factor head's held-out score: accuracy (categorical) or R^2 (continuous), None when no target is known."""
    scores: dict = {h["name"]: None for h in heads}
    present = [h for h in heads if h["name"] in factors]  # a split may lack a factor: no score, not an error
    if not present or not len(images):
        return scores
    outputs = dict(zip([h["name"] for h in heads], model.factor_outputs(images)))
    for h, target in zip(present, factor_targets(factors, present)):
        out = outputs[h["name"]]
        if h["kind"] == "categorical":
            known = target >= 0
            scores[h["name"]] = float((out[known].argmax(1) == target[known]).double().mean()) if known.any() else None
        else:
            known = torch.isfinite(target)
            t, p = target[known].double(), out[known, 0].double()
            sst = float(((t - t.mean()) ** 2).sum())
            scores[h["name"]] = 1.0 - float(((t - p) ** 2).sum()) / sst if known.sum() > 1 and sst > 0 else None
    return scores


def factor_fingerprint(factors: dict) -> str:
    """Short hash of factor names, dtypes and values (the data fingerprint covers only pixels and labels)."""
    h = hashlib.sha256()
    for name in sorted(factors):
        v = np.ascontiguousarray(np.asarray(factors[name]))
        h.update(f"{name}:{v.dtype.str}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()[:16]


def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                     config: ClassifierConfig = ClassifierConfig(), progress: bool = False,
                     factors: dict | None = None,      # name -> array [N] aligned with the images; None = none
                     heads: list[dict] | None = None,  # factor_heads(factors, labels); None = no factor heads
                     ) -> FeatureClassifier:
    """Train a FeatureClassifier from scratch; same config and data give the same weights on CPU.

    The label head always trains (cross-entropy); with ``heads`` each factor head adds its loss
    (module doc). Without heads the computation is exactly the label-only one.
    """
    heads = heads or []
    # Callers may hold torch.no_grad() or torch.inference_mode() (an end-of-run evaluation does):
    # training needs autograd, so it is switched on here, and inputs made under inference mode
    # are copied into ordinary tensors that autograd may save.
    with torch.inference_mode(False), torch.enable_grad():
        keep = train_labels >= 0
        targets = [t[keep] for t in factor_targets(factors or {}, heads)]
        images, labels = labelled(train_images.clone(), train_labels.clone())
        if num_classes < 2 or len(images) < config.batch_size:
            raise UserError(f"the quality classifier needs labelled training images of at least 2 classes "
                            f"(got {len(images)} labelled images, {num_classes} classes)")
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(config.seed)
            model = FeatureClassifier(images.shape[1], images.shape[-1], num_classes,
                                      config.width, config.feature_dim, head_outputs(heads))
        max_shift = training_shift(config, heads)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / config.steps)))
        model.train()
        with single_thread(), progress_bar(progress, "training quality classifier", config.steps) as advance:
            for _ in range(config.steps):
                idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
                x = random_shift(images[idx], max_shift, gen)
                if heads:
                    feats = model.features(x)
                    extras = [head_loss(head(feats), target[idx], h["kind"])
                              for h, head, target in zip(heads, model.factor_heads, targets)]
                    known = [e for e in extras if e is not None]  # a batch may hold no known value of a factor
                    loss = F.cross_entropy(model.head(feats), labels[idx])
                    if known:
                        loss = loss + torch.stack(known).mean()
                else:
                    loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance()
    return model.eval()


def training_shift(config: ClassifierConfig, heads: list[dict]) -> int:
    """Translation augmentation actually used: none when a factor is regressed (positions would be wrong)."""
    return 0 if any(h["kind"] == "continuous" for h in heads) else config.max_shift


class progress_bar:
    """A rich progress bar when asked for, else a no-op; used as ``with ... as advance``."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
        return False


# ------------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    base = os.environ.get("ONESTEP_PROBE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "onestep-probe") / "classifiers"


def cache_key(dataset_name: str, config: ClassifierConfig, data_fingerprint: str,
              heads: list[dict] | None = None,   # the factor heads trained (factor_heads); None/[] = label only
              factors_fingerprint: str = "",     # factor_fingerprint of the train split's factors
              ) -> str:
    """Hash of everything that defines the trained weights.

    A label-only classifier hashes exactly what it did before factor heads existed (config without
    ``factor_heads``), so cached digits entries stay valid; factor heads add the heads and the
    factors' fingerprint, so a label-only entry of a data set with factors is never reused for them.
    """
    cfg = {k: v for k, v in asdict(config).items() if k != "factor_heads"}
    body = {"dataset": dataset_name, "config": cfg, "data": data_fingerprint, "arch": ARCH_VERSION}
    if heads:  # "factor_loss": entries trained with the summed factor losses are never reused
        body.update(heads=heads, factors=factors_fingerprint, factor_loss="mean")
    payload = json.dumps(body, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cache_paths(cache_dir: Path, dataset_name: str, key: str) -> tuple[Path, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name).strip("_")[-40:] or "data"
    stem = cache_dir / f"{safe}-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def classifier_entry(dataset_name: str, config: ClassifierConfig | None = None,
                     cache_dir: str | os.PathLike | None = None, train=None) -> tuple[str, Path, Path, list[dict]]:
    """``(key, weights_path, info_path, heads)`` of the cache entry ``load_or_train_classifier`` uses.

    The one place the entry is named, so that whoever asks whether it exists (the grid's classifier
    job) looks for the same file that is written: the factor heads are part of the key.
    ``train`` may pass the already loaded train split.
    """
    config = config or ClassifierConfig()
    train = train if train is not None else load_dataset(dataset_name, "train")
    heads = factor_heads(train.factors, train.labels) if config.factor_heads else []
    key = cache_key(dataset_name, config, dataset_fingerprint(train), heads,
                    factor_fingerprint(train.factors) if heads else "")
    weights_path, info_path = cache_paths(Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                                          dataset_name, key)
    return key, weights_path, info_path, heads


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_cached(weights_path: Path, info_path: Path, key: str, config: ClassifierConfig
                 ) -> tuple[FeatureClassifier, dict] | None:
    """The cached model and info, or None when the entry is missing, incomplete or inconsistent."""
    try:
        info = json.loads(info_path.read_text())
        if info.get("key") != key or info.get("weights_sha256") != file_sha256(weights_path):
            return None  # torn pair (kill between the two renames), stale format or a damaged file
        with torch.inference_mode(False):  # ordinary parameters even when the caller is in inference mode
            model = FeatureClassifier(info["channels"], info["resolution"], info["num_classes"],
                                      config.width, config.feature_dim, head_outputs(info.get("heads") or []))
            model.load_state_dict(load_file(str(weights_path)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # unreadable: treated as absent and trained again
    return model.eval(), info


def load_or_train_classifier(dataset_name: str, config: ClassifierConfig | None = None,
                             cache_dir: str | os.PathLike | None = None, progress: bool = False,
                             train=None, test=None) -> tuple[FeatureClassifier, dict]:
    """The cached classifier for a data set, training (and caching) it first if needed.

    Returns ``(model, info)``; ``info`` holds ``test_accuracy`` (the label head's, held-out, on the
    test split), ``heads`` (each factor head's spec and ``test_score``: accuracy or R^2),
    ``head_scores`` (name -> test score, the label head as ``label``), ``train_seconds``, ``path``,
    ``cached`` (True when loaded from disk) and the config.
    ``train``/``test`` may pass already loaded splits (ImageDataset) to avoid loading them twice.
    Safe under any grad mode and with several processes sharing ``cache_dir`` (module docstring).
    """
    config = config or ClassifierConfig()
    train = train if train is not None else load_dataset(dataset_name, "train")
    key, weights_path, info_path, heads = classifier_entry(dataset_name, config, cache_dir, train)
    cache_dir = weights_path.parent
    found = _load_cached(weights_path, info_path, key, config)
    if found is not None:
        return found[0], {**found[1], "path": str(weights_path), "cached": True}

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the classifier cache {cache_dir}: {e.strerror or e} "
                        f"(set ONESTEP_PROBE_CACHE to a writable directory)") from None
    lock = FileLock(str(weights_path.with_suffix(".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"waiting for another process training the quality classifier ({lock.lock_file})", flush=True)
        lock.acquire()
    try:
        found = _load_cached(weights_path, info_path, key, config)  # the process we waited for wrote it
        if found is not None:
            return found[0], {**found[1], "path": str(weights_path), "cached": True}
        test = test if test is not None else load_dataset(dataset_name, "test")
        start = time.perf_counter()
        model = train_classifier(train.images, train.labels, train.num_classes, config, progress,
                                 factors=train.factors, heads=heads)
        seconds = time.perf_counter() - start
        test_images, test_labels = labelled(test.images, test.labels)
        label_accuracy = accuracy(model, test_images, test_labels) if len(test_labels) else None
        scores = head_scores(model, test.images, test.factors, heads) if heads else {}
        info = {"dataset": dataset_name, "key": key, "config": asdict(config), "arch": ARCH_VERSION,
                "channels": train.channels, "resolution": train.resolution, "num_classes": train.num_classes,
                "n_train": int((train.labels >= 0).sum()), "n_test": len(test_labels),
                "test_accuracy": label_accuracy,
                "heads": [{**h, "test_score": scores.get(h["name"])} for h in heads],
                "head_scores": {"label": label_accuracy, **scores},
                "max_shift_used": training_shift(config, heads),
                "train_seconds": round(seconds, 2)}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights_path, save(state))
        info["weights_sha256"] = file_sha256(weights_path)
        atomic_write_bytes(info_path, json.dumps(info, indent=2).encode())  # last: it vouches for the pair
    finally:
        lock.release()
    return model, {**info, "path": str(weights_path), "cached": False}
