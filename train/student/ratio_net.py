"""The sigma-conditioned classifiers of DiffRatio and the diffusion-GAN, and fresh copies of a teacher.

A ratio network maps a noised image and its noise level to one logit
``l(x, sigma) ~ log p_theta,sigma(x) / p_data,sigma(x)``. Three architectures (``RATIO_NETS``):

- ``encoder`` (default): the teacher UNet's encoder (conv_in, time embedding, down blocks and mid
  block), copied with its weights, plus a small pooled head (GroupNorm, SiLU, global average
  pool, linear -> 1). The "lightweight auxiliary network" of the paper (docs/method.md §3.1).
- ``encoder-random``: the same architecture with fresh random weights (an ablation).
- ``cnn``: a small separate sigma-conditioned CNN, random init.

The encoder sees its input exactly as the teacher's UNet does inside the denoiser: EDM
preconditioning (``c_in x``, timestep ``ln(sigma) / 4``) for EDM teachers, and for DDPM teachers
``x / sqrt(1 + sigma^2)`` with the fractional timestep of ``DDPMDenoiser.sigma_to_t``.

Networks are saved as ``model.safetensors`` + ``ratio.json`` (not diffusers' save_pretrained: an
encoder is not a whole UNet2DModel); ``load_ratio_net`` rebuilds one for the verifier.

Copies of the teacher are made through ``state_dict`` into freshly built modules (``clone_unet``,
``clone_denoiser``), never ``copy.deepcopy``: nothing attached to the teacher *instance* (hooks,
patched methods) leaks into the student's networks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import load_file, save
from torch import nn

from probe.core.edm import SIGMA_DATA, SIGMA_MIN, DDPMDenoiser, Denoiser, EDMDenoiser, as_sigma, edm_precond
from probe.core.errors import UserError
from probe.core.runs import atomic_write_bytes, verify_files

if TYPE_CHECKING:  # diffusers is imported when a UNet is built (fresh_unet), not on import
    from diffusers.models.unets.unet_2d import UNet2DModel  # the package root resolves to a dummy for mypy

RATIO_NETS = ("encoder", "encoder-random", "cnn")
RATIO_FILE = "ratio.json"
WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------- teacher copies
def fresh_unet(config) -> UNet2DModel:
    """A randomly initialised UNet2DModel of the given config; draws from the global RNG."""
    from diffusers import UNet2DModel  # heavy third-party import, needed only when a UNet is built

    return UNet2DModel.from_config(dict(config))


def clone_unet(unet: UNet2DModel) -> UNet2DModel:
    """A new UNet with ``unet``'s config and weights (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        new = fresh_unet(unet.config)
    new.load_state_dict(unet.state_dict())
    # diffusers declares ModelMixin.to through functools.wraps, which mypy does not bind to the instance
    return new.to(next(unet.parameters()).device)  # type: ignore[arg-type]


def ddpm_alphas(denoiser: DDPMDenoiser) -> torch.Tensor:
    """alphas_cumprod back from a DDPMDenoiser's log sigmas (sigma^2 = (1 - a) / a)."""
    return (denoiser.log_sigmas.double().exp() ** 2 + 1).reciprocal().cpu()


def wrap_like(denoiser: Denoiser, unet: UNet2DModel) -> Denoiser:
    """Wrap ``unet`` in the same denoiser class and parameters as ``denoiser``."""
    if isinstance(denoiser, DDPMDenoiser):  # parameterisation "ddpm"
        new = DDPMDenoiser(unet, ddpm_alphas(denoiser))
        new.log_sigmas.copy_(denoiser.log_sigmas)  # bit-identical schedule, no float round trip
        return new.to(denoiser.log_sigmas.device)
    return EDMDenoiser(unet, getattr(denoiser, "sigma_data", SIGMA_DATA))


def clone_denoiser(denoiser: Denoiser) -> Denoiser:
    """A trainable copy of a teacher denoiser (same class, weights, schedule)."""
    return wrap_like(denoiser, clone_unet(denoiser.unet)).train().requires_grad_(True)


