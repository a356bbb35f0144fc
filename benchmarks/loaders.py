"""Training-data loaders side by side: images/s delivered to one consumer, the same images, the same S3 server.

For two image sets (64 px PNG and 256 px JPEG) on the loopback S3 server (moto, its own process), as is and behind
a proxy that adds 20 ms to every request (S3's first-byte latency), one pass over every image by:

- daskgan per-object (``ImageStream`` over a folder: one GET per image, many in flight), zip (one ranged GET per
  member) and tar shards (one GET per shard, a window of shards in flight), decoding in the rank's threads (the
  default on a CPU), and the shards once more decoding in 2 processes (the default on a GPU);
- dask-pytorch-ddp's ``S3ImageFolder`` pattern: a torch ``DataLoader`` (2 worker processes) whose dataset GETs one
  object per item with boto3;
- WebDataset over the same shards (HTTP URLs, 2 DataLoader workers);
- Mosaic Streaming over MDS shards of the same images (cold local cache, 2 DataLoader workers);
- decoding the same bytes from memory in one process: the ceiling (and with Pillow alone, without daskgan's
  optional pyspng/simplejpeg).

Each loader is measured over one pass of the images but daskgan's shards, an endless stream measured over
``STREAM_IMAGES`` images (several passes). Every loader decodes with the same function (daskgan's ``decode_uint8``;
its stream, ``decode_part`` into one array per chunk) to (3, R, R) uint8 images batched as they are (what NVlabs'
loader and daskgan's stream hand the training step, which converts them on the device), so the figures compare
getting bytes, not decoders. Mosaic Streaming imports torchvision at import time only (a base class and
``to_tensor`` for its vision datasets, which this does not use); where no torchvision fits the installed torch
(this CPU machine: the registry's torchvision wheels are CUDA builds), a stand-in with those two names is put on
its path, and the figures say so.

Every loader is measured ``--rounds`` times (3), the rounds going over all loaders in turn, and the table gives each
one's median and range: on a shared machine, runs move by up to a third.

Run: ``make bench-loaders`` (installs the peers: ``pip install '.[bench]'`` and Mosaic without its torch
requirements), or ``.venv/bin/python benchmarks/loaders.py [--images N] [--rounds N] [--shards N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from daskgan.config import DataConfig
from daskgan.data import decode, synthetic
from daskgan.data.decode import decode_uint8
from daskgan.data.decode_pool import decode_part
from daskgan.data.index import index_images
from daskgan.data.shard_write import tar_shard
from daskgan.data.stream import ImageStream
from daskgan.run import storage
from daskgan.tools.sandbox import LoopbackS3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fault_proxy import FaultProxy, Faults  # noqa: E402  (the tests' proxy: 20 ms on every request)

BATCH, SHARDS, WORKERS, LATENCY_S = 64, 8, 2, 0.020
STREAM_IMAGES = 16384  # a pass over daskgan's shards takes a few hundredths of a second, which timing noise swamps


def image_set(kind: str, count: int) -> tuple[int, list[bytes]]:
    """(resolution, encoded images) of the generated shapes: ``png64`` or ``jpeg256``."""
    resolution, fmt = (64, "PNG") if kind == "png64" else (256, "JPEG")
    rng = random.Random(0)
    encoded = []
    for i in range(count):
        buffer = io.BytesIO()
        synthetic.draw_image(synthetic.SHAPES[i % 4], resolution, rng).save(buffer, format=fmt, quality=90)
        encoded.append(buffer.getvalue())
    return resolution, encoded


def extension(images: list[bytes]) -> str:
    """The file extension of the image set's format (``image_set`` makes PNGs or JPEGs)."""
    return "png" if images[0].startswith(decode.PNG_SIGNATURE) else "jpg"


