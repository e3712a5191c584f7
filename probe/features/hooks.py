"""Forward hooks on any named module of a diffusers UNet: layer listing, selection, pooling.

What ``probe layers`` and ``probe extract`` share:

- ``list_layers(model)`` runs one input through the denoiser with a hook on every module and
  reports each module path with its output shape and whether it is in the default selection
  (the output of every down block, the mid block and every up block).
- ``resolve_layers(unet, patterns)`` turns module paths or fnmatch patterns into module paths,
  in execution order, and refuses a name or pattern that matches nothing (naming close matches).
- ``FeatureHooks`` pools each selected output inside its hook, so only [B, D] tensors are kept
  on the device; ``to_numpy_per_layer`` moves a whole batch (all sigmas, all layers) to numpy
  with a single device-to-host copy.

Why hooks and not torch.fx: diffusers UNets have data-dependent control flow that FX cannot
trace, while ``register_forward_hook`` sees every module's real output.

Module outputs that are not a plain tensor are handled explicitly (``select_output``):
diffusers down blocks return ``(hidden_states, res_samples)``; we keep ``hidden_states``, the
block's output after its downsampler (equal to ``res_samples[-1]``). Up blocks and the mid block
return tensors; the UNet itself returns an object with ``.sample``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from probe.core.errors import UserError

DEFAULT_KEYWORD = "default"      # in a layer list, stands for the default selection
POOLINGS = ("mean", "flatten", "avgK")   # avgK: K x K adaptive average pooling, e.g. avg2


# ----------------------------------------------------------------------------- module outputs
def select_output(output) -> torch.Tensor | None:
    """The tensor a module "outputs", or None when it has none.

    Tuples/lists give their first element (diffusers blocks put the hidden states first, the
    skip connections second); objects with ``.sample`` (UNet2DOutput) give that tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


# --------------------------------------------------------------------------------- selection
def default_layers(unet: nn.Module) -> list[str]:
    """Every down block, the mid block and every up block: the UNet's multi-scale trunk."""
    names = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", [])))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", [])))]
    return names


def module_paths(unet: nn.Module) -> list[str]:
    """All named sub-modules in network (registration) order, without the root."""
    return [name for name, _ in unet.named_modules() if name]


