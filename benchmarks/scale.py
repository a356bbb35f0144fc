"""Scale benchmarks (issue #10); prints figures, asserts nothing.

1. FID feature gather at 50,000 × 2048 on 2 ranks (gloo, CPU): peak resident memory each rank adds, for the
   former all-ranks float64 ``all_gather_object`` next to today's float32 ``gather`` to rank 0.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/scale.py [--features N] [--width D]``).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from daskgan import metrics

WORLD = 2


def gather_all_float64(count: int, width: int) -> None:
    """The former path: every rank's float64 share pickled to every rank, which assembles the whole."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local = _share(count, width, rank, world).double()
    shares = [None] * world
    dist.all_gather_object(shares, local)
    features = torch.empty(count, width, dtype=torch.float64)
    for source, share in enumerate(shares):
        features[source::world] = share


def gather_rank0_float32(count: int, width: int) -> None:
    """Today's path: ``metrics.embed_share`` with an extractor that returns the share's features."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = _share(count, width, rank, world)
    positions = {item: row for row, item in enumerate(range(rank, count, world))}
    metrics.embed_share(count, lambda items: share[[positions[i] for i in items]], nn.Identity(), batch_size=4096)


def _share(count: int, width: int, rank: int, world: int) -> torch.Tensor:
    return torch.randn(len(range(rank, count, world)), width, generator=torch.Generator().manual_seed(rank))


def _peak_rank(rank: int, method: str, count: int, width: int, address: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=WORLD)
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    {"before": gather_all_float64, "after": gather_rank0_float32}[method](count, width)
    dist.barrier()
    results[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    dist.destroy_process_group()


def gather_peaks(method: str, count: int, width: int) -> list[int]:
    """Peak resident bytes each rank adds during one gather (fresh processes per method)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    results = mp.Manager().dict()
    mp.start_processes(_peak_rank, args=(method, count, width, address, results), nprocs=WORLD,
                       start_method="spawn")
    return [results[rank] for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    print(f"FID feature gather, {args.features:,} x {args.width} on {WORLD} ranks (gloo): peak added RSS per rank")
    full = args.features * args.width
    print(f"  (the whole set is {full * 4 / 2**20:,.0f} MiB in float32, {full * 8 / 2**20:,.0f} MiB in float64)")
    for method, label in (("before", "all_gather_object, float64, all ranks"), ("after", "gather to rank 0, float32")):
        peaks = gather_peaks(method, args.features, args.width)
        print(f"  {label:40s} " + ", ".join(f"rank {r}: {p / 2**20:7,.0f} MiB" for r, p in enumerate(peaks)),
              flush=True)


if __name__ == "__main__":
    main()