# ----------------------------------------------------------------------------- inputs
class UNetInput(nn.Module):
    """(x, sigma) -> (UNet sample, UNet timestep), the map a denoiser applies before its UNet."""

    def __init__(self, parameterisation: str = "edm", sigma_data: float = SIGMA_DATA, alphas_cumprod=None):
        super().__init__()
        self.parameterisation = parameterisation
        self.sigma_data = float(sigma_data)
        # Reuse DDPMDenoiser's sigma -> fractional timestep (its UNet slot is never called here).
        self.schedule: DDPMDenoiser | None = (DDPMDenoiser(cast("UNet2DModel", nn.Identity()), alphas_cumprod)
                                              if parameterisation == "ddpm" else None)

    @classmethod
    def like(cls, denoiser: Denoiser) -> UNetInput:
        if isinstance(denoiser, DDPMDenoiser):  # parameterisation "ddpm"
            new = cls("ddpm", alphas_cumprod=ddpm_alphas(denoiser))
            assert new.schedule is not None  # built for "ddpm"
            new.schedule.log_sigmas.copy_(denoiser.log_sigmas.cpu())
            return new
        return cls("edm", getattr(denoiser, "sigma_data", SIGMA_DATA))

    def describe(self) -> dict:
        d = {"parameterisation": self.parameterisation, "sigma_data": self.sigma_data}
        if self.schedule is not None:
            d["alphas_cumprod"] = ddpm_alphas(self.schedule).tolist()
        return d

    def forward(self, x: torch.Tensor, sigma):
        sigma = as_sigma(sigma, x.shape[0], x)
        if self.schedule is not None:
            t = self.schedule.sigma_to_t(sigma)
            return x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t
        _, _, c_in, c_noise = edm_precond(sigma.clamp(min=SIGMA_MIN), self.sigma_data)
        return c_in.view(-1, 1, 1, 1) * x, c_noise


# ----------------------------------------------------------------------------- bodies
class UNetEncoder(nn.Module):
    """The down path and mid block of a UNet2DModel (its forward, steps 0-4, without the decoder)."""

    time_proj: nn.Module
    time_embedding: nn.Module
    conv_in: nn.Conv2d
    down_blocks: nn.ModuleList
    mid_block: nn.Module | None

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.center_input_sample = bool(unet.config["center_input_sample"])
        self.time_proj, self.time_embedding = unet.time_proj, unet.time_embedding
        self.conv_in, self.down_blocks, self.mid_block = unet.conv_in, unet.down_blocks, unet.mid_block
        self.out_channels = int(unet.config["block_out_channels"][-1])

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self.time_proj(timesteps).to(self.conv_in.weight.dtype))
        skip = sample
        h = self.conv_in(sample)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return self.mid_block(h, emb) if self.mid_block is not None else h


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of a [B] tensor of scalars."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None] * 1000.0  # c_noise is O(1): stretch it like a timestep
    return torch.cat([args.sin(), args.cos()], dim=1)


class FiLMBlock(nn.Module):
    """GroupNorm -> scale/shift from the noise embedding -> SiLU -> 3x3 conv (optionally stride 2)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, stride: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, c_in), c_in)
        self.film = nn.Linear(emb_dim, 2 * c_in)
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return self.conv(nn.functional.silu(self.norm(h) * (1 + scale) + shift))


class SmallCNN(nn.Module):
    """A sigma-conditioned CNN: stem, FiLM blocks halving the size down to 4x4 pixels."""

    def __init__(self, channels: int, resolution: int, width: int = 32, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        blocks, c, res = [], width, resolution
        while res > 4:
            blocks.append(FiLMBlock(c, 2 * c, emb_dim, stride=2))
            c, res = 2 * c, res // 2
        blocks.append(FiLMBlock(c, c, emb_dim, stride=1))
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = c

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.emb(sinusoidal(timesteps, self.emb_dim))
        h = self.stem(sample)
        for block in self.blocks:
            h = block(h, emb)
        return h


class PooledHead(nn.Module):
    """GroupNorm, SiLU, global average pool, linear -> one logit; the linear starts at zero (l = 0)."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(groups if channels % groups == 0 else 1, channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)  # start from "no information": ratio 1 everywhere
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.silu(self.norm(h)).mean(dim=(2, 3))).squeeze(1)