def upload(bucket: str, images: list[bytes], options: dict, mds_folder: Path, shards: int) -> dict[str, str]:
    """The same images as objects, an NVlabs zip, tar shards and Mosaic MDS shards; returns their URLs."""
    ext = extension(images)
    storage.write_many({f"{bucket}/objects/{i % 4}/{i:06d}.{ext}": data for i, data in enumerate(images)}, options)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for i, data in enumerate(images):
            zipped.writestr(f"{i // 1000:05d}/img{i:08d}.{ext}", data)
        zipped.writestr("dataset.json", json.dumps({"labels": [[f"{i // 1000:05d}/img{i:08d}.{ext}", i % 4]
                                                               for i in range(len(images))]}))
    storage.write_bytes(f"{bucket}/data.zip", archive.getvalue(), options)
    shard_pattern = upload_shards(bucket, images, options, shards)
    mds = _write_mds(images, mds_folder)
    if mds:
        storage.write_many({f"{bucket}/mds/{p.name}": p.read_bytes() for p in mds_folder.iterdir()}, options)
    return {"objects": f"{bucket}/objects", "zip": f"{bucket}/data.zip", "shards": shard_pattern,
            "mds": f"{bucket}/mds" if mds else ""}


def upload_shards(bucket: str, images: list[bytes], options: dict, shards: int = SHARDS) -> str:
    """The images as ``shards`` WebDataset tar shards under ``bucket`` (made if missing); returns their pattern."""
    fs, _ = storage.filesystem(bucket, options)
    if not fs.exists(bucket.removeprefix("s3://")):
        fs.mkdir(bucket.removeprefix("s3://"))
    ext = extension(images)
    per_shard = -(-len(images) // shards)
    for shard in range(shards):
        samples = [(f"{i:06d}", {ext: images[i], "cls": str(i % 4).encode()})
                   for i in range(shard * per_shard, min((shard + 1) * per_shard, len(images)))]
        storage.write_bytes(f"{bucket}/shards/train-{shard:06d}.tar", tar_shard(samples), options)
    return f"{bucket}/shards/train-{{000000..{shards - 1:06d}}}.tar"


def daskgan_rate(url: str, options: dict, resolution: int, count: int, decode_processes: int = 0) -> float:
    index = index_images(url, options)  # listing (and the shards' header scan) excluded, as a manifest would be
    config = DataConfig(url=url, storage_options=options, resolution=resolution, batch_size=BATCH, fetch_batch=256,
                        prefetch_batches=8, shuffle_shards=4, decode_processes=decode_processes)
    stream = ImageStream(index, config)
    rate = steady_rate((len(batch.images) for batch in stream), max(count, STREAM_IMAGES) if index.shards else count)
    stream.close()
    return rate


class BotoPerItem(torch.utils.data.Dataset):
    """dask-pytorch-ddp's S3ImageFolder pattern: a boto3 ``get_object`` per item, in the DataLoader's workers."""

    def __init__(self, bucket: str, keys: list[str], endpoint_url: str, resolution: int):
        self.bucket, self.keys, self.endpoint_url, self.resolution = bucket, keys, endpoint_url, resolution
        self._client = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: int) -> torch.Tensor:
        if self._client is None:  # one per worker process
            import boto3
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        data = self._client.get_object(Bucket=self.bucket, Key=self.keys[item])["Body"].read()
        return decode_uint8(data, self.resolution)


def steady_rate(batch_sizes: Iterator[int], count: int) -> float:
    """Images/s from the first batch's arrival to the batch that completes ``count`` images: start-up (worker
    processes, the first shards' GETs) left out, as it is from a run of days."""
    first = next(batch_sizes)
    started, delivered = time.perf_counter(), 0
    for size in batch_sizes:
        delivered += size
        if first + delivered >= count:
            break
    return delivered / (time.perf_counter() - started)


def loader_rate(dataset, count: int, **loader_options) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, **loader_options)
    return steady_rate((len(batch) for batch in loader), count)


def boto_rate(url: str, options: dict, resolution: int, count: int) -> float:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    keys = sorted(p.split("/", 1)[1] for p in index_images(url, options).paths)
    return loader_rate(BotoPerItem(bucket, keys, options["endpoint_url"], resolution), count, shuffle=True)


