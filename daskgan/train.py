"""The DDP training loop that runs on every worker: ``train_gan(config)``, dispatched by ``daskgan.dispatch.run``.

Each iteration does one discriminator step then one generator step on the rank's batch, with gradients averaged
across ranks by DistributedDataParallel. Rank 0 writes the records, grids, TensorBoard events and checkpoints; a
checkpoint holds everything needed to continue bit-for-bit: weights, optimizer state, iteration, and every rank's
noise-generator state and data-stream position.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import yaml
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from daskgan import checkpoint, results, storage
from daskgan.augment import PIPELINES, AdaController, AugmentPipe
from daskgan.config import JobConfig
from daskgan.data import ImageStream, StreamPosition, index_images
from daskgan.ema import ema_beta, update_ema
from daskgan.losses import LOSSES, GanLoss, r1_penalty
from daskgan.models import build_models

logger = logging.getLogger(__name__)


@dataclass
class Gan:
    """The networks and optimizers of one rank (G and D wrapped in DDP)."""

    G: DistributedDataParallel
    D: DistributedDataParallel
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    augment: AugmentPipe  # applied to every image D sees; p = 0 (mode off) makes it the identity
    ada: AdaController | None  # adapts augment.p in mode ada
    G_ema: nn.Module | None  # moving average of G's weights (train.ema_kimg > 0), used for grids


def train_gan(config: JobConfig, restart: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train on this rank inside an initialised process group; rank 0 returns a summary of the run.

    ``restart`` (from the client's recovery) says why this is a re-dispatch: ``restart`` (count), ``cause`` and
    ``last_iteration`` (the newest record the client saw); rank 0 records it with the first new iteration.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = _device()
    index = _broadcast_from_rank0(lambda: index_images(config.data.url, config.data.storage_options))
    model_id = model_fingerprint(config, len(index.classes))
    gan = _build(config, len(index.classes), device)
    resume_url = _broadcast_from_rank0(lambda: resume_source(config))
    state = checkpoint.load(resume_url, config.output.storage_options) if resume_url else None
    if state is not None:
        checkpoint.check_compatible(state, model_id, resume_url)
        _restore_networks(gan, state)
    start = state["iteration"] if state else 0
    noise, position = _rank_state(config, gan, state, rank, world_size)
    writer = (results.RunWriter(config.output.run_url, config.output.storage_options, start_iteration=start,
                                flush_every=config.output.flush_every) if rank == 0 else None)
    stream = ImageStream(index, config.data, rank=rank, world_size=world_size, seed=config.train.seed, start=position)
    if writer is not None and restart is not None:
        writer.mark_restart(restart["restart"], restart["cause"], start, redone=max(0, restart["last_iteration"] - start))
    if rank == 0:
        save_config(config)
        logger.info("training %s from iteration %d to %d on %d ranks%s", config.model.family, start,
                    config.train.iterations, world_size, f" (resumed from {resume_url})" if resume_url else "")
    try:
        last_checkpoint = _loop(config, gan, stream, noise, writer, start, model_id, device)
    finally:
        stream.close()
        if writer is not None:
            writer.flush()
    if writer is None:
        return None
    table = writer.close()
    return {"run_url": config.output.run_url, "iterations": config.train.iterations, "records": len(table),
            "checkpoint": last_checkpoint, "skipped_images": stream.skipped, "resumed_from": resume_url}


def save_config(config: JobConfig) -> None:
    """Keep the job (credentials redacted) beside its results, so a run directory explains itself."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    storage.write_bytes(storage.join(config.output.run_url, "config.yaml"), text.encode(), config.output.storage_options)