def _close_matches(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""


def resolve_layers(unet: nn.Module, patterns=None, order: list[str] | None = None,
                   usable: set | None = None) -> list[str]:
    """Module paths selected by ``patterns`` (paths, fnmatch globs or "default"), sorted by ``order``
    (execution order from ``trace_modules``; default: registration order).

    ``None`` or an empty list means the default selection (down blocks, mid block, up blocks).
    Patterns match whole paths ("down_blocks.*" matches "down_blocks.0" and
    "down_blocks.0.resnets.0"; "down_blocks.?" only the blocks). A pattern that matches nothing is
    a UserError listing close matches. With ``usable`` (modules that run once and return a tensor,
    from ``trace_modules``) globs skip the others (ModuleLists, shared activations) and naming one
    of them is refused.
    """
    paths = order if order is not None else module_paths(unet)
    if not patterns:
        return default_layers(unet)
    chosen: set[str] = set()
    for pattern in patterns:
        pattern = str(pattern).strip()
        if pattern == DEFAULT_KEYWORD:
            chosen.update(default_layers(unet))
            continue
        hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if usable is not None:
            if pattern in hits and pattern not in usable:
                raise UserError(f"module {pattern!r} does not return one tensor from one call per forward pass "
                                "(a container, an unused or a shared module); pick a sub-module or its parent")
            hits = [p for p in hits if p in usable]
        if not hits:
            what = "pattern" if any(c in pattern for c in "*?[") else "layer"
            raise UserError(f"unknown {what} {pattern!r}: no module of the UNet matches it"
                            f"{_close_matches(pattern, paths)} (run `probe layers MODEL` to list them)")
        chosen.update(hits)
    return [p for p in paths if p in chosen]


# ----------------------------------------------------------------------------------- pooling
def parse_pooling(pooling: str) -> tuple[str, int]:
    """("mean", 0) | ("flatten", 0) | ("avg", K) from "mean" | "flatten" | "avgK" (e.g. "avg2")."""
    if pooling in ("mean", "flatten"):
        return pooling, 0
    m = re.fullmatch(r"avg(\d+)", str(pooling))
    if m and int(m.group(1)) >= 1:
        return "avg", int(m.group(1))
    raise UserError(f"unknown pooling {pooling!r}; choose mean, flatten or avgK with K >= 1 (e.g. avg2)")


def pool(t: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, ...] activations to [B, D] features.

    mean: global average over all dims after the channel dim (D = C); flatten: D = prod(shape[1:]);
    avgK: adaptive average pooling of a [B, C, H, W] map to K x K, then flatten (D = C K K).
    """
    kind, k = parse_pooling(pooling)
    t = t.detach()
    if kind == "mean":
        return t.float().mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.float().reshape(t.shape[0], -1)
    if kind == "flatten":
        # clone: a later in-place op of the network must not change what we stored
        return t.float().reshape(t.shape[0], -1).clone()
    if t.ndim != 4:
        raise UserError(f"pooling {pooling!r} needs [B, C, H, W] outputs, got shape {tuple(t.shape)}; "
                        "use mean or flatten")
    return nn.functional.adaptive_avg_pool2d(t.float(), k).flatten(1)


def pooled_dim(raw_shape: tuple, pooling: str) -> int:
    """D of ``pool`` for one sample of shape ``raw_shape`` (C, H, W) or (D,)."""
    kind, k = parse_pooling(pooling)
    if kind == "mean":
        return int(raw_shape[0])
    if kind == "flatten":
        return int(np.prod(raw_shape))
    if len(raw_shape) != 3:
        raise UserError(f"pooling {pooling!r} needs [C, H, W] outputs, got shape {tuple(raw_shape)}; "
                        "use mean or flatten")
    return int(raw_shape[0]) * k * k


# ------------------------------------------------------------------------------------- hooks
class FeatureHooks:
    """Forward hooks that pool the outputs of ``layers`` during each forward pass.

    Use as a context manager (hooks are removed on exit). After a forward pass, ``take()``
    returns {layer: float32 [B, D] on the model's device} and resets; ``raw_shapes`` holds the
    un-pooled per-sample shape of each layer's last output.
    """

    def __init__(self, unet: nn.Module, layers: list[str], pooling: str = "mean"):
        parse_pooling(pooling)  # fail early on a bad name
        modules = dict(unet.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise UserError(f"unknown layer {missing[0]!r}{_close_matches(missing[0], list(modules))}")
        self.layers = list(layers)
        self.pooling = pooling
        self.raw_shapes: dict[str, tuple] = {}
        self._pooled: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self._handles = [modules[name].register_forward_hook(self._hook_for(name), with_kwargs=True)
                         for name in layers]

    def _hook_for(self, name: str):
        def hook(module, args, kwargs, output):
            t = select_output(output)
            if t is None:
                raise UserError(f"module {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                                "not a tensor; pick its parent or one of its sub-modules")
            self.raw_shapes[name] = tuple(int(s) for s in t.shape[1:])
            self._pooled[name].append(pool(t, self.pooling))
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """Pooled features of the last forward pass; every layer must have run exactly once."""
        out = {}
        for name, seen in self._pooled.items():
            if len(seen) != 1:
                raise UserError(f"module {name!r} ran {len(seen)} times in one forward pass; "
                                "features are defined for modules that run once (pick another module)")
            out[name] = seen[0]
            self._pooled[name] = []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def to_numpy_per_layer(per_sigma: list[dict[str, torch.Tensor]], layers: list[str]) -> dict[str, np.ndarray]:
    """[{layer: [B, D]}] over S sigmas -> {layer: float32 [S, B, D]} with ONE device-to-host copy.

    All layers and sigmas are concatenated on the device first because each separate ``.cpu()``
    would synchronise a GPU; the numpy results are views into one host array.
    """
    dims = [per_sigma[0][name].shape[1] for name in layers]
    block = torch.stack([torch.cat([feats[name] for name in layers], dim=1) for feats in per_sigma])
    host = block.cpu().numpy()
    bounds = np.cumsum([0] + dims)
    return {name: host[:, :, bounds[i]:bounds[i + 1]] for i, name in enumerate(layers)}


# ------------------------------------------------------------------------------------ listing
@dataclass
class LayerInfo:
    """One row of ``probe layers``."""

    path: str                 # module path inside the UNet, e.g. "down_blocks.1"
    module_type: str          # class name, e.g. "AttnDownBlock2D"
    shape: tuple | None       # output shape for one input (C, H, W); None if it did not run / no tensor
    default: bool             # in the default selection of ``probe extract``
    calls: int = 1            # times it runs in one forward pass; only modules run once are extractable

    @property
    def extractable(self) -> bool:
        return self.shape is not None and self.calls == 1

    def as_row(self) -> dict:
        return {"layer": self.path, "type": self.module_type,
                "shape": "x".join(map(str, self.shape)) if self.shape else "-", "default": self.default,
                "extractable": self.extractable}


@torch.no_grad()
def trace_modules(model, sigma: float = 1.0) -> tuple[list[str], dict[str, tuple], dict[str, int]]:
    """Run one zero image through ``model.denoiser`` with a hook on every module of its UNet.

    Returns (module paths in the order the forward pass enters them, then those that never ran;
    {path: output shape of one sample}; {path: calls in one forward pass}). Registration order is
    not execution order in diffusers (UNet2DModel registers up_blocks before mid_block), hence
    the trace; modules called more than once (a shared activation) have no single output.
    """
    unet = model.unet
    calls: dict[str, int] = {}         # insertion-ordered: first entry = execution order
    shapes: dict[str, tuple] = {}

    def enter(name):
        def pre_hook(module, args):
            calls[name] = calls.get(name, 0) + 1
        return pre_hook

    def leave(name):
        def hook(module, args, kwargs, output):
            t = select_output(output)
            if t is not None and name not in shapes:
                shapes[name] = tuple(int(s) for s in t.shape[1:])
        return hook

    handles = []
    for name, module in unet.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name), with_kwargs=True))
    try:
        param = next(unet.parameters())
        x = torch.zeros(1, model.channels, model.resolution, model.resolution, device=param.device, dtype=param.dtype)
        model.denoiser(x, sigma)
    finally:
        for h in handles:
            h.remove()
    order = list(calls) + [p for p in module_paths(unet) if p not in calls]
    return order, shapes, {p: calls.get(p, 0) for p in order}


def list_layers(model, patterns=None, max_depth: int | None = None, sigma: float = 1.0) -> list[LayerInfo]:
    """Module paths of ``model.unet`` in execution order, with their output shapes for one input.

    model      : LoadedModel (train.models.load_model) or anything with ``.unet`` and ``.denoiser``
    patterns   : only modules matching these paths / fnmatch globs; None = all     (default None)
    max_depth  : only paths with at most this many dot-separated parts; None = all (default None)
    sigma      : noise level of the single probe input, EDM units                   (default 1.0)
    """
    order, shapes, calls = trace_modules(model, sigma)
    paths = resolve_layers(model.unet, patterns, order) if patterns else order
    if max_depth is not None:
        paths = [p for p in paths if len(p.split(".")) <= max_depth]
    modules = dict(model.unet.named_modules())
    defaults = set(default_layers(model.unet))
    return [LayerInfo(p, type(modules[p]).__name__, shapes.get(p), p in defaults, calls[p]) for p in paths]
