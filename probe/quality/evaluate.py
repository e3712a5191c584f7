"""Sample quality of a model: a teacher with the multi-step Heun sampler, a generator in one step.

``evaluate_model(EvalConfig(...))`` is what ``probe eval MODEL`` calls. It always returns the
real-vs-real floor (and its spread over resamplings) next to the model's figures, because on a
data set as small as digits a difference smaller than that spread means nothing. The model is
scored on ``draws`` independent batches of latents: its own sampling spread is reported too
(``value +- model std (floor mean +- std)``), and so is a memorisation check (nearest-neighbour
distance of the samples to the training split vs the held-out split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe.core import checks as c
from probe.core.data import load_dataset
from probe.core.edm import CHURN_TMAX, CHURN_TMIN, heun_sample
from probe.core.errors import UserError
from probe.core.models import LoadedModel, load_model
from probe.core.runs import pick_device
from probe.quality.metrics import QualityEvaluator, default_n_samples, inception_fid, load_inception_extractor


@dataclass
class EvalConfig:
    model: str                       # run directory or diffusers model directory
    data: str | None = None          # data set to compare with; None = the one the model was trained on
    n_samples: int | None = None     # generated images per score (also the floor's); None = default_n_samples(data)
    draws: int = 3                   # batches of latents scored (seeds seed, seed+1, ...): the model's own spread
    steps: int = 18                  # Heun steps for multi-step models (2 * steps - 1 evaluations)
    churn: float = 0.0               # EDM's S_churn for multi-step models; 0 = the deterministic sampler
    churn_tmin: float = CHURN_TMIN   # lowest sigma of a step that gets churn noise (EDM's S_tmin)
    churn_tmax: float = CHURN_TMAX   # highest sigma of a step that gets churn noise (EDM's S_tmax)
    seed: int = 0                    # seed of the latents and of the evaluator's reference choice
    batch: int = 250                 # images per forward pass
    device: str = "auto"             # "auto" (CUDA when present) | "cpu" | "cuda"
    inception_weights: str | None = None  # a local Inception-v3 file (torch-fidelity format): also report Inception FID

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse bad numbers before any model is loaded or file written; runs on construction."""
        if self.n_samples is not None:
            c.integer(self.n_samples, "n_samples", minimum=4)  # precision/recall use 3 neighbours
        c.positive_int(self.draws, "draws")
        c.positive_int(self.steps, "steps")
        c.nonneg_float(self.churn, "churn")
        c.sigma(self.churn_tmin, "churn_tmin")
        c.sigma(self.churn_tmax, "churn_tmax")
        if self.churn_tmax < self.churn_tmin:
            raise UserError(f"churn_tmax ({self.churn_tmax}) is below churn_tmin ({self.churn_tmin})")
        c.positive_int(self.batch, "batch")
        c.seed(self.seed)
        c.device(self.device)


@torch.no_grad()
def generate(model: LoadedModel, n: int, seed: int, steps: int = 18, batch: int = 250,
             device: str | torch.device = "cpu", churn: float = 0.0, churn_tmin: float = CHURN_TMIN,
             churn_tmax: float = CHURN_TMAX) -> torch.Tensor:
    """n images from a generator (one step) or a denoiser (Heun, ``steps`` steps), fixed latents.

    With ``churn`` > 0 a denoiser is sampled stochastically (``heun_sample``); its noise continues
    the latents' generator, so a seed fixes the images either way."""
    shape = (n, model.channels, model.resolution, model.resolution)
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=rng)
    out = []
    for zb in z.split(batch):
        zb = zb.to(device)
        if model.generator is not None:
            x = model.generator(zb)
        else:
            x = heun_sample(model.denoiser, zb, steps, churn=churn, churn_tmin=churn_tmin, churn_tmax=churn_tmax,
                            generator=rng)
        out.append(x.cpu())
    return torch.cat(out)


