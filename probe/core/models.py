"""Building, saving and loading models: toolkit run directories and any diffusers UNet / DDPM.

A MODEL argument anywhere in the toolkit is one of

- a toolkit run directory (``probe train teacher|student``): ``model.json`` + ``unet/``;
- a diffusers ``UNet2DModel`` directory (``config.json`` + weights), read as epsilon-prediction
  with a ``scheduler/`` beside it when there is one, else diffusers' default DDPM schedule;
- a diffusers ``DDPMPipeline`` directory (``model_index.json`` with ``unet/`` and ``scheduler/``).

``load_model`` returns a ``LoadedModel`` whose ``denoiser`` is ``D(x; sigma)`` in EDM units, and
for one-step generators also the ``generator`` ``G(z)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from probe.core.edm import SIGMA_DATA, DDPMDenoiser, Denoiser, EDMDenoiser, OneStepGenerator
from probe.core.errors import UserError
from probe.core.runs import TMP_SUFFIX, install_file, read_manifest, verify_files, write_json

if TYPE_CHECKING:  # the package root resolves to a dummy for mypy; diffusers is imported where used
    from diffusers.models.unets.unet_2d import UNet2DModel

MODEL_FILE = "model.json"

# UNet2DModel shapes; "tiny" is the ~1.2M-parameter net used on 8x8 digits in the demo.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, attention_head_dim=32),
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=2,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32, attention_head_dim=64),
    # google/ddpm-cifar10-32's configuration (35.7M parameters)
    "cifar": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32, attention_head_dim=None),
    # for tests: a few thousand parameters
    "test": dict(block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8),
}


def build_unet(resolution: int, channels: int, preset: str = "tiny"):
    """A fresh ``UNet2DModel`` for square images; refuses resolutions the UNet cannot take."""
    from diffusers import UNet2DModel

    if preset not in UNET_PRESETS:
        raise UserError(f"unknown UNet preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}")
    cfg = dict(UNET_PRESETS[preset])
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if resolution % factor or resolution < factor:
        raise UserError(f"resolution {resolution} is not divisible by {factor}, which the {preset!r} UNet "
                        f"({len(cfg['block_out_channels'])} levels) needs; pick another preset or resize the data")
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **cfg)


@dataclass
class LoadedModel:
    """A model ready to use: its denoiser D(x; sigma), and G(z) when it is a one-step generator."""

    path: Path
    kind: str                          # "teacher" | "generator" | "diffusers"
    denoiser: Denoiser                 # EDMDenoiser | DDPMDenoiser
    info: dict = field(default_factory=dict)  # model.json contents (or what was inferred)
    generator: OneStepGenerator | None = None

    @property
    def unet(self) -> UNet2DModel:
        return self.denoiser.unet

    @property
    def resolution(self) -> int:
        size = self.unet.config["sample_size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def channels(self) -> int:
        return int(self.unet.config["in_channels"])

    @property
    def dataset(self) -> str | None:
        return self.info.get("dataset")

    def sha256(self) -> str:
        return model_sha256(self.unet)


def model_sha256(unet: nn.Module) -> str:
    """Hash of the weights (names, shapes, bytes), independent of the file format they came in."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def save_model(run_dir: Path, denoiser: Denoiser, kind: str, dataset: str | None,
               sigma_init: float | None = None, extra: dict | None = None) -> None:
    """Write ``unet/`` (diffusers' save_pretrained) and ``model.json`` into ``run_dir``, every file
    atomically and recorded (sha256, size) in ``run_dir``'s manifest.json, model.json last."""
    run_dir = Path(run_dir)
    stage = run_dir / (".unet" + TMP_SUFFIX)   # staging directory beside unet/, same file system
    try:
        shutil.rmtree(stage, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        denoiser.unet.save_pretrained(stage)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"cannot write {run_dir / 'unet'}: {err.strerror or err}; "
                        f"the previous version is kept") from None
    for f in sorted(stage.iterdir()):
        install_file(f, run_dir / "unet" / f.name, manifest=run_dir)
    shutil.rmtree(stage, ignore_errors=True)
    info = {"kind": kind, "parameterisation": denoiser.parameterisation, "dataset": dataset,
            "sigma_data": getattr(denoiser, "sigma_data", SIGMA_DATA)}
    if sigma_init is not None:
        info["sigma_init"] = float(sigma_init)
    if isinstance(denoiser, DDPMDenoiser):  # parameterisation "ddpm"
        a = (denoiser.log_sigmas.double().exp() ** 2 + 1).reciprocal()  # alphas_cumprod back from sigmas
        info["alphas_cumprod"] = a.tolist()
    info.update(extra or {})
    write_json(run_dir / MODEL_FILE, info, manifest=run_dir)


