"""Layers shared by several families: batch normalisation whose statistics span all workers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as collectives  # differentiable collectives

from daskgan import ranks


def batch_moments(x: torch.Tensor, across_ranks: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of (N, C, ...) ``x`` and the element count behind them; with
    ``across_ranks`` over the batches of every rank (differentiable: gradients flow back to every rank's input)."""
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.shape[1]
    sums = torch.stack([x.sum(dims), x.square().sum(dims)])
    if across_ranks and ranks.world_size() > 1:
        sums = collectives.all_reduce(sums, "sum", dist.group.WORLD)
        count *= dist.get_world_size()  # every rank's batch has the same size
    mean = sums[0] / count
    return mean, (sums[1] / count - mean.square()).clamp_min(0), count


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over every worker's batch, so the normalisation matches a
    single process seeing the global batch. torch's own SyncBatchNorm runs on GPUs only; this one runs wherever
    the process group does (gloo on CPU, nccl on GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var, count = batch_moments(x, across_ranks=True)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), self.momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        return out * self.weight.reshape(shape) + self.bias.reshape(shape) if self.affine else out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a SyncBatchNorm2d with the same settings and state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (N,) as one-hot rows; (N, C) float rows (e.g. a blend of two classes) pass unchanged."""
    return F.one_hot(labels, num_classes).float() if labels.dim() == 1 else labels.float()


@torch.no_grad()
def standing_statistics(generator: nn.Module, draw: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                        passes: int) -> None:
    """BigGAN's standing statistics: reset the BatchNorm statistics of ``generator`` (in place) and accumulate
    their plain average over ``passes`` training-mode forwards of ``draw()``'s latents, then return it to eval
    mode. Sampling then normalises with statistics of many batches rather than the training run's moving ones."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator.train()
    try:
        for _ in range(passes):
            generator(*draw())
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        generator.eval()
