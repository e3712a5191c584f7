"""Sample quality of a model: a teacher with the multi-step Heun sampler, a generator in one step.

``evaluate_model(EvalConfig(...))`` is what ``probe eval MODEL`` calls. It always returns the
real-vs-real floor (and its spread over resamplings) next to the model's figures, because on a
data set as small as digits a difference smaller than that spread means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.core.errors import UserError
from probe.core.edm import heun_sample
from probe.core.models import LoadedModel, load_model


@dataclass
class EvalConfig:
    model: str                       # run directory or diffusers model directory
    data: str | None = None          # data set to compare with; None = the one the model was trained on
    n_samples: int = 500             # generated images per score (also the floor's sample count)
    steps: int = 18                  # Heun steps for multi-step models (2 * steps - 1 evaluations)
    seed: int = 0                    # seed of the latents and of the evaluator's reference choice
    batch: int = 250                 # images per forward pass
    device: str = "auto"             # "auto" (CUDA when present) | "cpu" | "cuda"
    inception_weights: str | None = None  # a local Inception-v3 file (torch-fidelity format): also report Inception FID

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad numbers before any model is loaded or file written; runs on construction."""
        from probe.core import checks as c

        c.integer(self.n_samples, "n_samples", minimum=4)  # precision/recall use 3 neighbours
        c.positive_int(self.steps, "steps")
        c.positive_int(self.batch, "batch")
        c.seed(self.seed)
        c.device(self.device)


@torch.no_grad()
def generate(model: LoadedModel, n: int, seed: int, steps: int = 18, batch: int = 250,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """n images from a generator (one step) or a denoiser (Heun, ``steps`` steps), fixed latents."""
    shape = (n, model.channels, model.resolution, model.resolution)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for zb in z.split(batch):
        zb = zb.to(device)
        out.append((model.generator(zb) if model.generator is not None else heun_sample(model.denoiser, zb, steps)).cpu())
    return torch.cat(out)


def evaluate_model(cfg: EvalConfig, progress: bool = False) -> dict:
    """Scores of ``cfg.model`` plus the floor; raises ``UserError`` on a data/model mismatch."""
    from probe.core.data import load_dataset
    from probe.quality.metrics import QualityEvaluator

    from probe.core.runs import pick_device

    cfg.validate()
    device = pick_device(cfg.device)
    model = load_model(cfg.model, device)
    data = cfg.data or model.dataset
    if data is None:
        raise UserError(f"{cfg.model} does not record its data set; pass --data")
    ref = load_dataset(data, "test")
    if (ref.channels, ref.resolution) != (model.channels, model.resolution):
        raise UserError(f"{cfg.model} makes {model.channels}x{model.resolution}x{model.resolution} images but "
                        f"{data} has {ref.channels}x{ref.resolution}x{ref.resolution}")
    samples = generate(model, cfg.n_samples, cfg.seed, cfg.steps, cfg.batch, device)
    evaluator = QualityEvaluator(data, n_samples=cfg.n_samples, seed=cfg.seed, progress=progress)
    result = {**evaluator.evaluate(samples), "floor": evaluator.floor(), "evaluator": evaluator.info,
              "sampler": "one-step" if model.generator is not None else f"heun-{cfg.steps}",
              "nfe": 1 if model.generator is not None else 2 * cfg.steps - 1, "model_kind": model.kind}
    if cfg.inception_weights:
        from probe.quality.metrics import inception_fid, load_inception_extractor

        extractor = load_inception_extractor(cfg.inception_weights, device)
        real = load_dataset(data, "train").images
        result["inception_fid"] = inception_fid(samples, real[: max(cfg.n_samples, 1000)], extractor=extractor)
    return result, samples


def format_quality(r: dict) -> str:
    """Two lines: the model's figures, then the floor with its spread."""
    f = r.get("floor") or {}
    line = (f"{r.get('sampler', '')}: Frechet distance {r['fd']:.2f}   precision {r['precision']:.3f}   "
            f"recall {r['recall']:.3f}   class coverage {r['coverage']:.2f}   (n={r['n']})")
    if f:
        line += (f"\nreal-vs-real floor: Frechet distance {f['fd']:.2f} +- {f['fd_std']:.2f} over "
                 f"{f['n_resamples']} resamplings (a difference below that spread means nothing)")
    if "inception_fid" in r:
        line += f"\nInception FID {r['inception_fid']:.2f}"
    return line
