"""Every random stream of a run has a seed of its own: no two streams (a rank's noise or augmentation at a
restart, an epoch's permutation, a shard window, the grid, the initial weights) start from the same seed."""

from __future__ import annotations

import pytest
import torch

from daskgan.config import JobConfig
from daskgan.data.index import shard_indices
from daskgan.data.shard_epochs import epoch_windows
from daskgan.seeding import stream_seed
from daskgan.training import loop, setup
from daskgan.training import state as training_state

RANKS, RESTARTS, EPOCHS, SEED = range(8), (0, 1, 2, 7, 250), range(10), 5
SHARD_IMAGES = tuple(tuple(range(shard * 3, shard * 3 + 3)) for shard in range(16))  # 16 shards of 3 images


class ModelsBuilt(Exception):
    """Raised in place of building the networks: the test needs only the seed set before them."""


@pytest.fixture
def seeds(monkeypatch) -> list[int]:
    """Every seed given to torch (its global RNG or a Generator) while the fixture is on, in order."""
    drawn = []
    seed_global = torch.manual_seed

    class RecordingGenerator(torch.Generator):
        def manual_seed(self, seed):
            drawn.append(seed)
            return super().manual_seed(seed)

    def record_global(seed):
        drawn.append(seed)
        return seed_global(seed)

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    monkeypatch.setattr(torch, "manual_seed", record_global)
    return drawn


def job() -> JobConfig:
    return JobConfig.from_dict({"name": "t", "data": {"url": "memory://d"}, "output": {"run_url": "memory://r"},
                                "train": {"seed": SEED}})


def streams_of_a_run(seeds: list[int], monkeypatch) -> int:
    """Seed every stream of a run through the code that does it; returns how many distinct streams there are."""
    config = job()
    streams = 0
    for rank in RANKS:
        for iteration in RESTARTS:  # a restart on another world size seeds noise and augmentation afresh
            restart = {"iteration": iteration, "ranks": [{"epoch": 0}] * 3} if iteration else None
            training_state.restore_rank(config, None, restart, rank, len(RANKS))
            streams += 2
    loop.grid_latents(config, 0, torch.device("cpu"))

    def models_built(*args, **kwargs):
        raise ModelsBuilt

    monkeypatch.setattr(setup, "build_models", models_built)
    with pytest.raises(ModelsBuilt):
        setup.build_gan(config, 0, torch.device("cpu"))
    streams += 2
    for epoch in EPOCHS:
        epoch_seeds = set()
        for rank in RANKS:
            before = len(seeds)
            shard_indices(100, rank, len(RANKS), epoch, SEED)  # the epoch's image permutation, the same on all ranks
            epoch_seeds.add(tuple(seeds[before:]))
            windows = epoch_windows(SHARD_IMAGES, rank, len(RANKS), epoch, SEED, window=1)
            streams += len(windows)  # one shuffle per window; the shard permutation is the epoch's, below
        assert len(epoch_seeds) == 1, "every rank permutes the epoch alike"
        streams += 2  # the epoch's image permutation and its shard permutation
    return streams


def test_no_two_streams_of_a_run_share_a_seed(seeds, monkeypatch):
    streams = streams_of_a_run(seeds, monkeypatch)
    assert len(set(seeds)) == streams, f"{streams - len(set(seeds))} streams share a seed with another"


def test_runs_of_other_seeds_draw_other_streams():
    assert stream_seed(1, "noise", 0, 0) != stream_seed(2, "noise", 0, 0)
    assert stream_seed(1, "window", 1, 23) != stream_seed(1, "window", 12, 3), "indices stay apart"
