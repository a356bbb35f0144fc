"""Features of a set of items computed by all ranks together: each embeds its share, all get the whole, in order."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from daskgan import ranks


def embed_share(count: int, images_of: Callable[[list[int]], torch.Tensor], extractor: nn.Module,
                batch_size: int = 64) -> torch.Tensor:
    """Features of items 0..count-1, this rank embedding items rank, rank + world, ...; all ranks get all, in
    item order. ``images_of(indices)`` returns those items' images (N, 3, H, W) in [-1, 1]."""
    rank, world = ranks.rank(), ranks.world_size()
    mine = list(range(rank, count, world))
    chunks = [extractor(images_of(mine[i:i + batch_size])) for i in range(0, len(mine), batch_size)]
    local = torch.cat(chunks).double() if chunks else torch.zeros(0, 0, dtype=torch.float64)
    if world == 1:
        return local.cpu()
    return _gather_in_item_order(local, count, world)


def _gather_in_item_order(local: torch.Tensor, count: int, world: int) -> torch.Tensor:
    shares = [None] * world
    dist.all_gather_object(shares, local.cpu())  # shares differ in length by at most one item
    features = torch.empty(count, shares[0].shape[1], dtype=torch.float64)
    for rank, share in enumerate(shares):
        features[rank::world] = share
    return features
