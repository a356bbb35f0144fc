"""Scale benchmarks (issue #10); prints figures, asserts nothing.

1. Dataset listing and hand-out for a 1,000,000-image dataset (ImageNet-shaped keys, 1,000 classes) on 2 ranks:
   before, rank 0 listed at every start and broadcast the pickled index to every rank; now rank 0 lists once,
   writes the manifest, and every rank (and every restart) reads the manifest. The listing rate is measured on
   the loopback S3 with ``--listed`` keys and scaled to 1,000,000 (uploading a million objects to moto is not
   practical); the hand-out is measured at full size.
2. FID feature gather at 50,000 × 2048 on 2 ranks (gloo, CPU): peak resident memory each rank adds, for the
   former all-ranks float64 ``all_gather_object`` next to today's float32 ``gather`` to rank 0.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/scale.py [--entries N] [--listed N] [--features N]``).
"""

from __future__ import annotations

import argparse
import pickle
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from daskgan import metrics
from daskgan.data.index import ImageIndex, index_images
from daskgan.data.manifest import manifest_bytes, parse_manifest
from daskgan.run import storage
from daskgan.tools.sandbox import LoopbackS3, environment

WORLD = 2


def imagenet_shaped_index(entries: int, classes: int = 1000) -> ImageIndex:
    names = [f"n{c:08d}" for c in range(classes)]
    paths = tuple(f"bucket/imagenet/train/{names[i % classes]}/{names[i % classes]}_{i:07d}.JPEG"
                  for i in range(entries))
    return ImageIndex("s3://bucket/imagenet/train", paths, tuple(i % classes for i in range(entries)),
                      tuple(names), tuple(110_000 + i % 5000 for i in range(entries)))


def listing_seconds_per_key(keys: int) -> float:
    """Seconds per key of ``index_images`` (s3fs ``find``, 1,000 keys a page) on the loopback S3."""
    with LoopbackS3() as server, environment(server.environment()):
        options = {"endpoint_url": server.endpoint_url}
        fs, _ = storage.filesystem("s3://listing", options)
        fs.mkdir("listing")
        fs.pipe({f"listing/data/c{i % 10}/{i:07d}.png": b"" for i in range(keys)})
        started = time.perf_counter()
        index_images("s3://listing/data", options)
        return (time.perf_counter() - started) / keys


def handout_seconds(index: ImageIndex, method: str, address: str, results: dict, rank: int) -> None:
    """One rank of the hand-out: ``before`` broadcasts the pickled index, ``after`` broadcasts nothing and
    parses the manifest bytes (each rank's GET of the manifest is not in this figure)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=WORLD)
    manifest = manifest_bytes(index, "bucket/imagenet/train") if method == "after" else b""
    dist.barrier()
    started = time.perf_counter()
    if method == "before":
        box = [index if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
    else:
        dist.broadcast_object_list([None], src=0)
        parse_manifest(manifest, "manifest", index.url, "bucket/imagenet/train")
    results[rank] = time.perf_counter() - started
    dist.destroy_process_group()


def handout_lines(entries: int, listed: int):
    index = imagenet_shaped_index(entries)
    per_key = listing_seconds_per_key(listed)
    pickled, manifest = len(pickle.dumps(index)), len(manifest_bytes(index, "bucket/imagenet/train"))
    listing = per_key * entries
    yield f"  listing (s3fs find on loopback moto, {listed:,} keys, scaled): {listing:7.1f} s for {entries:,} keys"
    for method in ("before", "after"):
        times = _spawn(handout_seconds, index, method)
        if method == "before":
            yield (f"  before: list at every start + broadcast the pickled index: {listing + max(times):7.1f} s per "
                   f"start, {pickled / 2**20:6.1f} MiB to every rank through the collective "
                   f"(broadcast {max(times):.1f} s)")
        else:
            yield (f"  after, first start: list + write manifest, ranks read it:  {listing + max(times):7.1f} s, "
                   f"{manifest / 2**20:6.1f} MiB manifest read by every rank from storage (parse {max(times):.1f} s)")
            yield (f"  after, every restart: read the manifest, no listing:       {max(times):7.1f} s, "
                   f"{manifest / 2**20:6.1f} MiB per rank, nothing but a done-signal through the collective")


def _spawn(function, *args) -> list[float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    results = mp.Manager().dict()
    mp.start_processes(_call_with_rank, args=(function, args, address, results), nprocs=WORLD, start_method="spawn")
    return [results[rank] for rank in range(WORLD)]


def _reset_peak_rss() -> int:
    """Reset this process's peak resident size to its current size (Linux ``clear_refs``; a spawned process
    otherwise inherits its parent's peak across exec) and return that size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _call_with_rank(rank: int, function, args, address: str, results: dict) -> None:
    function(*args, address, results, rank)


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


def gather_peak(method: str, count: int, width: int, address: str, results: dict, rank: int) -> None:
    """One rank's peak resident bytes added during one gather (each method in fresh processes)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=WORLD)
    dist.barrier()
    before = _reset_peak_rss()
    {"before": gather_all_float64, "after": gather_rank0_float32}[method](count, width)
    dist.barrier()
    results[rank] = _status_bytes("VmHWM") - before
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--listed", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    print(f"Dataset listing and hand-out, {args.entries:,} images in 1,000 classes, {WORLD} ranks:")
    for line in handout_lines(args.entries, args.listed):
        print(line, flush=True)
    print(f"FID feature gather, {args.features:,} x {args.width} on {WORLD} ranks (gloo): peak added RSS per rank")
    full = args.features * args.width
    print(f"  (the whole set is {full * 4 / 2**20:,.0f} MiB in float32, {full * 8 / 2**20:,.0f} MiB in float64)")
    for method, label in (("before", "all_gather_object, float64, all ranks"), ("after", "gather to rank 0, float32")):
        peaks = _spawn(gather_peak, method, args.features, args.width)
        print(f"  {label:40s} " + ", ".join(f"rank {r}: {p / 2**20:7,.0f} MiB" for r, p in enumerate(peaks)),
              flush=True)


if __name__ == "__main__":
    main()
