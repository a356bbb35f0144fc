"""Exponential moving average of the generator's weights (NVlabs' G_ema), used for sample grids and kept in
checkpoints. The half-life is given in thousands of images, with an optional ramp-up early in training."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from daskgan.config import TrainConfig


def ema_beta(global_batch: int, ema_kimg: float, images_seen: int, rampup: float | None = None) -> float:
    """Per-step decay so that the average's half-life is ``ema_kimg`` thousand images (at most ``rampup`` times
    the images seen so far, when a ramp-up is set)."""
    half_life = ema_kimg * 1000
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (global_batch / max(half_life, 1e-8))


def ema_beta_at(train: "TrainConfig", iteration: int, global_batch: int, ema_kimg: float | None = None) -> float:
    """The decay for ``iteration``: 0 before ``train.ema_start`` (the average copies G, as BigGAN's ema_start),
    then the half-life rule, with ``train.ema_kimg`` or the half-life ``ema_kimg`` its schedule gives."""
    if iteration < train.ema_start:
        return 0.0
    half_life = train.ema_kimg if ema_kimg is None else ema_kimg
    return ema_beta(global_batch, half_life, iteration * global_batch, train.ema_rampup)


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, beta: float, average_buffers: bool = False) -> None:
    """average = beta * average + (1 - beta) * model for parameters. Buffers (BatchNorm statistics, spectral-norm
    vectors) are copied, as NVlabs, or averaged too with ``average_buffers``, as BigGAN-PyTorch's ema (counters
    are copied either way)."""
    for p_average, p in zip(average.parameters(), model.parameters()):
        p_average.copy_(p.detach().lerp(p_average, beta))
    for b_average, b in zip(average.buffers(), model.buffers()):
        b_average.copy_(b.lerp(b_average, beta) if average_buffers and b.is_floating_point() else b)
