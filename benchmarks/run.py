"""Benchmarks for the foundation slice; prints figures, asserts nothing.

1. Loader: images/s of the S3-streamed ImageStream (loopback moto server) vs the same files on local disk, next
   to the raw concurrent-GET rate of the same server (the ceiling a loader can reach against it).
2. DCGAN step time: train_gan under dispatch.run on 1 worker vs a plain single-process PyTorch loop of the same
   model and batch size.
3. StyleGAN2 (with ADA and lazy R1) step time per image at 32x32 and 64x64, on 1 and 2 workers.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/run.py [--images N] [--steps N]``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from daskgan.config import DataConfig, JobConfig
from daskgan.data import synthetic
from daskgan.data.index import index_images
from daskgan.data.stream import ImageStream
from daskgan.models.dcgan import Discriminator, Generator
from daskgan.run import storage
from daskgan.tools.sandbox import LoopbackS3, environment

RESOLUTION, BATCH, Z_DIM, CHANNELS = 64, 32, 100, 64


def loader_rate(url: str, options: dict, images: int) -> float:
    """Images/s for one pass of ``images`` images through an ImageStream (listing excluded)."""
    index = index_images(url, options)
    config = DataConfig(url=url, storage_options=options, resolution=RESOLUTION, batch_size=BATCH,
                        fetch_batch=128, prefetch_batches=8)
    stream = ImageStream(index, config)
    started = time.perf_counter()
    count = sum(len(next(stream).images) for _ in range(images // BATCH))
    elapsed = time.perf_counter() - started
    stream.close()
    return count / elapsed


def raw_get_rate(url: str, options: dict) -> float:
    """Objects/s of one concurrent ``cat`` of every key, after one untimed pass (a cold moto server is slower)."""
    fs, _ = storage.filesystem(url, options)
    paths = list(index_images(url, options).paths)
    fs.cat(paths)
    started = time.perf_counter()
    fs.cat(paths)
    return len(paths) / (time.perf_counter() - started)


class PlainDcgan:
    """train_gan's DCGAN step (BCE, Adam 2e-4/0.5) in one process, without DDP or Dask."""

    def __init__(self, resolution: int = RESOLUTION, channels: int = CHANNELS, z_dim: int = Z_DIM,
                 device: torch.device | str = "cpu"):
        torch.manual_seed(0)
        self.z_dim, self.device = z_dim, torch.device(device)
        self.G = Generator(resolution, z_dim, channels).to(self.device)
        self.D = Discriminator(resolution, channels).to(self.device)
        self.opt_G = torch.optim.Adam(self.G.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), 2e-4, betas=(0.5, 0.999))

    def step(self, real: torch.Tensor) -> None:
        fake = self.G(torch.randn(len(real), self.z_dim, device=self.device))
        self.opt_D.zero_grad()
        real_logits, fake_logits = self.D(real), self.D(fake.detach())
        (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
         + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))).backward()
        self.opt_D.step()
        self.opt_G.zero_grad()
        self.D.requires_grad_(False)
        logits = self.D(fake)
        F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
        self.D.requires_grad_(True)
        self.opt_G.step()


def plain_step_seconds(steps: int) -> list[float]:
    """The DCGAN step on one in-memory batch, timed step by step."""
    model = PlainDcgan()
    real = torch.rand(BATCH, 3, RESOLUTION, RESOLUTION) * 2 - 1
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.step(real)
        times.append(time.perf_counter() - started)
    return times


def dispatched_step_seconds(url: str, options: dict, run_url: str, steps: int, workers: int = 1,
                            model: dict | None = None, resolution: int = RESOLUTION,
                            extra: dict | None = None) -> list[float]:
    """Per-iteration wall time of train_gan on a LocalCluster of ``workers``, from its own records."""
    from daskgan.cluster import ClusterSpec, LocalSpec, connect
    from daskgan.cluster.driver import run_job
    from daskgan.run.records import load

    job = JobConfig.from_dict({
        "name": "bench", "data": {"url": url, "storage_options": options, "resolution": resolution,
                                  "batch_size": BATCH},
        "model": model or {"z_dim": Z_DIM, "g_channels": CHANNELS, "d_channels": CHANNELS},
        "train": {"iterations": steps},
        "output": {"run_url": run_url, "storage_options": options, "grid_every": 10**6,
                   "checkpoint_every": 10**6, "flush_every": steps},
        **(extra or {}),
    })
    with connect(ClusterSpec(local=LocalSpec(n_workers=workers))) as client:
        run_job(client, job)
    records = load(run_url, options)
    images_per_iteration = BATCH * workers * job.train.accumulate * job.train.d_steps
    return (images_per_iteration / records["images_per_s"]).tolist()