class RatioNet(nn.Module):
    """l(x, sigma): input map, body (UNet encoder or CNN), pooled head. Returns logits [B]."""

    def __init__(self, kind: str, inputs: UNetInput, body: nn.Module, head: PooledHead, spec: dict):
        super().__init__()
        self.kind, self.spec = kind, spec
        self.inputs, self.body, self.head = inputs, body, head

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sample, t = self.inputs(x, sigma)
        return self.head(self.body(sample, t)).float()


# ----------------------------------------------------------------------------- building
def build_ratio_net(kind: str, teacher: Denoiser,
                    cnn_width: int = 32,    # "cnn": channels of the first stage
                    ) -> RatioNet:
    """A ratio network for a teacher denoiser. Random parts draw from the global RNG (seed it first)."""
    unet = teacher.unet
    channels, resolution = int(unet.config["in_channels"]), _resolution(unet)
    spec = {"kind": kind, "unet_config": {k: v for k, v in dict(unet.config).items()}, "cnn_width": cnn_width,
            "channels": channels, "resolution": resolution}
    body: UNetEncoder | SmallCNN
    if kind in ("encoder", "encoder-random"):
        body = UNetEncoder(clone_unet(unet) if kind == "encoder" else fresh_unet(unet.config))
        inputs = UNetInput.like(teacher)
        groups = int(unet.config["norm_num_groups"] or 8)
    elif kind == "cnn":
        body = SmallCNN(channels, resolution, cnn_width)
        inputs = UNetInput("edm")  # its own network: EDM conditioning whatever the teacher is
        groups = 8
    else:
        raise UserError(f"unknown ratio network {kind!r}; choose one of {', '.join(RATIO_NETS)}")
    spec["inputs"] = inputs.describe()
    spec["head_groups"] = groups
    net = RatioNet(kind, inputs, body, PooledHead(body.out_channels, groups), spec)
    return net.to(next(unet.parameters()).device)


def _resolution(unet: UNet2DModel) -> int:
    s = unet.config["sample_size"]
    return int(s if isinstance(s, int) else s[0])


def save_ratio_net(net: RatioNet, directory: Path) -> Path:
    """Write ``model.safetensors`` and ``ratio.json`` (what ``load_ratio_net`` needs) into ``directory``,
    each atomically and recorded in ``directory``'s manifest.json (probe/core/runs.py)."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors), manifest=directory)
    atomic_write_bytes(directory / RATIO_FILE, json.dumps(net.spec, indent=2, default=_json_default).encode(),
                       manifest=directory)
    return directory


def _json_default(x):
    return list(x) if isinstance(x, tuple) else str(x)


def load_ratio_net(directory, device: str | torch.device = "cpu") -> RatioNet:
    """Rebuild a saved ratio network (eval mode, frozen)."""
    directory = Path(directory)
    if not (directory / RATIO_FILE).exists():
        raise UserError(f"{directory} holds no ratio network ({RATIO_FILE} missing)")
    verify_files(directory, [RATIO_FILE, WEIGHTS_FILE])
    spec = json.loads((directory / RATIO_FILE).read_text())
    kind, inp = spec["kind"], spec["inputs"]
    inputs = UNetInput(inp["parameterisation"], inp["sigma_data"], inp.get("alphas_cumprod"))
    body: UNetEncoder | SmallCNN
    with torch.random.fork_rng(devices=[]):
        if kind in ("encoder", "encoder-random"):
            body = UNetEncoder(fresh_unet(spec["unet_config"]))
        else:
            body = SmallCNN(spec["channels"], spec["resolution"], spec["cnn_width"])
        net = RatioNet(kind, inputs, body, PooledHead(body.out_channels, spec["head_groups"]), spec)
    net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return net.to(device).eval().requires_grad_(False)