def webdataset_rate(pattern: str, endpoint_url: str, resolution: int, count: int) -> float:
    """WebDataset reading ``s3://`` shards as its users do (``pipe:aws s3 cp``): one streamed GET per shard, here
    boto3's streaming body registered as its ``s3`` opener."""
    import webdataset as wds

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
        import boto3

        bucket, key = url.removeprefix("s3://").split("/", 1)
        return boto3.client("s3", endpoint_url=endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = open_s3  # its table of URL openers
    dataset = (wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
               .map(lambda sample: decode_uint8(sample.get("png") or sample["jpg"], resolution)))
    return loader_rate(dataset, count)


def mosaic_rate(remote: str, endpoint_url: str, resolution: int, count: int) -> float:
    from streaming import StreamingDataset

    os.environ["S3_ENDPOINT_URL"] = endpoint_url
    with tempfile.TemporaryDirectory() as local:  # a cold cache every time

        class Decoded(StreamingDataset):
            def __getitem__(self, item):
                return decode_uint8(super().__getitem__(item)["image"], resolution)

        dataset = Decoded(remote=remote, local=local, batch_size=BATCH, shuffle=False)
        return loader_rate(dataset, count)


def _write_mds(images: list[bytes], folder: Path) -> bool:
    try:
        _import_mosaic()
        from streaming import MDSWriter
    except ImportError as error:
        print(f"Mosaic Streaming not measured: {error}")
        return False
    with MDSWriter(out=str(folder), columns={"image": "bytes", "label": "int"}, size_limit=2**20 * 32) as writer:
        for i, data in enumerate(images):
            writer.write({"image": data, "label": i % 4})
    return True


MOSAIC_STANDIN = False


def _import_mosaic() -> None:
    """Import Mosaic Streaming; without a usable torchvision, through a stand-in for the two names it imports."""
    global MOSAIC_STANDIN
    try:
        import torchvision  # noqa: F401
    except Exception:
        standin = Path(tempfile.mkdtemp()) / "torchvision"
        (standin / "transforms").mkdir(parents=True)
        (standin / "__init__.py").write_text("")
        (standin / "datasets.py").write_text("import torch\nclass VisionDataset(torch.utils.data.Dataset):\n    pass\n"
                                             "CIFAR10 = None\n")
        (standin / "transforms" / "__init__.py").write_text("")
        (standin / "transforms" / "functional.py").write_text("def to_tensor(x):\n    raise NotImplementedError\n")
        sys.path.insert(0, str(standin.parent))
        os.environ["PYTHONPATH"] = f"{standin.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        sys.modules.pop("torchvision", None)
        MOSAIC_STANDIN = True
    import streaming  # noqa: F401


def memory_rate(images: list[bytes], resolution: int, pillow_only: bool = False) -> float:
    """Images/s decoding ``STREAM_IMAGES`` images from memory (passes over ``images``) in one thread into batches
    as the stream's decoder does (``decode_part``: each image into its row of one uint8 array), with the fast
    decoders where installed, or with Pillow alone. Timed as the shards are, over as many images in one timing:
    the best of a few 40 ms passes would pick a shared machine's least disturbed moments, which no loader's
    half-second figure can."""
    saved = decode.pyspng, decode.simplejpeg
    if pillow_only:
        decode.pyspng = decode.simplejpeg = None
    passes = max(1, STREAM_IMAGES // len(images))
    try:
        started = time.perf_counter()
        for _ in range(passes):
            for start in range(0, len(images), BATCH):
                decoded_batch(images[start:start + BATCH], resolution)
        elapsed = time.perf_counter() - started
    finally:
        decode.pyspng, decode.simplejpeg = saved
    return passes * len(images) / elapsed


def decoded_batch(images: list[bytes], resolution: int) -> torch.Tensor:
    """(n, 3, R, R) uint8, decoded as the stream's decoder does (each image into its row of one array)."""
    batch = np.empty((len(images), 3, resolution, resolution), dtype=np.uint8)
    decode_part(images, batch)
    return torch.from_numpy(batch)


@contextlib.contextmanager
def proxy_process(target: str, faults: Faults) -> Iterator[str]:
    """The tests' fault proxy with ``faults``, in a process of its own: in this one, its forwarding of every byte
    would take the GIL from the loader measured here (the peers' DataLoader workers are processes of their own)."""
    context = multiprocessing.get_context("spawn")
    answer, ready = context.Pipe()
    process = context.Process(target=_serve_proxy, args=(target, faults, ready), daemon=True)
    process.start()
    try:
        yield answer.recv()
    finally:
        process.terminate()
        process.join()


def _serve_proxy(target: str, faults: Faults, ready) -> None:
    with FaultProxy(target, faults) as proxy:
        ready.send(proxy.endpoint_url)
        threading.Event().wait()


def measure(kind: str, count: int, server: LoopbackS3, rounds: int, shards: int) -> dict[str, list[list[float]]]:
    """Each loader's rates, ``rounds`` times over: per loader, the rates of each round on loopback and +20 ms (the
    in-memory ceilings have no second column). Rounds go over every loader in turn, so a disturbed minute of a
    shared machine costs each loader one round rather than one loader every round."""
    resolution, images = image_set(kind, count)
    bucket = f"s3://bench-{kind}"
    options = {"endpoint_url": server.endpoint_url}
    storage.filesystem(bucket, options)[0].mkdir(bucket.removeprefix("s3://"))
    with tempfile.TemporaryDirectory() as mds_folder:
        urls = upload(bucket, images, options, Path(mds_folder), shards)
    rates: dict[str, list[list[float]]] = {}

    def note(name: str, column: int, rate: float) -> None:
        rates.setdefault(name, [[], []])[column].append(rate)

    for _ in range(rounds):
        for column, delay in enumerate((0.0, LATENCY_S)):
            with proxy_process(server.endpoint_url, Faults(delay_share=1.0, delay_s=delay)) as proxy_url:
                endpoint = proxy_url if delay else server.endpoint_url  # loopback: no proxy in between
                via = {"endpoint_url": endpoint}
                for name, url in (("daskgan per-object", urls["objects"]), ("daskgan zip", urls["zip"]),
                                  ("daskgan shards", urls["shards"])):
                    note(name, column, daskgan_rate(url, via, resolution, count))
                note(f"daskgan shards, {WORKERS} decode processes", column,
                     daskgan_rate(urls["shards"], via, resolution, count, decode_processes=WORKERS))
                note("dask-pytorch-ddp pattern (boto3 per item, DataLoader x2)", column,
                     boto_rate(urls["objects"], via, resolution, count))
                note("WebDataset, same shards (DataLoader x2)", column,
                     webdataset_rate(urls["shards"], endpoint, resolution, count))
                if urls["mds"]:
                    label = "Mosaic Streaming, MDS shards, cold cache (DataLoader x2)" + \
                        (" [torchvision stand-in]" if MOSAIC_STANDIN else "")
                    note(label, column, mosaic_rate(urls["mds"], endpoint, resolution, count))
        note("decode from memory, one process (ceiling)", 0, memory_rate(images, resolution))
        note("decode from memory with Pillow alone", 0, memory_rate(images, resolution, pillow_only=True))
    return rates


def cell(rounds: list[float]) -> str:
    """The median of a loader's rounds, and their range where there are several."""
    if not rounds:
        return "–"
    median = f"{statistics.median(rounds):,.0f}"
    return median if len(rounds) == 1 else f"{median} ({min(rounds):,.0f}-{max(rounds):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every loader (median and range)")
    parser.add_argument("--shards", type=int, default=SHARDS, help="tar shards the images are written in")
    args = parser.parse_args()
    with LoopbackS3() as server:
        os.environ.update(server.environment())
        tables = {kind: measure(kind, args.images, server, args.rounds, args.shards) for kind in ("png64", "jpeg256")}
    print(f"\nimages/s delivered to one consumer after its first batch, {args.images} images each, {args.shards} "
          f"tar shards (loopback S3 / +{LATENCY_S * 1000:.0f} ms per request); median of {args.rounds} rounds "
          f"(range)\n")
    print("| loader | 64 px PNG | 64 px PNG +20 ms | 256 px JPEG | 256 px JPEG +20 ms |\n|---|---|---|---|---|")
    for name in tables["png64"]:
        print(f"| {name} | " + " | ".join(cell(rounds) for kind in tables for rounds in tables[kind][name]) + " |")


if __name__ == "__main__":
    main()
