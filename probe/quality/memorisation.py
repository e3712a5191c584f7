"""Does a generator copy its training images? Nearest-neighbour distances to train vs held-out data.

A model that memorises produces samples that sit much closer to training images than to unseen
images of the same distribution; a model that generalises is as far from one as from the other.
Two figures per space (pixels, and the metric classifier's features):

- ``nn_ratio``: mean nearest-neighbour distance of the samples to a random subset of the training
  split, over the same to the held-out split, with both reference sets of *equal size* (nearest
  neighbours get closer as a set grows, so unequal sets would bias the ratio). The training subset
  is redrawn ``n_subsets`` times; mean and std are reported. Fresh samples of the data distribution
  give 1; a model that only returns training images gives about 1 - |held-out| / |train| (only that
  share of its copies lands in a given subset: 0.75 on digits and on shapes), lower if its copies
  concentrate on few images.
- ``copy_share``: share of samples whose distance to the *whole* training split is below the
  ``quantile`` (default 1%) of the same distance for held-out real images. Held-out images are what
  an uncopied sample looks like, so fresh samples give about ``quantile``; exact or near copies give
  close to 1. This one sees partial copying that the ratio averages away.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def nearest_distances(queries: np.ndarray, support: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Euclidean distance matrix [len(queries), len(support)] in float64, computed in row chunks."""
    q, s = _flat(queries), _flat(support)
    out = np.empty((len(q), len(s)))
    for start in range(0, len(q), chunk):  # chunks keep cdist's temporaries small
        out[start:start + chunk] = cdist(q[start:start + chunk], s)
    return out


def _flat(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1)


def memorisation(samples, train, heldout,
                 n_subsets: int = 5,          # training subsets (each the held-out split's size) averaged
                 quantile: float = 0.01,      # copy threshold: this quantile of held-out images' distance to train
                 seed: int = 0) -> dict:      # subset choice
    """Nearest-neighbour memorisation figures of ``samples`` in one space (pixels or features).

    ``samples``, ``train`` (the split the model was trained on) and ``heldout`` (never trained on)
    are arrays [N, ...] in the same space. Returns ``{"nn_ratio", "nn_ratio_std", "copy_share",
    "n_reference"}``, ``n_reference`` being the size of each of the two equal reference sets.
    """
    samples, train, heldout = _flat(samples), _flat(train), _flat(heldout)
    n_ref = min(len(train), len(heldout))
    if n_ref < 1 or len(samples) < 1:
        raise ValueError("memorisation needs samples, training and held-out images")
    rng = np.random.default_rng(seed)
    heldout_ref = heldout if len(heldout) == n_ref else heldout[rng.choice(len(heldout), n_ref, replace=False)]
    to_train = nearest_distances(samples, train)
    d_heldout = nearest_distances(samples, heldout_ref).min(axis=1).mean()
    ratios = []
    for _ in range(n_subsets):
        cols = rng.choice(len(train), n_ref, replace=False)
        ratios.append(to_train[:, cols].min(axis=1).mean() / max(d_heldout, 1e-12))
    # What an unseen image's distance to the training split looks like: the copy threshold.
    threshold = np.quantile(nearest_distances(heldout, train).min(axis=1), quantile)
    return {"nn_ratio": float(np.mean(ratios)), "nn_ratio_std": float(np.std(ratios, ddof=1)) if n_subsets > 1 else 0.0,
            "copy_share": float((to_train.min(axis=1) < threshold).mean()), "n_reference": int(n_ref)}
