"""Which tar shards each rank reads in an epoch, and in what order (the reading is ``shard_read``'s).

Each rank takes every ``world_size``-th shard of the epoch's shard permutation and walks them in windows of
``data.shuffle_shards`` shards, the images of a window shuffled together (a shuffle buffer as WebDataset's, but a
deterministic one): the stream's position (epoch, images consumed) then pins the window, its permutation and the
offset in it, so a resume continues mid-shard exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daskgan.data.shard_scan import TarMember
from daskgan.errors import NotFound
from daskgan.seeding import stream_seed


@dataclass(frozen=True)
class Window:
    """Shards read together, and the order of their images (indices into the index, mirrored copies >= count)."""

    shards: tuple[int, ...]
    order: tuple[int, ...]


def images_by_shard(members: tuple[TarMember, ...], shard_count: int) -> tuple[tuple[int, ...], ...]:
    """The images (positions in the index) of each shard, in the shard's order."""
    in_shard: list[list[int]] = [[] for _ in range(shard_count)]
    for image, member in enumerate(members):
        in_shard[member.shard].append(image)
    return tuple(tuple(images) for images in in_shard)


def epoch_windows(shard_images: tuple[tuple[int, ...], ...], rank: int, world_size: int, epoch: int, seed: int,
                  window: int, shuffle: bool = True, mirror: bool = False) -> list[Window]:
    """This rank's windows in ``epoch``: every ``world_size``-th shard of the epoch's shard permutation, taken
    ``window`` at a time, the images of each window permuted together (mirrored copies among them).
    ``shard_images``: ``images_by_shard``, worked out once for a dataset."""
    shard_count = len(shard_images)
    if shard_count < world_size:
        raise NotFound(f"data.url: {shard_count} shards for {world_size} ranks: every rank needs a shard of its own "
                       f"(write more, smaller shards)")
    generator = torch.Generator().manual_seed(stream_seed(seed, "shards", epoch))
    shards = torch.randperm(shard_count, generator=generator).tolist() if shuffle else list(range(shard_count))
    mine = shards[rank::world_size]
    count = sum(len(images) for images in shard_images)
    windows = []
    for start in range(0, len(mine), window):
        group = tuple(mine[start:start + window])
        images = [image for shard in group for image in shard_images[shard]]
        images += [image + count for image in images] if mirror else []
        if shuffle:
            window_seed = stream_seed(seed, "window", epoch, rank, start)
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(window_seed)).tolist()
            images = [images[i] for i in order]
        windows.append(Window(group, tuple(images)))
    return windows