STYLEGAN2 = {"family": "stylegan2", "z_dim": 128, "w_dim": 128, "mapping_layers": 2, "fmaps": 0.0625,
             "channel_max": 128}
BIGGAN = {"family": "biggan", "z_dim": 64, "g_channels": 16, "d_channels": 16, "shared_dim": 32,
          "attention_resolution": 16}


def model_lines(url: str, options: dict, steps: int, model: dict, train: dict, runs: list[tuple[int, int, str]],
                extra: dict | None = None):
    """Step-time lines for (resolution, workers, precision) runs, yielded as measured; the per-worker batch is
    fixed, so 2 workers process twice the images per step."""
    for resolution, workers, precision in runs:
        job = {**(extra or {}), "train": {"iterations": steps, "precision": precision, **train}}
        times = dispatched_step_seconds(url, options, f"s3://bench/{model['family']}-{resolution}-{workers}-"
                                        f"{precision}", steps, workers, model, resolution, job)
        warm = statistics.median(times[len(times) // 5:])
        yield (f"  {resolution}x{resolution}, {workers} worker(s), {precision}, batch {BATCH}/worker: "
               f"{warm * 1000:.0f} ms/step, {warm * 1000 / (BATCH * workers):.1f} ms/image")


def summary(times: list[float]) -> str:
    warm = times[len(times) // 5:]  # drop warm-up steps
    return f"median {statistics.median(warm) * 1000:.0f} ms/step, {BATCH / statistics.median(warm):.0f} img/s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # match a single-threaded Dask worker
    with LoopbackS3() as server, environment(server.environment()), tempfile.TemporaryDirectory() as local:
        options = {"endpoint_url": server.endpoint_url}
        storage.filesystem("s3://bench", options)[0].mkdir("bench")
        s3_url, local_url = "s3://bench/images", f"file://{local}/images"
        synthetic.write_dataset(s3_url, args.images, RESOLUTION, storage_options=options)
        synthetic.write_dataset(local_url, args.images, RESOLUTION)
        print(f"loader, {args.images} PNG images {RESOLUTION}x{RESOLUTION}, batch {BATCH}:")
        raw = raw_get_rate(s3_url, options)
        s3_rate = loader_rate(s3_url, options, args.images)
        disk_rate = loader_rate(local_url, {}, args.images)
        print(f"  raw concurrent GET (fs.cat of all keys): {raw:8.0f} objects/s")
        print(f"  ImageStream from S3 (loopback moto):     {s3_rate:8.0f} images/s ({s3_rate / raw:.0%} of raw GET)")
        print(f"  ImageStream from local disk:             {disk_rate:8.0f} images/s")
        print(f"DCGAN {RESOLUTION}x{RESOLUTION}, {CHANNELS} channels, batch {BATCH}, {args.steps} steps "
              "(first 20% dropped):")
        print(f"  plain single-process loop:               {summary(plain_step_seconds(args.steps))}")
        print(f"  train_gan via dispatch.run, 1 worker:    "
              f"{summary(dispatched_step_seconds(s3_url, options, 's3://bench/run', args.steps))}")
        print(f"StyleGAN2 + ADA + lazy R1 (fmaps 1/16, channel_max 128, w 128), {args.steps} steps "
              "(first 20% dropped):")
        runs = [(32, 1, "fp32"), (32, 2, "fp32"), (64, 1, "fp32"), (64, 2, "fp32"), (64, 1, "bf16")]
        for line in model_lines(s3_url, options, args.steps, STYLEGAN2, {"r1_gamma": 0.05, "beta1": 0.0}, runs,
                                {"augment": {"mode": "ada"}}):
            print(line, flush=True)
        print(f"BigGAN 32x32, conditional (ch 16, attention at 16), hinge, 2 D steps, {args.steps} steps:")
        for line in model_lines(s3_url, options, args.steps, BIGGAN, {"loss": "hinge", "d_steps": 2},
                                [(32, 1, "fp32"), (32, 2, "fp32")]):
            print(line, flush=True)


if __name__ == "__main__":
    main()
