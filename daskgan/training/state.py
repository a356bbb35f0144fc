"""The training state a checkpoint holds, captured and restored side by side, so its format is spelled once.

A checkpoint continues a run bit-for-bit: the networks, their average and optimizers, the augmentation probability
and path-length target (rank 0's, the same on every rank), and each rank's own random streams (z generator, torch's
global RNG that augmentation draws from, the ADA statistic) and data-stream position. ``daskgan.run.checkpoint``
stores the dict this module makes; this module decides what goes in it and how a rank takes it back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from daskgan.config import JobConfig
from daskgan.data.stream import StreamPosition
from daskgan.run.checkpoint import FORMAT
from daskgan.seeding import stream_seed
from daskgan.training.steps import Gan, Noise

logger = logging.getLogger(__name__)


def capture(config: JobConfig, gan: Gan, noise: Noise, position: StreamPosition, iteration: int,
            model_desc: dict) -> dict[str, Any] | None:
    """Gather every rank's random state and data position; rank 0 gets the whole training state, the others None.
    Every rank must call it (a collective)."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_rank_capture(gan, noise, position), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return {"format": FORMAT, "iteration": iteration, "model": model_desc, "config": config.to_dict(),
            "G": gan.G.module.state_dict(), "D": gan.D.module.state_dict(), "augment_p": gan.augment.probability,
            "pl_target": float(gan.pl_target),
            **({"G_ema": gan.G_ema.state_dict()} if gan.G_ema is not None else {}),
            "opt_G": gan.opt_G.state_dict(), "opt_D": gan.opt_D.state_dict(), "ranks": gathered}


def _rank_capture(gan: Gan, noise: Noise, position: StreamPosition) -> dict[str, Any]:
    return {"noise": noise.generator.get_state(), **_global_random_state(noise.device), "epoch": position.epoch,
            "offset": position.offset, "ada": gan.ada.state_dict() if gan.ada is not None else None,
            "pl_target": float(gan.pl_target)}


def restore_networks(gan: Gan, state: dict) -> None:
    """The shared part: weights, average, optimizers, rank 0's path-length target (each rank takes its own in
    ``restore_rank`` where the checkpoint has it) and ADA's p (a fixed p comes from the job)."""
    gan.G.module.load_state_dict(state["G"])
    gan.D.module.load_state_dict(state["D"])
    load_optimizer(gan.opt_G, state["opt_G"])
    load_optimizer(gan.opt_D, state["opt_D"])
    if gan.G_ema is not None:  # a checkpoint without an average starts it from the current weights
        gan.G_ema.load_state_dict(state.get("G_ema", state["G"]))
    gan.pl_target = torch.tensor(state.get("pl_target", 0.0))
    if gan.ada is not None and "augment_p" in state:
        gan.augment.set_probability(state["augment_p"])


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The saved moments and step counts, under the job's own hyperparameters: a resume with a changed lr (or
    betas, eps) uses the job's, not the checkpoint's (``load_state_dict`` alone would restore the old ones)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def restore_rank(config: JobConfig, gan: Gan | None, state: dict | None, rank: int,
                 world_size: int) -> tuple[torch.Generator, StreamPosition]:
    """This rank's random state (z generator, torch's global RNG, the ADA statistic) and data position: restored
    from the checkpoint written by as many ranks, else seeded afresh for the iteration (another world size: the
    data goes on at the next epoch, since positions do not map onto the new shards)."""
    noise = torch.Generator()
    saved = state["ranks"] if state else None
    if saved and len(saved) == world_size:
        noise.set_state(saved[rank]["noise"])
        _restore_global_random_state(saved[rank])
        if gan.ada is not None and saved[rank]["ada"] is not None:
            gan.ada.load_state_dict(saved[rank]["ada"])
        if "pl_target" in saved[rank]:  # each rank's own path-length target (rank 0's came with the networks)
            gan.pl_target = torch.tensor(saved[rank]["pl_target"])
        return noise, StreamPosition(saved[rank]["epoch"], saved[rank]["offset"])
    iteration = state["iteration"] if state else 0
    noise.manual_seed(stream_seed(config.train.seed, "noise", rank, iteration))
    torch.manual_seed(stream_seed(config.train.seed, "augment", rank, iteration))  # each rank its augmentations
    if saved:
        logger.warning("checkpoint was written by %d ranks, now %d: data continues at the next epoch",
                       len(saved), world_size)
        return noise, StreamPosition(max(r["epoch"] for r in saved) + 1, 0)
    return noise, StreamPosition()


def _global_random_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's global random streams on this rank: the CPU one (augmentation draws its parameters from it) and, on
    a GPU, the device's (path length's directions and dropout draw from the stream of the device they run on)."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_global_random_state(saved: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda_rng"], torch.cuda.current_device())