def model_fingerprint(config: JobConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this job's networks."""
    return {**asdict(config.model), "resolution": config.data.resolution, "num_classes": num_classes}


def resume_source(config: JobConfig) -> str | None:
    """The checkpoint to continue from: ``resume: auto`` takes the run's newest, ``never`` none, else the URL."""
    resume = config.output.resume
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.latest(config.output.run_url, config.output.storage_options)
    return resume


def _loop(config: JobConfig, gan: Gan, stream: ImageStream, noise: torch.Generator, writer: results.RunWriter | None,
          start: int, model_id: dict, device: torch.device) -> str | None:
    out = config.output
    world_size = dist.get_world_size()
    global_batch = config.data.batch_size * world_size
    fixed_z = torch.randn(out.grid_images, config.model.z_dim, generator=torch.Generator().manual_seed(config.train.seed))
    loss = LOSSES[config.train.loss]
    last_checkpoint = None
    for iteration in range(start + 1, config.train.iterations + 1):
        started = time.perf_counter()
        batch = next(stream)
        stats = _step(gan, loss, batch.images.to(device), noise, config.model.z_dim, device,
                      r1_weight=_r1_weight(config, iteration))
        position = batch.position
        stats = _mean_across_ranks(stats, device)
        if gan.ada is not None:
            gan.ada.update(iteration, global_batch)
        if gan.G_ema is not None:
            update_ema(gan.G_ema, gan.G.module, ema_beta(global_batch, config.train.ema_kimg,
                                                         iteration * global_batch, config.train.ema_rampup))
        if writer is not None:
            writer.record({"iteration": iteration, "epoch": position.epoch,
                           "kimg": iteration * global_batch / 1000, **stats,
                           "images_per_s": global_batch / (time.perf_counter() - started),
                           "skipped_images": stream.skipped, **_augment_fields(config, gan)})
            if iteration % out.grid_every == 0 or iteration == config.train.iterations:
                sampler = gan.G_ema if gan.G_ema is not None else gan.G.module
                writer.grid(iteration, _samples(sampler, fixed_z.to(device)))
        if iteration % out.checkpoint_every == 0 or iteration == config.train.iterations:
            last_checkpoint = _save_checkpoint(config, gan, noise, position, iteration, model_id) or last_checkpoint
    return last_checkpoint


def _r1_weight(config: JobConfig, iteration: int) -> float:
    """Lazy R1: gamma/2, times the interval to make up for the skipped minibatches, every r1_interval-th step."""
    train = config.train
    return train.r1_gamma / 2 * train.r1_interval if train.r1_gamma and iteration % train.r1_interval == 0 else 0.0


def _step(gan: Gan, loss: GanLoss, real: torch.Tensor, noise: torch.Generator, z_dim: int,
          device: torch.device, r1_weight: float = 0.0) -> dict[str, float]:
    """One D step (with R1 on the reals when ``r1_weight`` > 0) then one G step, sharing the same fakes."""
    z = torch.randn(real.shape[0], z_dim, generator=noise).to(device)
    fake = gan.G(z)
    gan.opt_D.zero_grad(set_to_none=True)
    with gan.D.no_sync():  # accumulate the real-batch gradient locally; the fake backward all-reduces both
        real = real.detach().requires_grad_(r1_weight > 0)  # R1 differentiates through the augmentation
        real_logits = gan.D(gan.augment(real))
        loss_real = loss.d_real(real_logits)
        r1 = r1_penalty(real, real_logits) if r1_weight > 0 else None
        (loss_real if r1 is None else loss_real + r1 * r1_weight).backward()
    if gan.ada is not None:
        gan.ada.observe(real_logits)
    fake_logits = gan.D(gan.augment(fake.detach()))
    loss_fake = loss.d_fake(fake_logits)
    loss_fake.backward()
    gan.opt_D.step()
    # G step through the bare D: its gradients are not needed, so D stays out of DDP's reducer here.
    gan.D.module.requires_grad_(False)
    try:
        loss_G = loss.g(gan.D.module(gan.augment(fake)))
        gan.opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        gan.opt_G.step()
    finally:
        gan.D.module.requires_grad_(True)
    stats = {"loss_G": loss_G.item(), "loss_D_real": loss_real.item(), "loss_D_fake": loss_fake.item(),
             "D_x": torch.sigmoid(real_logits).mean().item(), "D_G_z": torch.sigmoid(fake_logits).mean().item()}
    return stats if r1 is None else {**stats, "r1_penalty": r1.item()}


def _augment_fields(config: JobConfig, gan: Gan) -> dict[str, float]:
    """``ada_p`` (and ``ada_rt`` once measured) for the records, when augmentation is on."""
    if config.augment.mode == "off":
        return {}
    rt = gan.ada.rt if gan.ada is not None else None
    return {"ada_p": float(gan.augment.p), **({"ada_rt": rt} if rt is not None else {})}


def _mean_across_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each statistic over the ranks (every rank computes the same keys in the same step)."""
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, (values / dist.get_world_size()).tolist()))


@torch.no_grad()
def _samples(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Fixed-z samples in eval mode, leaving the generator's mode and the training random streams untouched
    (a grid drawn at one iteration and not another must not change what training does next)."""
    was_training = generator.training
    generator.eval()
    devices = [z.device] if z.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            return generator(z).cpu()
    finally:
        generator.train(was_training)


def _save_checkpoint(config: JobConfig, gan: Gan, noise: torch.Generator, position: StreamPosition, iteration: int,
                     model_id: dict) -> str | None:
    """Gather every rank's generator state and stream position, then rank 0 writes one checkpoint."""
    rank_state = {"noise": noise.get_state(), "torch_rng": torch.get_rng_state(), "epoch": position.epoch,
                  "offset": position.offset, "ada": gan.ada.state_dict() if gan.ada is not None else None}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rank_state, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    state = {"format": 1, "iteration": iteration, "model": model_id, "config": config.to_dict(),
             "G": gan.G.module.state_dict(), "D": gan.D.module.state_dict(), "augment_p": float(gan.augment.p),
             **({"G_ema": gan.G_ema.state_dict()} if gan.G_ema is not None else {}),
             "opt_G": gan.opt_G.state_dict(), "opt_D": gan.opt_D.state_dict(), "ranks": gathered}
    return checkpoint.save(config.output.run_url, state, iteration, config.output.keep_checkpoints,
                           config.output.storage_options)


def _build(config: JobConfig, num_classes: int, device: torch.device) -> Gan:
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    G, D = (m.to(device) for m in build_models(config.model, config.data.resolution, num_classes))
    device_ids = [device.index] if device.type == "cuda" else None
    betas = (config.train.beta1, config.train.beta2)
    augment = AugmentPipe(PIPELINES[config.augment.pipeline]).to(device)
    augment.p.fill_(config.augment.p if config.augment.mode != "off" else 0.0)
    ada = (AdaController(augment, config.augment.target, config.augment.interval, config.augment.speed_kimg)
           if config.augment.mode == "ada" else None)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if config.train.ema_kimg > 0 else None
    return Gan(DistributedDataParallel(G, device_ids=device_ids), DistributedDataParallel(D, device_ids=device_ids),
               torch.optim.Adam(G.parameters(), lr=config.train.lr_g, betas=betas),
               torch.optim.Adam(D.parameters(), lr=config.train.lr_d, betas=betas), augment, ada, G_ema)


def _restore_networks(gan: Gan, state: dict) -> None:
    gan.G.module.load_state_dict(state["G"])
    gan.D.module.load_state_dict(state["D"])
    gan.opt_G.load_state_dict(state["opt_G"])
    gan.opt_D.load_state_dict(state["opt_D"])
    if gan.G_ema is not None:  # a checkpoint without an average starts it from the current weights
        gan.G_ema.load_state_dict(state.get("G_ema", state["G"]))
    if gan.ada is not None and "augment_p" in state:  # ADA continues from the saved p; a fixed p comes from the job
        gan.augment.p.fill_(state["augment_p"])


def _rank_state(config: JobConfig, gan: Gan, state: dict | None, rank: int,
                world_size: int) -> tuple[torch.Generator, StreamPosition]:
    """This rank's random state (z generator, torch's global RNG for augmentation, the ADA statistic) and data
    position: restored from the checkpoint, or fresh."""
    noise = torch.Generator()
    saved = state["ranks"] if state else None
    if saved and len(saved) == world_size:
        noise.set_state(saved[rank]["noise"])
        torch.set_rng_state(saved[rank]["torch_rng"])
        if gan.ada is not None and saved[rank]["ada"] is not None:
            gan.ada.load_state_dict(saved[rank]["ada"])
        return noise, StreamPosition(saved[rank]["epoch"], saved[rank]["offset"])
    seed = config.train.seed * 1_000_003 + rank + (state["iteration"] if state else 0)
    noise.manual_seed(seed)
    torch.manual_seed(seed + 1)  # ranks draw different augmentations
    if saved:  # another world size: positions do not map onto the new shards, so begin the next epoch
        logger.warning("checkpoint was written by %d ranks, now %d: data continues at the next epoch",
                       len(saved), world_size)
        return noise, StreamPosition(max(r["epoch"] for r in saved) + 1, 0)
    return noise, StreamPosition()


def _broadcast_from_rank0(compute):
    """Run ``compute`` on rank 0 only (a listing, a pointer read) and hand its result to every rank."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