def evaluate_model(cfg: EvalConfig, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Scores of ``cfg.model`` plus the floor, and the images of every draw; ``UserError`` on a data/model mismatch."""
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
    n = cfg.n_samples if cfg.n_samples is not None else default_n_samples(data)
    evaluator = QualityEvaluator(data, n_samples=n, seed=cfg.seed, progress=progress)
    # Each draw has its own latent seed, so draw 0 is the batch a single-draw evaluation would score.
    batches = [generate(model, n, cfg.seed + i, cfg.steps, cfg.batch, device, cfg.churn, cfg.churn_tmin,
                        cfg.churn_tmax) for i in range(cfg.draws)]
    result = {**summarise_draws([evaluator.evaluate(b) for b in batches]),
              "memorisation": evaluator.memorisation(batches[0]),
              "floor": evaluator.floor(), "evaluator": evaluator.info,
              "sampler": "one-step" if model.generator is not None else heun_name(cfg),
              "nfe": 1 if model.generator is not None else 2 * cfg.steps - 1, "model_kind": model.kind}
    samples = torch.cat(batches)
    if cfg.inception_weights:
        extractor = load_inception_extractor(cfg.inception_weights, device)
        real = load_dataset(data, "train").images
        result["inception_fid"] = inception_fid(batches[0], real[: max(n, 1000)], extractor=extractor)
    return result, samples


def heun_name(cfg: EvalConfig) -> str:
    """``heun-18``, or ``heun-18-churn2.5[0.05,1]`` for the stochastic sampler."""
    if cfg.churn == 0:
        return f"heun-{cfg.steps}"
    return f"heun-{cfg.steps}-churn{cfg.churn:g}[{cfg.churn_tmin:g},{cfg.churn_tmax:g}]"


def summarise_draws(scores: list[dict]) -> dict:
    """Mean of each figure over latent draws, its std over draws (``<key>_std``, the model's own
    spread; 0 for one draw) and the per-draw scores (``per_draw``)."""
    out: dict = {"n": scores[0]["n"], "draws": len(scores), "per_draw": scores}
    for key in (k for k in scores[0] if k != "n"):
        values = np.array([s[key] for s in scores], np.float64)
        out[key] = float(values.mean())
        if not key.endswith("_std"):  # a within-draw spread (KID's over subsets) is only averaged
            out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


QUALITY_ROWS = (("fd", "Frechet distance", 2), ("kid", "KID", 3), ("fd_inf", "FD-infinity", 2),
                ("precision", "precision", 3), ("recall", "recall", 3), ("coverage", "class coverage", 2))


def format_quality(r: dict) -> str:
    """One line per figure: ``value +- model std (floor mean +- std)``, then the memorisation check.

    Also reads older eval.json files (one draw, FD / precision / recall / coverage only).
    """
    f = r.get("floor") or {}
    draws = r.get("draws", 1)
    lines = [f"{r.get('sampler', '')}: n = {r['n']} samples per score, {draws} latent draw{'s' * (draws > 1)}; "
             f"value +- model std over draws (real-vs-real floor mean +- std over "
             f"{f.get('n_resamples', '?')} resamples)"]
    for key, name, digits in QUALITY_ROWS:
        if key not in r:
            continue
        text = f"  {name:<17}{r[key]:>10.{digits}f}"
        if f"{key}_std" in r:
            text += f" +- {r[f'{key}_std']:.{digits}f}"
        if key in f:
            text += f"   (floor {f[key]:.{digits}f} +- {f[f'{key}_std']:.{digits}f})"
        lines.append(text)
    if f:
        lines.append("  a difference below the larger of the two spreads means nothing")
    m = r.get("memorisation")
    if m:
        p, q = m["pixel"], m["features"]
        lines.append(f"memorisation: nearest-neighbour distance to train / to held-out ({p['n_reference']} images "
                     f"each) {p['nn_ratio']:.3f} +- {p['nn_ratio_std']:.3f} in pixels, {q['nn_ratio']:.3f} +- "
                     f"{q['nn_ratio_std']:.3f} in features (1 = no copying); closer to train than 99% of "
                     f"held-out images: {p['copy_share']:.1%} / {q['copy_share']:.1%} (fresh data ~1%)")
    if "inception_fid" in r:
        lines.append(f"Inception FID {r['inception_fid']:.2f}")
    return "\n".join(lines)
