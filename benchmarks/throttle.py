"""The per-object stream through throttling: images/s when a share of object GETs is answered 503 SlowDown or 500.

The tests' fault proxy (in a process of its own) stands in front of the loopback S3 server (moto) and answers a
share of the GETs of objects with S3's 503 SlowDown or 500 InternalError, at random; listings pass. daskgan's
``ImageStream`` reads two epochs of a folder of images through it, with the storage options users run with
(botocore's own retries as they come), and the figure is the images delivered per second from the stream's start
(so a stall anywhere counts), next to the rate without failures. A run still going after ``--limit`` seconds is
stopped and given as the images it had delivered; a run the stream gave up on (``StorageUnavailable``) says so.

Run: ``.venv/bin/python benchmarks/throttle.py [--images N] [--rounds N] [--shares 0,0.2,0.6]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from dataclasses import dataclass

from loaders import Faults, proxy_process  # loaders puts tests/ (the fault proxy) on the path

from daskgan.config import DataConfig
from daskgan.data import synthetic
from daskgan.data.index import index_images
from daskgan.data.stream import ImageStream
from daskgan.run import storage
from daskgan.tools.sandbox import LoopbackS3

EPOCHS, RESOLUTION = 2, 32


@dataclass
class Run:
    """One stream's run: images delivered, seconds taken, and the error that ended it, if one did."""

    images: int
    seconds: float
    error: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def stream_run(url: str, endpoint_url: str, images: int, limit_s: float) -> Run:
    """Two epochs of the stream through ``endpoint_url``, stopped after ``limit_s``."""
    options = {"endpoint_url": endpoint_url}
    index = index_images(url, options)  # listing excluded (it is not faulted either)
    stream = ImageStream(index, DataConfig(url=url, storage_options=options, resolution=RESOLUTION), epochs=EPOCHS)
    delivered, error = [0], [""]

    def consume() -> None:
        try:
            for batch in stream:
                delivered[0] += len(batch.images)
        except Exception as exc:  # the figure says how the stream ended
            error[0] = f"{type(exc).__name__}"

    started = time.monotonic()
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(limit_s)
    seconds = time.monotonic() - started
    stream.close()
    if consumer.is_alive():
        error[0] = f"stopped at {limit_s:.0f} s"
    return Run(delivered[0], seconds, error[0])


def measure(server: LoopbackS3, shares: list[float], images: int, rounds: int, limit_s: float
            ) -> dict[float, list[Run]]:
    """Each share's runs, ``rounds`` times over, the rounds going over every share in turn."""
    url, options = "s3://bench-throttle/objects", {"endpoint_url": server.endpoint_url}
    storage.filesystem(url, options)[0].mkdir("bench-throttle")
    synthetic.write_dataset(url, images=images, resolution=RESOLUTION, storage_options=options)
    stream_run(url, server.endpoint_url, images, limit_s)  # a first run pays for imports and pools: not counted
    runs: dict[float, list[Run]] = {share: [] for share in shares}
    for round_ in range(rounds):
        for share in shares:
            faults = Faults(error_share=share, only_object_gets=True, seed=round_)
            with proxy_process(server.endpoint_url, faults) as endpoint_url:
                runs[share].append(stream_run(url, endpoint_url, images, limit_s))
            print(f"{share:.0%}: {runs[share][-1]}", flush=True)
    return runs


def row(share: float, runs: list[Run], unthrottled: list[Run]) -> str:
    """A share's figures; x: its median rate over the unthrottled median, and (on a shared machine, where other
    work slows a round down at random) its best round's over the unthrottled best."""
    rates, base = [run.rate for run in runs], [run.rate for run in unthrottled]
    ended = "; ".join(sorted({run.error for run in runs if run.error})) or "–"
    return (f"| {share:.0%} | {' / '.join(str(run.images) for run in runs)} | "
            f"{' / '.join(f'{run.seconds:.1f}' for run in runs)} | {statistics.median(rates):,.0f} "
            f"({min(rates):,.0f}-{max(rates):,.0f}) | {statistics.median(rates) / statistics.median(base):.2f}x "
            f"({max(rates) / max(base):.2f}x) | {ended} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shares", default="0,0.2,0.6", help="shares of object GETs answered 503/500")
    parser.add_argument("--limit", type=float, default=150.0, help="seconds after which a run is stopped")
    args = parser.parse_args()
    shares = [float(share) for share in args.shares.split(",")]
    with LoopbackS3() as server:
        os.environ.update(server.environment())
        runs = measure(server, shares, args.images, args.rounds, args.limit)
    print(f"\nper-object stream, {args.images} images of {RESOLUTION} px, {EPOCHS} epochs, through the fault proxy; "
          f"images/s from the stream's start, median of {args.rounds} rounds (range); x: of the {shares[0]:.0%} "
          f"rate (best rounds')"
          f"\n\n| object GETs failing | images delivered | seconds | images/s | x | ended by |\n"
          f"|---|---|---|---|---|---|")
    for share in shares:
        print(row(share, runs[share], runs[shares[0]]))


if __name__ == "__main__":
    main()
