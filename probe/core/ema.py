"""Exponential moving average of a network's weights, with the decay set by a half-life in images.

EDM's convention: after ``halflife_images`` training images the old weights count for one half,
so the per-step decay is ``0.5 ** (batch / halflife_images)`` and does not depend on the batch.
"""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def rampup_halflife(halflife_images: float, rampup: float, images_seen: float) -> float:
    """EDM's ramp-up: the half-life is at most ``rampup`` x the images seen so far (``rampup <= 0``: off).

    Early in a run the weights move fast and a long average would lag far behind them; the ramp-up
    keeps the average short then and lets it grow to ``halflife_images`` as the run goes on."""
    if rampup <= 0:
        return float(halflife_images)
    return min(float(halflife_images), images_seen * rampup)


class EMA(Generic[M]):
    """A frozen copy of ``net`` updated towards it after every optimiser step."""

    def __init__(self, net: M, halflife_images: float):
        self.halflife_images = float(halflife_images)
        self.net: M = copy.deepcopy(net).eval().requires_grad_(False)

    def decay(self, batch: int) -> float:
        return 0.5 ** (batch / max(self.halflife_images, 1e-8))

    @torch.no_grad()
    def update(self, net: nn.Module, batch: int) -> None:
        beta = self.decay(batch)
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"halflife_images": self.halflife_images, "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.halflife_images = state["halflife_images"]
        self.net.load_state_dict(state["net"])
