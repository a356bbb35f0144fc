"""The training loop reads nothing back from the device, and joins the other ranks, only where it must (issue #29).

On a GPU every host read of a tensor (``.item()``, ``.tolist()``, ``.cpu()``, ``float``, ``int``, ``bool``) waits
for the queue of kernels to drain, and every collective waits for the other ranks. Wrapping those calls on the CPU
counts what a GPU would pay for: the same calls sync a GPU when the tensor lives there. One in-process rank trains a
few iterations of each family; the counter keeps the calls made from the training, run, lease and rank code
(``daskgan/models``, the networks, and ``daskgan/data``, the CPU data path, are not counted: the networks' own
collectives are part of their forward as DDP's are of the step, and the data path reads host-side bytes). The
augmentation draws and composes its per-image parameters on the CPU by design and reads them there through numpy
(pad sizes, skipping an identity move): no device is involved, and the counter leaves those alone.
Records are flushed, ADA adjusts p, grids are drawn and checkpoints written at iterations 6 and 12 only, so ten
of the twelve iterations are plain ones: they must make no host read at all. (The ranks also settle for the stop
verdict every ``VERDICT_EVERY_S`` seconds of training; the counting runs set that beyond the run, and the last test
shows that cadence on its own.)
"""

from __future__ import annotations

import functools
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import daskgan
from daskgan import train_gan
from daskgan.config import JobConfig
from daskgan.run.records import load
from daskgan.training import loop

pytestmark = pytest.mark.slow

PACKAGE = Path(daskgan.__file__).parent
NOT_COUNTED = (PACKAGE / "models", PACKAGE / "data")
HOST_READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "gather_object", "broadcast",
               "broadcast_object_list", "reduce", "barrier", "all_gather_into_tensor", "reduce_scatter_tensor")
ITERATIONS, SYNC_EVERY = 12, 6  # flush, ADA interval, grid and checkpoint all every SYNC_EVERY iterations

FAMILIES = {
    "dcgan": ({"z_dim": 8, "g_channels": 4, "d_channels": 4}, {}, {}, 16),
    "stylegan2": ({"family": "stylegan2", "z_dim": 8, "w_dim": 8, "mapping_layers": 2, "fmaps": 1 / 256,
                   "channel_max": 16},
                  # path length at NVlabs' interval, each rank keeping its own target
                  {"r1_gamma": 1.0, "r1_interval": 2, "pl_weight": 2.0, "pl_interval": 4, "ema_kimg": 0.01,
                   "accumulate": 2},
                  {"mode": "ada", "p": 0.2, "interval": SYNC_EVERY, "speed_kimg": 1.0}, 16),
    "biggan": ({"family": "biggan", "z_dim": 20, "g_channels": 4, "d_channels": 4, "shared_dim": 8,
                "attention_resolution": 16, "sync_batchnorm": True},
               {"loss": "hinge", "d_steps": 2, "ortho_reg": 1e-4, "ema_kimg": 0.01}, {}, 32),
    # the pairing loss with R1 and R2 every D step, fakes under the reals' labels, ADA on the pairs' signs
    "r3gan": ({"family": "r3gan", "z_dim": 8, "stage_widths": [16, 8, 8], "stage_blocks": [1, 1, 1],
               "group_channels": 4, "conditional": True},
              {"r1_gamma": 1.0, "ema_kimg": 0.01, "accumulate": 2},
              {"mode": "ada", "p": 0.2, "interval": SYNC_EVERY, "speed_kimg": 1.0}, 16),
}


@functools.cache
def counted_file(filename: str) -> str | None:
    """The file's path in the package if its calls are counted, else None (asked for every tensor read torch
    makes, so remembered per file)."""
    caller = Path(filename)
    if not caller.is_relative_to(PACKAGE) or any(caller.is_relative_to(folder) for folder in NOT_COUNTED):
        return None
    return str(caller.relative_to(PACKAGE))


class SyncCounter:
    """Counts host reads and collectives made from daskgan's own code, per training iteration."""

    def __init__(self) -> None:
        self.iteration: int | None = None  # None before the first iteration starts
        self.reads: Counter[int] = Counter()
        self.collectives: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()

    def wrap(self, original, tally: Counter[int], kind: str):
        def counted(*args, **kwargs):
            if self.iteration is not None and (where := counted_file(sys._getframe(1).f_code.co_filename)):
                tally[self.iteration] += 1
                self.kinds[f"{kind} ({where})"] += 1
            return original(*args, **kwargs)
        return counted

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(getattr(torch.Tensor, name), self.reads, name))
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self.wrap(getattr(dist, name), self.collectives, name))
        train_iteration = loop.train_iteration

        def marking(config, gan, stream, noise, iteration):
            self.iteration = iteration  # what the loop does until the next iteration starts is this one's
            return train_iteration(config, gan, stream, noise, iteration)

        monkeypatch.setattr(loop, "train_iteration", marking)


def family_job(tmp_path: Path, family: str) -> JobConfig:
    from daskgan.data import synthetic

    model, train, augment, resolution = FAMILIES[family]
    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=16, resolution=resolution)
    return JobConfig.from_dict({
        "name": family,
        "data": {"url": data, "resolution": resolution, "batch_size": 4},
        "model": model,
        "train": {"iterations": ITERATIONS, "lr_d": 1e-3, **train},
        "augment": augment,
        "output": {"run_url": tmp_path.as_uri() + "/run", "flush_every": SYNC_EVERY, "grid_every": SYNC_EVERY,
                   "grid_images": 4, "checkpoint_every": SYNC_EVERY},
    })


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_iterations_make_no_host_read_and_at_most_one_collective(process_group, dask_client, tmp_path,
                                                                        monkeypatch, family):
    config = family_job(tmp_path, family)
    monkeypatch.setattr(loop, "VERDICT_EVERY_S", math.inf)  # the schedule's syncs only
    counter = SyncCounter()
    counter.install(monkeypatch)
    train_gan(config)
    monkeypatch.undo()
    iterations = range(1, ITERATIONS + 1)
    print(f"\n{family}: host reads per iteration {[counter.reads[i] for i in iterations]}, collectives "
          f"{[counter.collectives[i] for i in iterations]}; by kind {dict(counter.kinds)}")
    plain = [i for i in iterations if i % SYNC_EVERY]
    assert {i: counter.reads[i] for i in plain if counter.reads[i]} == {}, "plain iterations read nothing back"
    assert {i: counter.collectives[i] for i in plain if counter.collectives[i]} == {}, "nor join other ranks"
    assert sum(counter.reads.values()) <= ITERATIONS, "at most one host read per iteration on average"
    assert sum(counter.collectives.values()) <= ITERATIONS, "at most one collective per iteration on average"
    records = load(config.output.run_url)
    assert records["iteration"].tolist() == list(iterations), "still one record per iteration"
    assert records["loss_G"].notna().all() and records["loss_D_real"].notna().all()


def test_the_stop_verdict_is_settled_at_least_every_verdict_every_s(process_group, dask_client, tmp_path,
                                                                      monkeypatch):
    """With no time between verdicts every iteration settles: one all-reduce and one read each, beside the
    schedule's grid and checkpoint."""
    monkeypatch.setattr(loop, "VERDICT_EVERY_S", 0.0)
    counter = SyncCounter()
    counter.install(monkeypatch)
    train_gan(family_job(tmp_path, "dcgan"))
    monkeypatch.undo()
    plain = [i for i in range(1, ITERATIONS + 1) if i % SYNC_EVERY]
    assert [counter.reads[i] for i in plain] == [1] * len(plain)
    assert [counter.collectives[i] for i in plain] == [1] * len(plain)
