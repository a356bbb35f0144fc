"""The job schema: one dataclass per section of a job file, each validating its own keys.

Validated once, on the client, before anything starts; unknown keys and values of the wrong type or range are
refused with one line that names the key, e.g. ``jobs/demo.yaml: train.lr_g: expected a number, got 'fast'``.
This module imports neither torch nor any model: the names that the registries in ``daskgan.models``,
``daskgan.training`` and ``daskgan.metrics`` implement are listed here (tests check that both agree).
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from fsspec.core import split_protocol

from daskgan.config.coerce import ConfigError, build_dataclass, load_yaml_mapping, require
from daskgan.config.credentials import check_no_plain_secrets, check_no_url_credentials, redact
from daskgan.config.families import FAMILIES, family_of
from daskgan.config.overrides import apply_overrides

LOSSES = ("bce", "hinge")  # daskgan.training.losses.LOSSES
BIGGAN_INITS = ("ortho", "N02", "xavier")  # daskgan.models.biggan.INITS
D_ARCHITECTURES = ("resnet", "orig")  # daskgan.models.stylegan2: StyleGAN2 D with or without residual skips
AUGMENT_PIPELINES = ("blit", "geom", "color", "bg", "bgc", "r3gan")  # daskgan.training.augment.PIPELINES
METRICS = ("fid", "kid", "is")  # daskgan.metrics.METRICS
EXTRACTORS = ("inception", "random-cnn")  # metrics.extractor: daskgan.metrics.extractors.load_extractor
# the settings train.decay_to can move along R3GAN's cosine over train.decay_kimg (daskgan.training.schedules),
# each with the range its final value must lie in
SCHEDULED = {"lr_g": (0, math.inf), "lr_d": (0, math.inf), "beta2": (0, 1), "r1_gamma": (0, math.inf),
             "ema_kimg": (0, math.inf)}
HIGHER_IS_BETTER = ("is",)  # the Inception Score; FID and KID are better lower
PRECISIONS = ("fp32", "bf16", "fp16")
# how often a storage operation that fails transiently is tried (beyond the client library's own tries) and for
# how long at most: data.retry_tries/retry_seconds' defaults, and what daskgan.run.storage's operations use
RETRY_TRIES = 8
RETRY_SECONDS = 300.0
INTERNAL = {"internal": True}  # field metadata: set by daskgan, refused in a job file
# lengths in thousands of real images (NVlabs' --kimg, --snap) and the iteration counts they are converted to
KIMG_LENGTHS = {"train.kimg": "train.iterations", "output.checkpoint_kimg": "output.checkpoint_every",
                "output.grid_kimg": "output.grid_every", "metrics.every_kimg": "metrics.every"}


def is_training_resolution(resolution: int) -> bool:
    """Whether the models train at ``resolution``: a power of two, 8 or more (as NVlabs' dataset tool demands)."""
    return resolution >= 8 and resolution & (resolution - 1) == 0


@dataclass
class DataConfig:
    """Where the training images live and how each rank reads them."""

    url: str
    storage_options: dict = field(default_factory=dict)
    resolution: int = 64
    batch_size: int = 64  # per worker
    prefetch_batches: int = 4
    decode_threads: Optional[int] = None  # threads decoding a rank's images; default: its share of the host's cores
    decode_processes: Optional[int] = None  # processes decoding them instead (0: threads); default: the rank's
    #                                         share of the cores when it trains on a GPU, else 0
    fetch_batch: Optional[int] = None  # objects per concurrent fetch; defaults to batch_size
    cache_dir: Optional[str] = None  # a local folder keeping fetched objects for later epochs
    cache_max_gb: Optional[float] = None  # the folder's one bound, all ranks'; default: 80% of its disk at first use
    shuffle: bool = True
    mirror: bool = False  # x-flipped copies of every image double the dataset (NVlabs' --mirror)
    shuffle_shards: int = 4  # tar shards: shards read (and their images shuffled) together, and GETs in flight
    channels: int = 3  # 3 (RGB) or 1 (grayscale): what images are decoded to and what G makes and D sees
    retry_tries: int = RETRY_TRIES  # tries of a fetch that fails transiently (503 SlowDown, 500, reset, timeout)
    retry_seconds: float = RETRY_SECONDS  # and the most time spent retrying one fetch before the run stops
    manifest: Optional[str] = None  # URL of the dataset's listing to reuse or write; default: in the run directory
    listing_timeout_s: float = 3600.0  # how long ranks wait for rank 0 to list the dataset

    def validate(self) -> None:
        require(is_training_resolution(self.resolution), "data.resolution",
                f"must be a power of two >= 8, got {self.resolution}")
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        require(self.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
        require(self.fetch_batch is None or self.fetch_batch >= 1, "data.fetch_batch", "must be >= 1")
        require(self.decode_threads is None or self.decode_threads >= 1, "data.decode_threads", "must be >= 1")
        require(self.decode_processes is None or self.decode_processes >= 0, "data.decode_processes", "must be >= 0")
        require(self.shuffle_shards >= 1, "data.shuffle_shards", "must be >= 1")
        require(self.retry_tries >= 1 and self.retry_seconds > 0, "data.retry_tries/retry_seconds",
                "must be >= 1 / > 0")
        require(self.cache_max_gb is None or self.cache_max_gb > 0, "data.cache_max_gb", "must be > 0")
        require(self.channels in (1, 3), "data.channels", f"must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        require(self.listing_timeout_s > 0, "data.listing_timeout_s", "must be > 0")
        check_no_plain_secrets(self.storage_options, "data.storage_options")


@dataclass
class ModelConfig:
    """Which GAN family to build and its size; checkpoints refuse to load into a different one."""

    family: str = "dcgan"
    z_dim: int = 100
    g_channels: int = 64  # dcgan: base width of G
    d_channels: int = 64  # dcgan: base width of D
    w_dim: int = 512  # stylegan2: width of the intermediate latent w
    mapping_layers: int = 8  # stylegan2: depth of the mapping network
    fmaps: float = 0.5  # stylegan2: channels at resolution r are min(32768 * fmaps / r, channel_max)
    channel_max: int = 512  # stylegan2
    style_mixing: float = 0.9  # stylegan2: probability of mixing two w's while training
    mbstd_group: int = 4  # stylegan2: samples per minibatch-std group in D
    d_architecture: str = "resnet"  # stylegan2: D blocks with residual skips, or 'orig' (NVlabs' cifar) without
    conditional: bool = False  # dcgan, stylegan2: condition G and D on the class folders' labels (biggan always is)
    sync_batchnorm: bool = False  # batch statistics over all workers' batches (families with BatchNorm)
    shared_dim: int = 128  # biggan: width of the class embedding shared by G's conditional BatchNorms
    hierarchical: bool = True  # biggan: split z over G's blocks (hierarchical latent)
    shared_embedding: bool = True  # biggan: one class embedding for every BatchNorm (BigGAN); False: per layer (SA-GAN)
    init: str = "ortho"  # biggan: weight initialisation, ortho (BigGAN), N02 or xavier (SA-GAN)
    attention_resolution: int = 64  # biggan: resolution of the self-attention block (0: none)
    sn_singular_values: int = 1  # biggan: singular values tracked per spectrally normalised layer
    sn_iterations: int = 1  # biggan: power iterations per training step
    stage_widths: list = field(default_factory=list)  # r3gan: G's channels per stage from 4 px up (D: reversed);
    #                                                    [] = 768 up to 32 px, halved at each doubling beyond
    stage_blocks: list = field(default_factory=list)  # r3gan: residual blocks per stage (G's order); [] = 2 each
    group_channels: int = 16  # r3gan: channels per group of each block's grouped 3x3 convolution
    expansion: int = 2  # r3gan: a block's inner width as a multiple of its stage's width
    bf16_stages: int = 0  # r3gan: stages run in bfloat16, the highest resolutions' (R3GAN's presets: 3 or 4)

    def validate(self) -> None:
        require(self.family in FAMILIES, "model.family", f"must be one of {list(FAMILIES)}, got {self.family!r}")
        for name in ("z_dim", "g_channels", "d_channels", "w_dim", "mapping_layers", "channel_max", "mbstd_group",
                     "shared_dim", "sn_singular_values", "sn_iterations", "group_channels", "expansion"):
            require(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        require(self.fmaps > 0 and 0 <= self.style_mixing <= 1, "model.fmaps/style_mixing", "must be > 0 / in [0, 1]")
        require(not self.conditional or not family_of(self).always_conditional, "model.conditional",
                f"does not apply to {self.family}, which is always conditional")
        require(self.init in BIGGAN_INITS, "model.init", f"must be one of {list(BIGGAN_INITS)}, got {self.init!r}")
        require(self.shared_embedding or not self.hierarchical, "model.shared_embedding",
                "false (per-layer class embeddings) needs hierarchical: false, as in BigGAN-PyTorch")
        require(self.d_architecture in D_ARCHITECTURES, "model.d_architecture",
                f"must be one of {list(D_ARCHITECTURES)}, got {self.d_architecture!r}")
        for name in ("stage_widths", "stage_blocks"):
            values = getattr(self, name)
            require(all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values), f"model.{name}",
                    f"must be a list of integers >= 1, got {values!r}")
        require(self.bf16_stages >= 0, "model.bf16_stages", "must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation settings (DCGAN defaults: Adam lr 2e-4, beta1 0.5, BCE loss)."""

    iterations: int = 1000
    kimg: Optional[float] = None  # the length in thousands of real images instead (converted to iterations)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    loss: str = "bce"
    seed: int = 0
    r1_gamma: float = 0.0  # R1 weight on reals (0: off); applied lazily every r1_interval minibatches
    r1_interval: int = 16
    ema_kimg: float = 0.0  # generator EMA half-life in thousand images (0: no EMA); grids then use G_ema
    ema_rampup: Optional[float] = None  # half-life at most this fraction of the images seen so far
    ema_start: int = 0  # before this iteration the average just copies G (BigGAN's ema_start)
    adam_eps: float = 1e-8  # Adam's epsilon (BigGAN-PyTorch's released models: 1e-6)
    init_from: Optional[str] = None  # start from these weights (daskgan checkpoint or run, NVlabs pickle), iteration 0
    init_optimizers: bool = False  # with init_from: Adam's moments from the source too (under this job's lr/eps)
    freeze_d: int = 0  # StyleGAN2: D's first (highest-resolution) layers kept frozen (NVlabs' --freezed)
    d_steps: int = 1  # discriminator steps per generator step (BigGAN: 2)
    accumulate: int = 1  # micro-batches per optimiser step: global batch = batch_size x workers x accumulate
    g_accumulate: Optional[int] = None  # G's own count (BigGAN-PyTorch's num_G_accumulations); default: accumulate
    ortho_reg: float = 0.0  # BigGAN's orthogonal regularisation strength on G's weights (0: off; BigGAN 1e-4)
    pl_weight: float = 0.0  # stylegan2: path-length regularisation weight (0: off; NVlabs 2)
    pl_interval: int = 4  # lazy: every pl_interval-th iteration, weighted by the interval
    pl_decay: float = 0.01  # moving-average decay of the path-length target
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast for the highest-resolution blocks (stylegan2)
    reduced_precision_resolutions: int = 4  # how many of the highest resolutions run in bf16/fp16 (NVlabs: 4)
    compile: bool = False  # torch.compile G and D (passes with R1 / path length stay eager: double backward)
    decay_kimg: Optional[float] = None  # R3GAN's decay_nimg / 1000: the schedules' length in thousand real images
    decay_to: dict = field(default_factory=dict)  # settings (SCHEDULED) moved to these values along a cosine over it

    def validate(self) -> None:
        require(self.iterations >= 1, "train.iterations", "must be >= 1")
        require(self.lr_g > 0 and self.lr_d > 0, "train.lr_g/lr_d", "must be > 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        require(self.loss in LOSSES, "train.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        require(self.r1_gamma >= 0 and self.r1_interval >= 1, "train.r1_gamma/r1_interval", "must be >= 0 / >= 1")
        require(self.ema_kimg >= 0, "train.ema_kimg", "must be >= 0")
        require(self.freeze_d >= 0, "train.freeze_d", "must be >= 0")
        require(not self.init_optimizers or self.init_from, "train.init_optimizers", "needs train.init_from")
        require(self.adam_eps > 0, "train.adam_eps", "must be > 0")
        require(self.ema_rampup is None or self.ema_rampup > 0, "train.ema_rampup", "must be > 0")
        require(self.g_accumulate is None or self.g_accumulate >= 1, "train.g_accumulate", "must be >= 1")
        for name in ("d_steps", "accumulate", "pl_interval", "reduced_precision_resolutions"):
            require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        require(self.ema_start >= 0 and self.ortho_reg >= 0 and self.pl_weight >= 0,
                 "train.ema_start/ortho_reg/pl_weight", "must be >= 0")
        require(0 < self.pl_decay <= 1, "train.pl_decay", "must be in (0, 1]")
        require(self.precision in PRECISIONS, "train.precision",
                 f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        self._validate_schedules()

    def _validate_schedules(self) -> None:
        require(self.decay_kimg is None or self.decay_kimg > 0, "train.decay_kimg", "must be > 0")
        require(not self.decay_to or self.decay_kimg is not None, "train.decay_to", "needs train.decay_kimg")
        for name, value in self.decay_to.items():
            require(name in SCHEDULED, "train.decay_to", f"{name!r} is not scheduled; one of {list(SCHEDULED)}")
            low, high = SCHEDULED[name]
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high,
                    "train.decay_to", f"{name} must be in [{low}, {high}), got {value!r}")

    def keeps_average(self) -> bool:
        """Whether G has a moving average: a half-life now, or one the schedule moves to."""
        return self.ema_kimg > 0 or self.decay_to.get("ema_kimg", 0) > 0


def is_inside(url: str, folder: str, itself: bool = False) -> bool:
    """Whether ``url`` lies under ``folder`` (or, with ``itself``, is ``folder``), fsspec URLs or local paths; no
    filesystem is asked, so it works on a client that has no storage library for the scheme."""
    def location(text: str) -> tuple[str, str]:
        protocol, path = split_protocol(text)
        if protocol in (None, "file", "local"):
            return "file", os.path.abspath(path)
        return protocol, posixpath.normpath(path)

    (url_protocol, url_path), (folder_protocol, folder_path) = location(url), location(folder)
    return url_protocol == folder_protocol and (url_path.startswith(folder_path.rstrip("/") + "/") or
                                                itself and url_path.rstrip("/") == folder_path.rstrip("/"))


@dataclass
class OutputConfig:
    """The run directory (any fsspec URL) and how often records, grids and checkpoints go there."""

    run_url: str
    storage_options: dict = field(default_factory=dict)
    flush_every: int = 50
    grid_every: int = 100
    grid_kimg: Optional[float] = None  # or every this many thousand real images (converted to iterations)
    grid_images: int = 64
    checkpoint_every: int = 500
    checkpoint_kimg: Optional[float] = None  # or every this many thousand real images (converted to iterations)
    keep_checkpoints: int = 3
    resume: str = "auto"  # "auto" (newest checkpoint in run_url, if any), "never", a checkpoint URL or run_url itself
    keep_best: int = 0  # also keep the k best checkpoints by best_metric (each evaluation then saves one)
    best_metric: Optional[str] = None  # one of metrics.kinds (default: the first); FID/KID lower, IS higher

    def validate(self) -> None:
        check_no_plain_secrets(self.storage_options, "output.storage_options")
        for name in ("flush_every", "grid_every", "grid_images", "checkpoint_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"output.{name}", "must be >= 1")
        require(self.keep_best >= 0, "output.keep_best", "must be >= 0")
        named = self.resume not in ("auto", "never")
        require(not named or "://" in self.resume or self.resume.endswith((".pt", ".json"))
                or is_inside(self.resume, self.run_url, itself=True), "output.resume",
                f"must be 'auto', 'never', a checkpoint URL or the run directory, got {self.resume!r}")
        require(not named or is_inside(self.resume, self.run_url, itself=True), "output.resume",
                f"{self.resume} is not a checkpoint of this run ({self.run_url}): resuming continues a run in its own "
                f"run_url; to start from other weights, set train.init_from: {self.resume}")
        require(self.best_metric is None or self.best_metric in METRICS, "output.best_metric",
                f"must be one of {list(METRICS)}, got {self.best_metric!r}")


@dataclass
class AugmentConfig:
    """Discriminator augmentation: ``off``, a ``fixed`` p, ``ada`` (p adapts toward E[sign(D(real))] = target), or
    ``schedule`` (R3GAN: p moves from ``p`` to ``p_final`` along a cosine over ``train.decay_kimg``)."""

    mode: str = "off"
    p: float = 0.0  # the fixed p, or where ADA or the schedule starts
    p_final: Optional[float] = None  # schedule: p at train.decay_kimg and after
    pipeline: str = "bgc"  # blit, geom, color, bg or bgc (NVlabs' names), or r3gan (bgc, colour at half p, cutout)
    target: float = 0.6
    interval: int = 4  # minibatches between p adjustments
    speed_kimg: float = 500.0  # p can go from 0 to 1 in this many thousand images

    def validate(self) -> None:
        require(self.mode in ("off", "fixed", "ada", "schedule"), "augment.mode",
                f"must be off, fixed, ada or schedule, got {self.mode!r}")
        require(0 <= self.p <= 1, "augment.p", "must be in [0, 1]")
        require(self.p_final is None or self.mode == "schedule", "augment.p_final", "only with augment.mode: schedule")
        require(self.p_final is None or 0 <= self.p_final <= 1, "augment.p_final", "must be in [0, 1]")
        require(self.pipeline in AUGMENT_PIPELINES, "augment.pipeline", f"must be one of {list(AUGMENT_PIPELINES)}")
        require(0 < self.target < 1, "augment.target", "must be in (0, 1)")
        require(self.interval >= 1 and self.speed_kimg > 0, "augment.interval/speed_kimg", "must be positive")


@dataclass
class MetricsConfig:
    """FID/KID during training, over all workers (``daskgan.metrics``)."""

    every: int = 0  # iterations between evaluations (0: none); the last iteration is evaluated too
    every_kimg: Optional[float] = None  # or thousands of real images between them (converted to iterations)
    kinds: list = field(default_factory=lambda: ["fid", "kid"])
    images: int = 1000  # generated images per evaluation (papers: 50000)
    real_images: Optional[int] = None  # real images for the reference statistics (default: images)
    fid_reals: str = "sample"  # FID against real_images reals ("sample"), or every dataset image ("dataset", papers')
    # the feature extractor: random-cnn (quick curves, no download) or inception (NVlabs' Inception-v3: FIDs
    # comparable with papers; its file is fetched once per host into $DASKGAN_CACHE, checksum verified)
    extractor: str = "random-cnn"
    extractor_url: Optional[str] = None  # inception: where to read NVlabs' file instead of NVlabs' URL (offline)
    storage_options: dict = field(default_factory=dict)  # for extractor_url and real_cache_url
    real_cache_url: Optional[str] = None  # where real features are cached, e.g. beside the dataset to share them
    # between runs (keyed by dataset, resolution, extractor and count); default: the run's metrics/ folder
    kid_subset_size: int = 1000
    standing_stats: int = 0  # BigGAN: evaluate with BatchNorm statistics averaged over this many batches (0: off)

    def validate(self) -> None:
        require(self.every >= 0, "metrics.every", "must be >= 0")
        require(self.standing_stats >= 0, "metrics.standing_stats", "must be >= 0")
        require(bool(self.kinds) and set(self.kinds) <= set(METRICS), "metrics.kinds",
                 f"must be a non-empty list from {list(METRICS)}, got {self.kinds!r}")
        require(self.images >= 2 and (self.real_images is None or self.real_images >= 2), "metrics.images",
                 "must be >= 2")
        require(self.kid_subset_size >= 2, "metrics.kid_subset_size", "must be >= 2")
        require(self.fid_reals in ("sample", "dataset"), "metrics.fid_reals",
                f"must be sample or dataset, got {self.fid_reals!r}")
        require(self.extractor in EXTRACTORS, "metrics.extractor",
                f"must be one of {list(EXTRACTORS)}, got {self.extractor!r}")
        require(self.extractor_url is None or self.extractor == "inception", "metrics.extractor_url",
                "is only where NVlabs' Inception file is read from: set metrics.extractor: inception to use it")
        require("is" not in self.kinds or self.extractor == "inception", "metrics.kinds",
                "'is' needs Inception's class probabilities: set metrics.extractor: inception")
        check_no_plain_secrets(self.storage_options, "metrics.storage_options")


PLATFORM_GRACE_MARGIN_S = 30  # a worker's exit after its run's checkpoint (nanny and worker closing, results handed)


@dataclass
class RecoveryConfig:
    """What the client does when a worker is lost mid-run (process killed) or given notice (pod preempted)."""

    max_restarts: int = 3
    wait_for_workers_s: float = 300.0  # how long to wait for the cluster to offer the workers again
    # with fewer workers than the run's, go on once this many are there (global batch kept) instead of failing
    min_workers: Optional[int] = None
    max_workers: Optional[int] = None  # the run's size: at most this many of the cluster's workers (null: all)
    # the run's size on a shared cluster: this many workers reserved for the run alone on the scheduler, waiting
    # in its queue until they are free (``cluster.reservations``; ``train --workers``); null: every worker, unreserved
    workers: Optional[int] = None
    priority: int = 0  # with ``workers``: queued runs of a higher priority start first (same priority: in order)
    driver_timeout_s: float = 120.0  # ranks whose driver's heartbeat stopped this long ago checkpoint and stop
    # a worker given notice (SIGTERM, eviction) waits this long at most for its run's checkpoint before it leaves;
    # the platform's own grace period (Kubernetes' terminationGracePeriodSeconds) must be at least as long
    notice_grace_s: float = 120.0

    def run_size(self, cluster_workers: int) -> int:
        """How many workers the run trains on, of the ``cluster_workers`` there are."""
        return self.workers or min(cluster_workers, self.max_workers or cluster_workers)

    def platform_grace_s(self) -> int:
        """The grace period a worker's platform should give it (Kubernetes' terminationGracePeriodSeconds): the
        wait for the checkpoint, and time after it for the worker to hand its results over and end."""
        return int(self.notice_grace_s) + PLATFORM_GRACE_MARGIN_S

    def validate(self) -> None:
        require(self.max_restarts >= 0, "recovery.max_restarts", "must be >= 0")
        require(self.wait_for_workers_s >= 0, "recovery.wait_for_workers_s", "must be >= 0")
        require(self.min_workers is None or self.min_workers >= 1, "recovery.min_workers", "must be >= 1")
        require(self.max_workers is None or self.max_workers >= max(1, self.min_workers or 1),
                "recovery.max_workers", "must be >= 1 and >= recovery.min_workers")
        require(self.workers is None or self.workers >= max(1, self.min_workers or 1), "recovery.workers",
                "must be >= 1 and >= recovery.min_workers")
        require(self.workers is None or self.max_workers is None, "recovery.workers",
                "reserves the run's size: give it or recovery.max_workers, not both")
        require(self.priority == 0 or self.workers is not None, "recovery.priority",
                "orders the queue of runs that reserve workers: give recovery.workers (train --workers) too")
        require(self.driver_timeout_s > 0, "recovery.driver_timeout_s", "must be > 0")
        require(self.notice_grace_s > 0, "recovery.notice_grace_s", "must be > 0")


@dataclass
class SyntheticDatasetConfig:
    """A procedurally drawn image set (coloured shapes, one class folder per shape) the demo uploads itself."""

    images: int = 512
    resolution: int = 64
    seed: int = 0
    class_hues: bool = False  # each class one hue (brightness random): class-conditional rows show their class early

    def validate(self) -> None:
        require(self.images >= 1, "sandbox.dataset.images", "must be >= 1")
        require(self.resolution >= 8, "sandbox.dataset.resolution", f"must be >= 8, got {self.resolution}")


@dataclass
class SandboxConfig:
    """Self-contained infrastructure for demos and tests: a loopback S3 server and a generated dataset."""

    s3_server: bool = False
    dataset: Optional[SyntheticDatasetConfig] = None
    copy_results_to: Optional[str] = None  # local folder that keeps the run directory after the S3 server stops

    def validate(self) -> None:
        if self.dataset is not None:
            self.dataset.validate()
        require(self.copy_results_to is None or "://" not in self.copy_results_to, "sandbox.copy_results_to",
                f"must be a local folder, got {self.copy_results_to!r}")


@dataclass
class JobConfig:
    """One training job, as read from ``jobs/<name>.yaml``; only ``data.url`` and ``output.run_url`` are required."""

    data: DataConfig
    output: OutputConfig
    name: str = "daskgan"  # load_job defaults it to the file's name
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    sandbox: Optional[SandboxConfig] = None
    preset: Optional[str] = None  # NVlabs-style named settings (daskgan.config.presets), under the job's own keys
    # the run's worker count the job was resolved for (its preset scaled, its kimg lengths converted); None: not known
    workers: Optional[int] = field(default=None, metadata=INTERNAL)

    def validate(self) -> "JobConfig":
        require(bool(self.name) and "/" not in self.name, "name",
                f"must be a non-empty name without '/', got {self.name!r}")
        sections = (self.data, self.model, self.train, self.augment, self.metrics, self.output, self.recovery)
        for section in (*sections, *([self.sandbox] if self.sandbox else [])):
            section.validate()
        check_no_url_credentials(dataclasses.asdict(self))
        if self.metrics.every:
            require(self.ranking_metric in self.metrics.kinds, "output.best_metric",
                    f"{self.ranking_metric!r} is not among metrics.kinds {self.metrics.kinds}")
        require(not self.output.keep_best or self.metrics.every, "output.keep_best", "needs metrics.every > 0")
        require(self.augment.mode != "schedule" or self.train.decay_kimg is not None, "augment.mode",
                "schedule needs train.decay_kimg (p moves from augment.p to augment.p_final over it)")
        self._validate_for_family()
        return self

    def _validate_for_family(self) -> None:
        family = family_of(self.model)
        if family.g_blocks is not None:
            require(self.data.resolution in family.g_blocks, "data.resolution",
                    f"{family.name} is built for {list(family.g_blocks)} pixels, got {self.data.resolution}")
            require(self.model.z_dim >= family.g_blocks[self.data.resolution] + 1, "model.z_dim",
                    "must be at least the number of G blocks + 1 (hierarchical z gives each a chunk)")
        family_specific = {"train.pl_weight": self.train.pl_weight > 0,
                           "train.precision": self.train.precision != "fp32",
                           "model.d_architecture": self.model.d_architecture != "resnet",
                           "train.freeze_d": self.train.freeze_d > 0}
        for key, used in family_specific.items():
            require(not used or key in family.settings, key, f"is not supported for {family.name}")

    @property
    def ranking_metric(self) -> str:
        """The metric that ranks checkpoints: ``output.best_metric``, else the first of ``metrics.kinds``."""
        return metric_that_ranks(self.output.best_metric, self.metrics.kinds)

    def to_dict(self, redact_secrets: bool = True) -> dict:
        """Plain dict of the job; credentials in storage options are replaced by ``***`` unless told otherwise."""
        data = dataclasses.asdict(self)
        if redact_secrets:
            for section in ("data", "output", "metrics"):
                data[section]["storage_options"] = redact(data[section]["storage_options"])
        return data

    def images_per_iteration(self, workers: int) -> int:
        """Real images D sees in one iteration on ``workers`` ranks: each of its ``d_steps`` steps takes the global
        batch (``batch_size`` x workers x ``accumulate``). The records' kimg is iteration x this / 1000."""
        return self.data.batch_size * workers * self.train.accumulate * self.train.d_steps

    def to_yaml(self) -> str:
        """The job as the run directory's ``config.yaml`` holds it and ``daskgan train --dry-run`` prints it."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, source: str = "job", workers: int | None = None) -> "JobConfig":
        """Build and validate a job for a cluster of ``workers`` Dask workers: a ``preset`` is scaled, and lengths in
        kimg converted to iterations, for the workers the run trains on (``recovery.max_workers`` of them at most)."""
        try:
            job = cls._resolved(data, workers)
            if workers and job.recovery.run_size(workers) != workers:
                job = cls._resolved(data, job.recovery.run_size(workers))
            return job.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def _resolved(cls, data: dict, workers: int | None) -> "JobConfig":
        job = build_dataclass(cls, _with_defaults(data, workers), "")
        job.workers = workers
        job._convert_kimg()
        return job

    def _convert_kimg(self) -> None:
        """Set each iteration count given in thousands of images (``KIMG_LENGTHS``) for ``self.workers``."""
        given = {key: iterations for key, iterations in KIMG_LENGTHS.items() if _get(self, key) is not None}
        if not given:
            return
        require(bool(self.workers), next(iter(given)), "converts to iterations with the global batch, which "
                "scales with the number of workers: load the job with workers=<cluster size>")
        per_iteration = self.images_per_iteration(self.workers)
        if per_iteration < 1:  # a batch setting out of range, which validation names
            return
        for key, iterations in given.items():
            require(_get(self, key) > 0, key, "must be > 0")
            section, name = iterations.split(".")
            setattr(getattr(self, section), name, iterations_for_kimg(_get(self, key), per_iteration))


def metric_that_ranks(best_metric: str | None, kinds: Sequence[str]) -> str:
    """The metric that ranks a run's checkpoints (``JobConfig.ranking_metric``) and the run among others
    (``daskgan compare``, which has only the saved ``config.yaml``): ``best_metric``, else the first of ``kinds``."""
    return best_metric or kinds[0]


def iterations_for_kimg(kimg: float, images_per_iteration: int) -> int:
    """The fewest iterations (1 at least) in which D sees ``kimg`` thousand real images: NVlabs' training stops once
    it has seen ``--kimg`` (rounded to a millionth of an iteration, so float noise never adds one)."""
    return max(1, math.ceil(round(kimg * 1000 / images_per_iteration, 6)))


def _get(job: JobConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(job, section), name)


def load_job(path: str | Path, workers: int | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read and validate a job YAML file (``workers``: the cluster's size, needed when the job names a preset or
    gives a length in kimg), with the command line's ``key=value`` ``overrides`` set in it first
    (``daskgan.config.overrides``).

    A job without a ``name`` is named after its file (``jobs/demo.yaml`` -> ``demo``)."""
    data = {"name": Path(path).stem, **load_yaml_mapping(path)}
    try:
        data = apply_overrides(data, overrides, {**KIMG_LENGTHS, **{v: k for k, v in KIMG_LENGTHS.items()}})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return JobConfig.from_dict(data, source=str(path), workers=workers)


def _with_defaults(data: dict, workers: int | None) -> dict:
    from daskgan.config.presets import PRESETS, apply_defaults

    if not isinstance(data, dict):
        return data
    _refuse_both_length_forms(data)
    name = data.get("preset")
    if name is not None:
        require(isinstance(name, str) and name in PRESETS, "preset", f"must be one of {list(PRESETS)}, got {name!r}")
        require(workers is not None and workers >= 1, "preset",
                f"{name!r} scales with the number of workers: load the job with workers=<cluster size>")
    return apply_defaults(data, workers)


def _refuse_both_length_forms(data: dict) -> None:
    """A length in kimg and in iterations both given by the job (the preset's ``iterations`` is a default; a key
    set to null, as ``JobConfig.to_dict`` writes the form not used, is not given)."""
    for key, iterations in KIMG_LENGTHS.items():
        section, kimg = key.split(".")
        given = data.get(section)
        require(not isinstance(given, dict) or given.get(kimg) is None
                or given.get(iterations.split(".")[1]) is None, key, f"give it or {iterations}, not both")
