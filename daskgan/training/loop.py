"""The DDP training loop that runs on every worker: ``train_gan(config)``, dispatched by ``daskgan.dispatch.run``.

Each iteration does ``d_steps`` discriminator steps then one generator step (``daskgan.steps``), with gradients
averaged across ranks by DistributedDataParallel. Rank 0 writes the records, grids, TensorBoard events and
checkpoints; a checkpoint holds everything needed to continue bit-for-bit: weights, optimizer state, iteration, and
every rank's noise-generator state and data-stream position.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
from distributed import get_worker

from daskgan.config import JobConfig
from daskgan.config.families import family_of
from daskgan.config.schema import HIGHER_IS_BETTER, METRICS
from daskgan.data.decode import GONE_OR_UNREADABLE, decode_fetched
from daskgan.data.index import ImageIndex, examples, fetch_images
from daskgan.data.manifest import training_index
from daskgan.data.stream import ImageStream, StreamPosition
from daskgan.errors import ConfigError, FailureKind, StorageUnavailable, failure_kind, first_line
from daskgan.lease import DriverWatch
from daskgan.models import conditioning_classes, model_description
from daskgan.preemption import NoticeWatch
from daskgan.ranks import from_rank0
from daskgan.run import checkpoint, layout, records, storage
from daskgan.run.images import grid_columns
from daskgan.run.storage import StorageOptions
from daskgan.seeding import stream_seed
from daskgan.training import schedules
from daskgan.training import state as training_state
from daskgan.training.ema import ema_beta_at, update_ema
from daskgan.training.evaluation import Evaluator, samples
from daskgan.training.losses import LOSSES
from daskgan.training.setup import build_gan, initialise_from
from daskgan.training.steps import (
    Gan,
    Noise,
    discriminator_step,
    fake_label_weights,
    generator_step,
    pairing_discriminator_step,
    pairing_generator_step,
    path_length_step,
    r1_step,
)
from daskgan.training.tally import Settled, Tally

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

PL_BATCH_SHRINK = 2  # the path-length pass runs on this fraction of the batch (NVlabs' pl_batch_shrink)


def train_gan(config: JobConfig, restart: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train on this rank inside an initialised process group; rank 0 returns a summary of the run.

    ``restart`` (from the client's recovery) says why this is a re-dispatch: ``restart`` (count), ``cause`` and
    ``last_iteration`` (the newest record the client saw); rank 0 records it with the first new iteration.
    A failure of rank 0's own (not a lost peer or scheduler) is written to the run directory's ``state.json`` as
    ``failed``.
    """
    resume = from_rank0(lambda: resume_source(config, restarting=restart is not None))  # before anything is written
    index = training_index(config.data, config.output)
    from_rank0(lambda: save_config(config))  # the first write: a missing bucket stops every rank here
    try:
        return _train(config, index, restart, resume)
    except Exception as error:
        if dist.get_rank() == 0 and failure_kind(error) is FailureKind.RUN:
            _record_failure(config, error)
        raise


def _record_failure(config: JobConfig, error: Exception) -> None:
    """``state.json``: failed, at the newest record, with the error's first line (``daskgan status`` shows it)."""
    out = config.output
    try:
        table = records.load(out.run_url, out.storage_options)
        iteration = int(table["iteration"].max()) if len(table) else 0
        layout.write_state(out.run_url, layout.RunState("failed", iteration, error=first_line(error)),
                           out.storage_options)
    except Exception as unrecorded:  # the run's own error matters more than this note
        logger.warning("could not record the failure in %s: %s", out.run_url, unrecorded)


