"""Feature drift: how similar a student's internal features stay to the teacher's while it trains.

At the start of a run, while the teacher is still loaded (score-free methods release it before the first
step), ``capture_reference`` runs the teacher's denoiser on fixed noisy real images x = y + sigma eps and
keeps only its pooled features (per-channel means, as ``probe extract`` pools them): {layer: [S, n, C]},
a few hundred kB. At each evaluation ``drift_metrics`` runs the EMA generator's network as a denoiser on
the same inputs and returns debiased linear CKA to those reference features per layer and sigma, logged
in ``metrics.jsonl`` as ``cka/<layer>/<sigma>``; the grid summary turns them into ``curves.csv`` rows
(metric "cka" with layer and sigma columns).

The inputs are the ones of the ablation grid's feature files (train/ablation/grid.py [extract]): the
first n images of the data set's test split, and one unit-Gaussian eps per image from
``probe.features.extract.sample_noise(noise_seed=0, ...)`` reused at every sigma. So the step-0 values
are those of ``cka_step0.csv`` (there with the grid's n), and a run's last value those of
``cka_teacher_student.csv`` but for the EMA weights being the saved ones.

Nothing here draws from the training RNG or changes a weight, so resumed runs stay bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe.core.data import load_dataset
from probe.core.errors import UserError
from probe.features.extract import sample_noise
from probe.features.hooks import FeatureHooks, resolve_layers, to_numpy_per_layer, trace_modules
from probe.features.similarity import debiased_linear_cka

OFF = ("", "none", "off")         # drift_layers values that turn drift off
POOLING = "mean"                  # per-channel global average, probe extract's default
SPLIT = "test"                    # the grid's [extract] split: held-out images
NOISE_SEED = 0                    # the grid's [extract] noise_seed


def metric_key(layer: str, sigma: float) -> str:
    """Name of one drift value in metrics.jsonl: cka/<layer>/<sigma> (layer paths hold no '/')."""
    return f"cka/{layer}/{float(sigma):g}"


def parse_key(key: str) -> tuple[str, float] | None:
    """(layer, sigma) of a ``metric_key``; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "cka":
        return None
    try:
        return parts[1], float(parts[2])
    except ValueError:
        return None


def layer_patterns(spec: str) -> list[str] | None:
    """The comma-separated ``drift_layers`` option as patterns; None when drift is off."""
    if spec.strip().lower() in OFF:
        return None
    return [p.strip() for p in spec.split(",") if p.strip()]


@dataclass
class DriftReference:
    """The teacher's side of every drift measurement: inputs and pooled features, nothing else."""

    layers: list[str]                # module paths, in execution order
    sigmas: list[float]              # EDM noise levels, 0 = clean
    images: torch.Tensor             # [n, C, H, W] real images in [-1, 1], on the run's device
    noise: torch.Tensor              # [n, C, H, W] unit Gaussian, one per image, reused at every sigma
    teacher: dict[str, np.ndarray]   # layer -> float32 [S, n, C] pooled teacher features


@torch.no_grad()
def pooled_features(denoiser, unet, layers: list[str], sigmas: list[float], images: torch.Tensor,
                    noise: torch.Tensor,
                    batch: int = 256,   # inputs per forward pass (does not change the values)
                    ) -> dict[str, np.ndarray]:
    """{layer: float32 [S, n, C]}: ``denoiser``'s pooled module outputs on y + sigma eps for every sigma."""
    per_sigma = []
    with FeatureHooks(unet, layers, POOLING) as hooks:
        for sigma in sigmas:
            chunks = []
            for start in range(0, images.shape[0], batch):
                y, eps = images[start:start + batch], noise[start:start + batch]
                denoiser(y + float(sigma) * eps, float(sigma))
                chunks.append(hooks.take())
            per_sigma.append({name: torch.cat([c[name] for c in chunks]) for name in layers})
    return to_numpy_per_layer(per_sigma, layers)


def capture_reference(teacher,                 # LoadedModel of the teacher (train.student.loop loads it)
                      dataset: str,            # data set name of the run
                      layers: str,             # drift_layers: comma-separated module paths / globs / "default"
                      sigmas,                  # drift_sigmas: EDM noise levels
                      n_samples: int,          # drift_samples: at most this many test images
                      device,                  # where the inputs live (the run's device)
                      ) -> DriftReference | None:
    """The teacher's reference features for drift, or None when ``layers`` turns drift off."""
    patterns = layer_patterns(layers)
    if patterns is None:
        return None
    order, shapes, calls = trace_modules(teacher)
    names = resolve_layers(teacher.unet, patterns, order, usable={p for p in shapes if calls[p] == 1})
    data = load_dataset(dataset, SPLIT)
    n = min(int(n_samples), len(data))
    if n < 4:
        raise UserError(f"drift needs at least 4 images (the unbiased HSIC divides by n-3); {dataset} {SPLIT} "
                        f"has {len(data)} and drift_samples is {n_samples}")
    param = next(teacher.unet.parameters())
    images = data.images[:n].to(device=device, dtype=param.dtype)
    noise = sample_noise(NOISE_SEED, np.arange(n), tuple(images.shape[1:])).to(device=device, dtype=param.dtype)
    sigmas = [float(s) for s in sigmas]
    feats = pooled_features(teacher.denoiser, teacher.unet, names, sigmas, images, noise)
    return DriftReference(names, sigmas, images, noise, {k: np.array(v) for k, v in feats.items()})


def drift_metrics(ref: DriftReference, denoiser) -> dict[str, float]:
    """{cka/<layer>/<sigma>: debiased linear CKA of ``denoiser``'s features to the teacher's} on ref's inputs.

    ``denoiser`` is a network of the teacher's architecture (the EMA generator's ``EDMDenoiser`` /
    ``DDPMDenoiser``); a module missing from it is a UserError naming the module.
    """
    feats = pooled_features(denoiser, denoiser.unet, ref.layers, ref.sigmas, ref.images, ref.noise)
    return {metric_key(layer, sigma): debiased_linear_cka(feats[layer][i], ref.teacher[layer][i])
            for layer in ref.layers for i, sigma in enumerate(ref.sigmas)}