def load_model(path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a toolkit run directory or a diffusers UNet2DModel / DDPMPipeline directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; MODEL is a run directory or a diffusers model directory")
    if (path / MODEL_FILE).exists():
        loaded = _load_toolkit(path)
    elif (path / "model_index.json").exists():
        loaded = _load_pipeline(path)
    elif (path / "config.json").exists() and _class_name(path / "config.json") == "UNet2DModel":
        loaded = _load_bare_unet(path)
    else:
        raise UserError(f"{path} is neither a toolkit run directory ({MODEL_FILE}) nor a diffusers "
                        f"UNet2DModel or DDPMPipeline directory")
    bad = [name for name, t in loaded.unet.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); the model is broken")
    loaded.denoiser.to(device).eval().requires_grad_(False)
    return loaded


def _class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _unet_from(path: Path):
    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)  # no accelerate needed
    except Exception as e:  # diffusers raises several types for a broken directory
        raise UserError(f"cannot load a UNet2DModel from {path}: {type(e).__name__}: {str(e)[:200]}") from None


def _load_toolkit(path: Path) -> LoadedModel:
    recorded = (read_manifest(path) or {}).get("files", {})
    on_disk = {f"unet/{f.name}" for f in (path / "unet").glob("*") if f.is_file() and not f.name.endswith(TMP_SUFFIX)}
    verify_files(path, [MODEL_FILE, *sorted(on_disk | {k for k in recorded if k.startswith("unet/")})])
    try:
        info = json.loads((path / MODEL_FILE).read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UserError(f"{path / MODEL_FILE} is damaged ({type(err).__name__}: {str(err)[:120]})") from None
    unet = _unet_from(path / "unet")
    denoiser: Denoiser
    if info.get("parameterisation") == "ddpm":
        denoiser = DDPMDenoiser(unet, info["alphas_cumprod"])
    else:
        denoiser = EDMDenoiser(unet, info.get("sigma_data", SIGMA_DATA))
    gen = OneStepGenerator(denoiser, info["sigma_init"]) if info.get("kind") == "generator" else None
    return LoadedModel(path, info.get("kind", "teacher"), denoiser, info, gen)


def _alphas_cumprod(scheduler_dir: Path | None):
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # the root's name is a dummy for mypy

    if scheduler_dir is None or not scheduler_dir.exists():
        return DDPMScheduler().alphas_cumprod, "default DDPMScheduler (linear, 1000 steps)"
    sched = DDPMScheduler.from_pretrained(scheduler_dir)
    pred = sched.config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise UserError(f"{scheduler_dir}: prediction_type {pred!r} is not supported (only 'epsilon')")
    return sched.alphas_cumprod, f"{scheduler_dir.name} ({sched.config.get('beta_schedule')})"


def _load_pipeline(path: Path) -> LoadedModel:
    index = json.loads((path / "model_index.json").read_text())
    if "unet" not in index or not (path / "unet").exists():
        raise UserError(f"{path}/model_index.json names no unet/ sub-folder; not a DDPMPipeline directory")
    unet = _unet_from(path / "unet")
    alphas, schedule = _alphas_cumprod(path / "scheduler")
    info = {"kind": "diffusers", "parameterisation": "ddpm", "schedule": schedule,
            "pipeline": index.get("_class_name")}
    return LoadedModel(path, "diffusers", DDPMDenoiser(unet, alphas), info)


def _load_bare_unet(path: Path) -> LoadedModel:
    unet = _unet_from(path)
    sched = path.parent / "scheduler"
    alphas, schedule = _alphas_cumprod(sched if sched.exists() else None)
    info = {"kind": "diffusers", "parameterisation": "ddpm", "schedule": schedule}
    return LoadedModel(path, "diffusers", DDPMDenoiser(unet, alphas), info)