def _train(config: JobConfig, index: ImageIndex, restart: dict[str, Any] | None,
           resume: Resume) -> dict[str, Any] | None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rank0 = rank == 0  # writes the records, grids and checkpoints; watches the driver and the workers' notices
    device = _device()
    model_desc = job_model_description(config, len(index.classes))
    gan = build_gan(config, conditioning_classes(config.model, len(index.classes)), device)
    resume_url = resume.url
    state = checkpoint.load(resume_url, config.output.storage_options) if resume_url else None
    if state is not None:
        checkpoint.check_compatible(state, model_desc, resume_url)
        training_state.restore_networks(gan, state)
    if state is None and config.train.init_from:
        initialise_from(gan, config)
    start = state["iteration"] if state else 0
    if state is not None:  # checkpoints after the one resumed from belong to an abandoned branch
        from_rank0(lambda: checkpoint.rewind(config.output.run_url, start, config.output.storage_options))
    generator, position = training_state.restore_rank(config, gan, state, rank, world_size)
    family = family_of(config.model)
    noise = Noise(generator, config.model.z_dim, gan.num_classes, device,
                  fake_label_weights(family, index.labels, gan.num_classes), family.fake_labels_from_reals)
    writer = (records.RunWriter(config.output.run_url, config.output.storage_options, start_iteration=start,
                                flush_every=config.output.flush_every) if rank0 else None)
    stream = ImageStream(index, config.data, rank=rank, world_size=world_size, seed=config.train.seed, start=position,
                         on_gpu=device.type == "cuda")
    if rank0 and restart is not None:
        writer.mark_restart(restart["restart"], restart["cause"], start,
                            redone=max(0, restart["last_iteration"] - start),
                            notice_to_checkpoint_s=restart.get("notice_to_checkpoint_s"))
    if rank0 and resume.passed_over:
        writer.annotate_next(unreadable_checkpoints="; ".join(resume.passed_over))
    if rank0:
        logger.info("training %s from iteration %d to %d on %d ranks%s", config.model.family, start,
                    config.train.iterations, world_size, f" (resumed from {resume_url})" if resume_url else "")
    workers = _run_workers()
    notices = NoticeWatch(workers, config.output.run_url) if rank0 else None
    try:
        end = _loop(config, gan, stream, noise, writer, start, model_desc, notices)
    finally:
        if notices is not None:
            notices.close()
        stream.close()
        if rank0:
            writer.flush()
    if not rank0:
        return None
    table = writer.close()
    return {"run_url": config.output.run_url, "iterations": config.train.iterations, "records": len(table),
            "checkpoint": end.checkpoint, "skipped_images": _last_skipped(table), "resumed_from": resume_url,
            "evaluations": evaluations(table), "stopped": end.stopped, "preempted": end.preempted,
            "last_iteration": int(table["iteration"].max()) if len(table) else start}


def _last_skipped(table: pd.DataFrame) -> int:
    """The images every rank together skipped, as the last record says."""
    return int(table["skipped_images"].iloc[-1]) if len(table) and "skipped_images" in table else 0


