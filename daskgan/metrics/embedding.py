"""Features of a set of items computed by all ranks together: each embeds its share, rank 0 gets the whole.

At FID's 50,000 images × 2048 features the whole is 400 MB in float32: only rank 0, which computes the scores,
holds it (``dist.gather`` of fixed-size float32 shares); the other ranks hold their own share only. A whole
dataset's statistics (``dataset_statistics``) are sums instead, added up across ranks: no features are kept.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from daskgan import ranks
from daskgan.metrics.distances import mean_and_covariance


def embed_share(count: int, images_of: Callable[[list[int]], torch.Tensor],
                extractor: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64) -> torch.Tensor | None:
    """Features (float32, on the CPU) of items 0..count-1, in item order, on rank 0; ``None`` on other ranks.

    This rank embeds items rank, rank + world, ... ``images_of(indices)`` returns those items' images
    (N, 3, H, W) in [-1, 1]. Every rank must call it (it is a collective)."""
    rank, world = ranks.rank(), ranks.world_size()
    mine = list(range(rank, count, world))
    longest = -(-count // world)  # shares differ by at most one item: each is written into a buffer this long
    share: torch.Tensor | None = None
    for start in range(0, len(mine), batch_size):
        features = extractor(images_of(mine[start:start + batch_size]))
        if share is None:
            share = features.new_zeros(longest, features.shape[1], dtype=torch.float32)
        share[start:start + len(features)] = features
    if world == 1:
        return share.cpu() if share is not None else torch.zeros(0, 0)
    return _gather_in_item_order(share, count, rank, world)


def _gather_in_item_order(share: torch.Tensor | None, count: int, rank: int, world: int) -> torch.Tensor | None:
    """Rank 0 receives every padded share into one (world, longest, width) buffer. Item i sits at row i // world
    of share i % world, so the buffer read row by row across shares is item order, with the padding last."""
    longest = -(-count // world)
    width = _feature_width(share)
    if share is None:  # more ranks than items
        share = torch.zeros(longest, width, device=ranks.collective_device())
    if rank != 0:
        dist.gather(share, None, dst=0)
        return None
    received = share.new_empty(world, longest, width)
    dist.gather(share, list(received.unbind(0)), dst=0)
    return received.transpose(0, 1).reshape(world * longest, width)[:count].cpu()


def _feature_width(share: torch.Tensor | None) -> int:
    """The feature width, known to every rank even one with no items."""
    width = torch.tensor([0 if share is None else share.shape[1]], device=ranks.collective_device())
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return int(width)


def dataset_statistics(batches: Iterable[torch.Tensor], extractor: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and covariance (float64) of the features of every image the ranks' ``batches`` hold together, and their
    count: each rank sums its features and their outer products, one all-reduce adds the sums up. No rank holds
    more than a batch of features, so a dataset of ImageNet's size costs its images' passes, not memory."""
    total = products = None
    count = 0
    for images in batches:
        features = extractor(images).double()
        if total is None:
            total = features.new_zeros(features.shape[1])
            products = features.new_zeros(features.shape[1], features.shape[1])
        total += features.sum(0)
        products += features.T @ features
        count += len(features)
    alone = ranks.world_size() == 1
    mine = None if total is None else total[None]
    width = (0 if total is None else len(total)) if alone else _feature_width(mine)
    packed = torch.zeros(width * width + width + 1, dtype=torch.float64, device=ranks.collective_device())
    if total is not None:
        packed[:width * width] = products.flatten().to(packed.device)
        packed[width * width:-1] = total.to(packed.device)
        packed[-1] = count
    if not alone:
        dist.all_reduce(packed)
    packed, count = packed.cpu(), int(packed[-1])
    if count < 2:
        raise ValueError(f"metrics: {count} readable real images: too few for a covariance")
    mean, covariance = mean_and_covariance(packed[width * width:-1], packed[:width * width].view(width, width), count)
    return mean, covariance, count
