"""CPU step time per image: R3GAN beside StyleGAN2 at 32 px with the same widths (issue #28's closing note).

Both families run daskgan's own training iteration (``loop.train_iteration``: D step(s) then a G step, DDP on a
one-rank gloo group, as on a worker) on in-memory batches, so only the arithmetic is timed. Widths: every stage of
both networks has ``--width`` channels (R3GAN: ``stage_widths`` at 4, 8, 16, 32 px, 2 blocks a stage, groups of
16, as its presets; StyleGAN2: ``channel_max`` = width at every resolution, mapping depth 2, as NVlabs' cifar).
Each family's recipe: R3GAN's pairing loss with R1 and R2 at every D step; StyleGAN2 with lazy R1 every 16 D
steps and path length every 4 iterations (NVlabs' intervals, ``--pl 0`` for its cifar config without), so its
lazy passes are averaged over a multiple of 16 iterations. torch runs on one thread, as in a Dask worker; the
machine's load average is printed beside the figures (a shared machine's timings are only comparable within one
run of this script; the CPU time per image, this process's own, is the steadier figure).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/r3gan_step.py [--width 64] [--batch 16] [--iterations 16]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.distributed as dist

from daskgan.config import JobConfig
from daskgan.data.stream import Batch, StreamPosition
from daskgan.tools.sandbox import free_port
from daskgan.training.loop import train_iteration
from daskgan.training.setup import build_gan
from daskgan.training.steps import Noise

RESOLUTION, WARMUP = 32, 2


def family_job(family: str, width: int, batch: int, pl_weight: float) -> JobConfig:
    """One family's job at 32 px with ``width`` channels in every stage of G and D."""
    model = ({"family": "r3gan", "z_dim": 64, "stage_widths": [width] * 4, "stage_blocks": [2] * 4}
             if family == "r3gan" else
             {"family": "stylegan2", "z_dim": 64, "w_dim": width, "mapping_layers": 2, "fmaps": 1.0,
              "channel_max": width})
    train = ({"r1_gamma": 0.05} if family == "r3gan" else
             {"r1_gamma": 0.01, "r1_interval": 16, "pl_weight": pl_weight, "pl_interval": 4, "beta1": 0.0})
    return JobConfig.from_dict({"data": {"url": "memory://unused", "resolution": RESOLUTION, "batch_size": batch},
                                "output": {"run_url": "memory://unused"}, "model": model,
                                "train": {"iterations": 1, **train}})


def in_memory_batches(batch: int) -> itertools.cycle:
    """Random uint8 images (the arithmetic does not depend on what they show)."""
    images = torch.randint(0, 256, (batch, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8)
    return itertools.cycle([Batch(images, torch.zeros(batch, dtype=torch.long), StreamPosition())])


def ms_per_image(config: JobConfig, iterations: int) -> tuple[float, float, int, int]:
    """Wall and CPU (this process's) milliseconds per real image D sees, and G's and D's parameter counts. On
    one thread the CPU time is the arithmetic's own, whatever else the machine runs; the wall time adds the
    waits for a core."""
    gan = build_gan(config, 0, torch.device("cpu"))
    noise = Noise(torch.Generator().manual_seed(0), config.model.z_dim, 0, torch.device("cpu"))
    stream = in_memory_batches(config.data.batch_size)
    for iteration in range(1, WARMUP + 1):
        train_iteration(config, gan, stream, noise, iteration)
    started, cpu_started = time.perf_counter(), time.process_time()
    for iteration in range(WARMUP + 1, WARMUP + iterations + 1):
        train_iteration(config, gan, stream, noise, iteration)
    images = iterations * config.images_per_iteration(1)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    count = [sum(p.numel() for p in network.parameters()) for network in (gan.G, gan.D)]
    return wall * 1000 / images, cpu * 1000 / images, count[0], count[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=16, help="timed, after 2 warm-up (a multiple of 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    rows = [("r3gan", 0.0), ("stylegan2", 2.0), ("stylegan2", 0.0)]
    print(f"32 px, width {args.width}, batch {args.batch}, {args.iterations} iterations, torch threads 1, "
          f"load average {os.getloadavg()[0]:.1f}")
    for family, pl_weight in rows:
        wall, cpu, g_params, d_params = ms_per_image(family_job(family, args.width, args.batch, pl_weight),
                                                     args.iterations)
        name = family if family == "r3gan" else f"{family} (path length {'on' if pl_weight else 'off'})"
        print(f"{name:30s} {wall:8.1f} ms/image wall {cpu:8.1f} ms/image CPU   G {g_params / 1e6:5.2f} M   "
              f"D {d_params / 1e6:5.2f} M parameters", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
