"""Does the loader slow the training step? ms per step on batches streamed from S3 vs batches already in memory.

The same DCGAN step (``run.py``'s ``PlainDcgan``, one process; on a GPU where there is one, else on the CPU with
torch on one thread as in a Dask worker) runs on:

- batches decoded beforehand and held in memory (the step alone);
- an ``ImageStream`` over tar shards of the same images on the loopback S3 server, decoding inline (in the
  stream's own thread), in 2 threads, and in 1 or 2 processes beside the training process.

Two step sizes (``--channels``): DCGAN 64 px with 64 channels (about a second of arithmetic: the loader has the
whole step to hide in) and with 8 channels (tens of ms, a larger share of it Python dispatch holding the GIL, as a
GPU's training thread holds it while it launches kernels: there, every decode that holds the GIL, as pyspng's does,
delays the step). The ratio to the in-memory step is the loader's cost. On this 2-core machine the training thread,
the S3 server and the decoders share two cores, so a decoding process also competes for a core, not only for the
GIL.

The images are 64 px PNGs, or with ``--set jpeg256`` 256 px JPEGs (the step then runs at 256 px), as
``make gpu-check`` measures it on a GPU.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/loader_step.py [--images N] [--steps N] [--warmup N]
[--set png64|jpeg256] [--channels 64,8]``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from loaders import SHARDS, decoded_batch, image_set, upload_shards
from run import PlainDcgan

from daskgan.config import DataConfig
from daskgan.data.decode import to_unit_range
from daskgan.data.index import index_images
from daskgan.data.stream import ImageStream
from daskgan.tools.sandbox import LoopbackS3

BATCH, WARMUP = 64, 10
LOADERS = {"inline": {"decode_threads": 1}, "2 threads": {"decode_threads": 2},
           "1 process": {"decode_processes": 1}, "2 processes": {"decode_processes": 2}}


def seconds_per_step(model: PlainDcgan, batches, steps: int, warmup: int = WARMUP) -> float:
    """Mean wall time of ``steps`` steps after ``warmup`` (stalls waiting for data count: they are the point). Each
    uint8 batch is converted on the model's device, as the training step does."""
    for batch in itertools.islice(batches, warmup):
        model.step(to_unit_range(batch.to(model.device)))
    synchronize(model.device)
    started = time.perf_counter()
    for batch in itertools.islice(batches, steps):
        model.step(to_unit_range(batch.to(model.device)))
    synchronize(model.device)
    return (time.perf_counter() - started) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_memory(images: list[bytes], resolution: int):
    """Endless uint8 batches decoded beforehand, as the stream delivers them."""
    decoded = [decoded_batch(images[start:start + BATCH], resolution)
               for start in range(0, len(images) - BATCH + 1, BATCH)]
    return itertools.cycle(decoded)


def streamed(url: str, options: dict, resolution: int, decoding: dict):
    index = index_images(url, options)
    config = DataConfig(url=url, storage_options=options, resolution=resolution, batch_size=BATCH, fetch_batch=256,
                        prefetch_batches=4, **decoding)
    stream = ImageStream(index, config)
    try:
        yield from (batch.images for batch in stream)
    finally:
        stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps before each measurement")
    parser.add_argument("--set", choices=("png64", "jpeg256"), default="png64", help="the images and resolution")
    parser.add_argument("--channels", default="64,8", help="DCGAN widths to measure, comma-separated")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as in a Dask worker
    resolution, images = image_set(args.set, args.images)
    with LoopbackS3() as server:
        os.environ.update(server.environment())
        options = {"endpoint_url": server.endpoint_url}
        url = upload_shards("s3://bench-step", images, options)
        print(f"\nms per DCGAN {resolution} px step on {device.type}, batch {BATCH}, {args.set} images in {SHARDS} "
              f"tar shards on the loopback S3 server; ratio to the in-memory step\n")
        print("| step | in memory | " + " | ".join(f"stream, {name}" for name in LOADERS) + " |")
        print("|---|---|" + "---|" * len(LOADERS))
        for channels in (int(width) for width in args.channels.split(",")):
            steps = args.steps if channels <= 8 else max(min(10, args.steps), args.steps // 6)
            alone = seconds_per_step(PlainDcgan(resolution, channels, device=device), in_memory(images, resolution),
                                     steps, args.warmup)
            cells = [f"{alone * 1000:.1f}"]
            for decoding in LOADERS.values():
                batches = streamed(url, options, resolution, decoding)
                with_stream = seconds_per_step(PlainDcgan(resolution, channels, device=device), batches, steps,
                                               args.warmup)
                batches.close()
                cells.append(f"{with_stream * 1000:.1f} ({with_stream / alone:.2f}x)")
            print(f"| {channels} channels | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