def evaluations(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The run's FID/KID evaluations in order: iteration, extractor and each score (empty without metrics)."""
    kinds = [kind for kind in METRICS if kind in table.columns]
    if not kinds:
        return []
    rows = table.dropna(subset=kinds, how="all")
    return [{"iteration": int(row["iteration"]), "extractor": row.get("metrics_extractor"),
             **{kind: float(row[kind]) for kind in kinds if row[kind] == row[kind]}} for _, row in rows.iterrows()]


def save_config(config: JobConfig) -> None:
    """Keep the job (credentials redacted) beside its results, so a run directory explains itself."""
    storage.write_bytes(layout.config_url(config.output.run_url), config.to_yaml().encode(),
                        config.output.storage_options)


def job_model_description(config: JobConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this job's networks."""
    return model_description(config.model, config.data.resolution, num_classes, config.data.channels)


class Resume(NamedTuple):
    """Where a run continues from: a checkpoint URL (None: iteration 0) and the newer checkpoints of the run that
    were passed over because they cannot be read (each with why)."""

    url: str | None
    passed_over: Sequence[str] = ()


def resume_source(config: JobConfig, restarting: bool = False) -> Resume:
    """The checkpoint to continue from: ``resume: auto`` takes the run's newest readable one, ``never`` none,
    else the URL (one of this run's own: the job's validation refuses another's; the run directory or its
    ``latest.json`` mean its newest, see ``checkpoint.resolve``).

    A recovery restart continues from the run's newest checkpoint whatever ``resume`` says, once the run has
    written one (before that, it starts as the job asked). ``never`` on a run directory that already holds records
    or checkpoints is refused: starting at iteration 0 would trim those records and delete those checkpoints.
    Rank 0 decides, so the client never needs storage."""
    out = config.output
    if out.resume == "auto" or restarting:
        newest = Resume(*checkpoint.newest_readable(out.run_url, out.storage_options))
        if newest.url is not None or out.resume == "auto":
            return newest
    if out.resume != "never":
        return Resume(checkpoint.resolve(out.resume, out.storage_options))
    if not restarting:  # a restart's records are this run's own
        _refuse_a_used_run_directory(out.run_url, out.storage_options)
    return Resume(None)


def _refuse_a_used_run_directory(run_url: str, storage_options: StorageOptions) -> None:
    """``resume: never`` is for a new run: refuse a run directory that another run has written to."""
    held = [what for what, present in (("records", records.has_records(run_url, storage_options)),
                                       ("checkpoints", checkpoint.list_checkpoints(run_url, storage_options)))
            if present]
    if held:
        raise ConfigError(f"output.resume: never, but {run_url} already holds the {' and '.join(held)} of a run, "
                          f"which starting at iteration 0 would delete: give this run a new output.run_url, or set "
                          f"output.resume: auto to continue that run")


class LoopEnd(NamedTuple):
    """How the iterations ended: the last checkpoint; why they stopped early (None: they did not; ``checkpoint`` or
    ``now`` after a stop request or the driver's silence, ``next_checkpoint`` when the driver asked in order to
    re-dispatch on more workers, ``preempted`` after a worker's notice); for a preemption, the workers given notice
    and the seconds from the notice to the durable checkpoint."""

    checkpoint: str | None
    stopped: str | None = None
    preempted: dict[str, Any] | None = None


def _loop(config: JobConfig, gan: Gan, stream: ImageStream, noise: Noise, writer: records.RunWriter | None,
          start: int, model_desc: dict, notices: NoticeWatch | None) -> LoopEnd:
    """Iterations from ``start`` on (see ``LoopEnd``); rank 0 watches the workers' notices (``notices``)."""
    out, train = config.output, config.train
    global_batch = config.data.batch_size * dist.get_world_size() * train.accumulate  # images per optimiser step
    reals = config.images_per_iteration(dist.get_world_size())  # what D sees per iteration: the kimg unit
    grid_z, grid_labels = grid_latents(config, gan.num_classes, noise.device)
    rank0 = dist.get_rank() == 0  # alone holds a writer
    if rank0 and start == 0:
        writer.grid(0, real_examples(config, stream.index, grid_labels), name="reals")
    evaluator = Evaluator(config, stream.index, noise.device) if config.metrics.every else None
    watch = DriverWatch(out.run_url, config.recovery.driver_timeout_s) if rank0 else None
    last_checkpoint = None
    tally, unrecorded = Tally(), []  # iterations since the last sync: statistics on the device, rank 0's fields
    cadence = _VerdictCadence(start)
    for iteration in range(start + 1, train.iterations + 1):
        started = time.perf_counter()
        scheduled_values = schedules.apply_schedules(config, gan, iteration, reals)
        stats, position = train_iteration(config, gan, stream, noise, iteration)
        tally.keep(stats, stream.skipped, lambda: stream.unreadable)
        if gan.G_ema is not None:
            update_ema(gan.G_ema, gan.G.module,
                       ema_beta_at(train, iteration, global_batch,
                                   schedules.scheduled(config, "ema_kimg", iteration, reals)),
                       average_buffers=family_of(config.model).ema_averages_buffers)
        last = iteration == train.iterations
        settled = None
        if sync_due(config, iteration) or cadence.due(iteration):
            settled = tally.settle([_verdict(watch, notices), cadence.proposal(iteration) if rank0 else 0],
                                   _ada_statistic(gan, iteration))
            cadence.agree(iteration, int(settled.shared[1]))
        if settled is not None and settled.ada is not None:
            gan.ada.adjust(*settled.ada, reals)
        step_seconds = time.perf_counter() - started  # before any evaluation or grid
        sampler = gan.G_ema if gan.G_ema is not None else gan.G.module
        scores = (evaluator.evaluate(sampler, gan.num_classes, iteration)
                  if evaluator is not None and (iteration % config.metrics.every == 0 or last) else {})
        if rank0:
            unrecorded.append(_Unrecorded({"iteration": iteration, "epoch": position.epoch,
                                           "world_size": dist.get_world_size(), "kimg": iteration * reals / 1000},
                                          reals / step_seconds,
                                          {**scheduled_values, **_augment_fields(config, gan), **scores}))
            if settled is not None:
                _record(writer, unrecorded, settled)
                unrecorded = []
            if iteration % out.grid_every == 0 or last:
                writer.grid(iteration, samples(sampler, grid_z, grid_labels))
        stop = STOPS[int(settled.shared[0])] if settled is not None else "continue"
        scheduled = iteration % out.checkpoint_every == 0 or last
        if stop == "next_checkpoint" and (last or not scheduled):
            stop = "continue"
        if scheduled or (scores and out.keep_best) or stop == "checkpoint":
            saving = time.perf_counter()
            last_checkpoint = _save_checkpoint(config, gan, noise, position, iteration, model_desc,
                                               scores.get(config.ranking_metric), writer) or last_checkpoint
            if rank0:  # how long a preempted worker's grace must be (cluster.driver warns)
                writer.annotate_next(checkpoint_s=round(time.perf_counter() - saving, 3))
        if stop != "continue" and not last:  # at the last iteration the run is done: nothing is left to redo
            return _stopped_early(config, stop, iteration, last_checkpoint, notices)
    return LoopEnd(last_checkpoint)


def _stopped_early(config: JobConfig, stop: str, iteration: int, last_checkpoint: str | None,
                   notices: NoticeWatch | None) -> LoopEnd:
    """Why the ranks stop after ``iteration``; a run stopped for good says so in ``state.json``."""
    if notices is not None and notices.noticed:
        logger.warning("stopping at iteration %d: checkpoint durable %.1f s after the notice", iteration,
                       notices.seconds_since_notice())
        return LoopEnd(last_checkpoint, "preempted", {"workers": sorted(notices.noticed), "iteration": iteration,
                                                      "notice_to_checkpoint_s": notices.seconds_since_notice()})
    if stop == "next_checkpoint":  # the driver re-dispatches on more workers: the run goes on
        return LoopEnd(last_checkpoint, stop)
    if dist.get_rank() == 0:  # says so once
        logger.warning("stopping at iteration %d (%s)", iteration, stop)
        layout.write_state(config.output.run_url, layout.RunState("stopped", iteration, checkpoint=last_checkpoint),
                           config.output.storage_options)
    return LoopEnd(last_checkpoint, stop)


STOPS = ("continue", "next_checkpoint", "checkpoint", "now")  # the ranks' choices after an iteration, by severity


def sync_due(config: JobConfig, iteration: int) -> bool:
    """Whether the ranks settle what they kept after ``iteration`` (``daskgan.training.tally``): where records are
    flushed, a grid, metric or checkpoint is due, ADA adjusts p, and at the end; no other iteration but the stop
    verdict's (below) reads anything back from the device or joins the other ranks beyond DDP's own all-reduces.

    The stop verdict (rank 0's view of the driver's lease, stop requests and workers' preemption notices) rides on
    this one all-reduce rather than on one of its own every iteration; between these syncs the ranks settle for it
    alone about every ``VERDICT_EVERY_S`` seconds (``_VerdictCadence``), so they learn it within seconds however
    long ``output.flush_every`` iterations take."""
    out, ada = config.output, config.augment.interval if config.augment.mode == "ada" else 0
    every = (out.flush_every, out.grid_every, out.checkpoint_every, config.metrics.every, ada)
    return iteration == config.train.iterations or any(n and iteration % n == 0 for n in every)


VERDICT_EVERY_S = 5.0  # the ranks learn rank 0's stop verdict at least this often; inf: only at scheduled syncs


class _VerdictCadence:
    """When the ranks settle between the schedule's syncs, for the stop verdict: about every ``VERDICT_EVERY_S``
    seconds, in iterations at the pace rank 0 timed since the last sync (its count travels in the sync's all-reduce,
    so every rank agrees without a collective of its own); the first after the first iteration. A preemption
    notice's grace is a minute or two: a verdict a few seconds late costs nothing, one a flush interval late (100
    iterations of a large model) could cost the checkpoint."""

    def __init__(self, start: int):
        self._next = start + 1 if math.isfinite(VERDICT_EVERY_S) else math.inf
        self._since = (start, time.perf_counter())

    def due(self, iteration: int) -> bool:
        return iteration >= self._next

    def proposal(self, iteration: int) -> int:
        """Rank 0's count of iterations until the next verdict: as many as fit in ``VERDICT_EVERY_S``."""
        first, started = self._since
        seconds_each = max((time.perf_counter() - started) / max(iteration - first, 1), 1e-6)
        return max(1, int(min(VERDICT_EVERY_S / seconds_each, 1e9)))

    def agree(self, iteration: int, count: int) -> None:
        """Every rank: the next verdict is due ``count`` iterations after ``iteration``."""
        self._next = iteration + count if math.isfinite(VERDICT_EVERY_S) else math.inf
        self._since = (iteration, time.perf_counter())


def _verdict(watch: DriverWatch | None, notices: NoticeWatch | None) -> int:
    """Rank 0's verdict on the driver, stop requests and workers' notices as an index into ``STOPS`` (0 on the
    other ranks, so the ranks' sum is rank 0's verdict)."""
    verdict = STOPS.index(watch.check()) if watch is not None else 0
    if notices is not None and notices.check():
        verdict = max(verdict, STOPS.index("checkpoint"))
    return verdict


def _ada_statistic(gan: Gan, iteration: int) -> torch.Tensor | None:
    """ADA's statistic when p is adjusted after ``iteration``, to be summed over the ranks."""
    return gan.ada.statistic() if gan.ada is not None and gan.ada.due(iteration) else None


class _Unrecorded(NamedTuple):
    """Rank 0's fields of an iteration whose statistics are not settled yet, around where they go in its record."""

    head: dict[str, Any]
    images_per_s: float
    tail: dict[str, Any]


def _record(writer: records.RunWriter, unrecorded: list[_Unrecorded], settled: Settled) -> None:
    """One record per iteration since the last sync, with its settled statistics and skipped images."""
    for row, stats, skipped in zip(unrecorded, settled.stats, settled.skipped):
        writer.record({**row.head, **stats, "images_per_s": row.images_per_s, "skipped_images": skipped, **row.tail})


def _run_workers() -> list[str]:
    """Every rank's Dask worker address, gathered once (rank 0 watches their notices); none outside Dask."""
    try:
        own = get_worker().address
    except ValueError:
        own = None
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return [address for address in gathered if address]


def train_iteration(config: JobConfig, gan: Gan, stream: ImageStream, noise: Noise,
                     iteration: int) -> tuple[dict[str, torch.Tensor], StreamPosition]:
    """``d_steps`` D steps and one G step; returns this rank's statistics (0-dim device tensors, averaged over the
    ranks when they are settled: ``daskgan.training.tally``) and the data position."""
    gamma = schedules.scheduled(config, "r1_gamma", iteration, config.images_per_iteration(dist.get_world_size()))
    if family_of(config.model).pairing_loss:
        return pairing_iteration(config, gan, stream, noise, gamma)
    train, loss = config.train, LOSSES[config.train.loss]
    separate = family_of(config.model).separate_regularisation
    for d_step in range(train.d_steps):
        batches = [next(stream) for _ in range(train.accumulate)]
        r1_weight = _lazy_weight(gamma / 2, train.r1_interval, (iteration - 1) * train.d_steps + d_step + 1)
        stats = discriminator_step(gan, loss, batches, noise, 0.0 if separate else r1_weight)
        if separate and r1_weight:
            stats.update(r1_step(gan, batches, noise.device, r1_weight))
    g_micro_batches = train.g_accumulate or train.accumulate
    stats.update(generator_step(gan, loss, g_micro_batches, config.data.batch_size, noise, ortho=train.ortho_reg))
    pl_weight = _lazy_weight(train.pl_weight, train.pl_interval, iteration)
    if pl_weight:
        stats.update(path_length_step(gan, g_micro_batches, max(1, config.data.batch_size // PL_BATCH_SHRINK), noise,
                                      pl_weight, train.pl_decay))
    return stats, batches[-1].position


def pairing_iteration(config: JobConfig, gan: Gan, stream: ImageStream, noise: Noise,
                      gamma: float) -> tuple[dict[str, torch.Tensor], StreamPosition]:
    """R3GAN's iteration: ``d_steps`` D steps on the pairing loss with R1 and R2 at each (weight ``gamma``, the
    iteration's ``train.r1_gamma``), then one G step whose fakes are paired with reals of their own (as R3GAN's
    loop fetches a second batch for G)."""
    train = config.train
    for _ in range(train.d_steps):
        stats = pairing_discriminator_step(gan, [next(stream) for _ in range(train.accumulate)], noise, gamma)
    g_batches = [next(stream) for _ in range(train.g_accumulate or train.accumulate)]
    stats.update(pairing_generator_step(gan, g_batches, noise))
    return stats, g_batches[-1].position


def _lazy_weight(weight: float, interval: int, step: int) -> float:
    """Lazy regularisation: the weight times the interval (making up for the skipped steps) on every
    ``interval``-th step, else 0."""
    return weight * interval if weight and step % interval == 0 else 0.0


def real_examples(config: JobConfig, index: ImageIndex, labels: torch.Tensor | None) -> torch.Tensor:
    """Real images laid out as the sample grids are (one class per row for conditional models), NVlabs'
    ``reals.png``: what the samples should come to look like."""
    paths = examples(index, None if labels is None else labels.tolist(), config.output.grid_images)
    fs, _ = storage.filesystem(index.url, config.data.storage_options)
    fetched = fetch_images(index, fs, sorted(set(paths)), config.data.retry_tries, config.data.retry_seconds)
    return torch.stack([_decoded_or_grey(fetched[path], config.data.resolution, config.data.channels)
                        for path in paths])


def _decoded_or_grey(data: bytes | BaseException, resolution: int, channels: int) -> torch.Tensor:
    """An example that is gone or does not decode is shown as a grey tile rather than stopping the run (the stream
    skips it too)."""
    try:
        return decode_fetched(data, resolution, channels)
    except GONE_OR_UNREADABLE:
        return torch.zeros(channels, resolution, resolution)


def grid_latents(config: JobConfig, num_classes: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed z (and for conditional models one class per grid row) every grid of the run is drawn from."""
    n = config.output.grid_images
    grid_stream = torch.Generator().manual_seed(stream_seed(config.train.seed, "grid"))
    z = torch.randn(n, config.model.z_dim, generator=grid_stream).to(device)
    if not num_classes:
        return z, None
    return z, (torch.arange(n) // grid_columns(n) % num_classes).to(device)


def _augment_fields(config: JobConfig, gan: Gan) -> dict[str, float]:
    """``ada_p`` (and ``ada_rt`` once measured) for the records, when augmentation is on."""
    if config.augment.mode == "off":
        return {}
    rt = gan.ada.rt if gan.ada is not None else None
    return {"ada_p": gan.augment.probability, **({"ada_rt": rt} if rt is not None else {})}


def _save_checkpoint(config: JobConfig, gan: Gan, noise: Noise, position: StreamPosition, iteration: int,
                     model_desc: dict, score: float | None, writer: records.RunWriter | None) -> str | None:
    """Gather every rank's generator state and stream position, then rank 0 stores the records written so far
    (with ``flush_every`` not dividing ``checkpoint_every``, a resume from this checkpoint would otherwise never
    write those in memory when rank 0 died) and writes one checkpoint.

    Storage that stays unavailable beyond the retries costs this checkpoint, not the run: ``latest.json`` keeps
    naming the previous one, the next record carries ``checkpoint_failed`` and ``checkpoint_error``."""
    state = training_state.capture(config, gan, noise, position, iteration, model_desc)
    if state is None:
        return None
    out = config.output
    try:
        writer.flush()
        return checkpoint.save(out.run_url, state, iteration, out.keep_checkpoints, out.storage_options,
                               score=score, keep_best=out.keep_best, metric=config.ranking_metric,
                               higher_is_better=config.ranking_metric in HIGHER_IS_BETTER)
    except StorageUnavailable as error:
        logger.error("checkpoint of iteration %d not written, training goes on: %s", iteration, error)
        writer.annotate_next(checkpoint_failed=iteration, checkpoint_error=first_line(error))
        return None


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
