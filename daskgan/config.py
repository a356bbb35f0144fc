"""Job configuration: typed dataclasses loaded from YAML and validated once, on the client.

Unknown keys and values of the wrong type or range are refused with one line that names the key, e.g.
``jobs/demo.yaml: train.lr_g: expected a number, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "session_token", "account_key", "sas_token", "client_secret"}
)
REDACTED = "***"
PRECISIONS = frozenset({"fp32", "bf16", "fp16"})
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class ConfigError(ValueError):
    """A job or cluster file that cannot be used; the message names the offending key."""


@dataclass
class DataConfig:
    """Where the training images live and how each rank reads them."""

    url: str
    storage_options: dict = field(default_factory=dict)
    resolution: int = 64
    batch_size: int = 64  # per worker
    prefetch_batches: int = 4
    fetch_batch: Optional[int] = None  # objects per concurrent fetch; defaults to batch_size
    cache_dir: Optional[str] = None
    shuffle: bool = True

    def validate(self) -> None:
        _require(self.resolution >= 8 and self.resolution & (self.resolution - 1) == 0,
                 "data.resolution", f"must be a power of two >= 8, got {self.resolution}")
        _require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _require(self.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
        _require(self.fetch_batch is None or self.fetch_batch >= 1, "data.fetch_batch", "must be >= 1")
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
    conditional: bool = False  # stylegan2: condition G's mapping and D's output on the class folders' labels
    sync_batchnorm: bool = False  # batch statistics over all workers' batches (families with BatchNorm)
    shared_dim: int = 128  # biggan: width of the class embedding shared by G's conditional BatchNorms
    hierarchical: bool = True  # biggan: split z over G's blocks (hierarchical latent)
    attention_resolution: int = 64  # biggan: resolution of the self-attention block (0: none)
    sn_singular_values: int = 1  # biggan: singular values tracked per spectrally normalised layer
    sn_iterations: int = 1  # biggan: power iterations per training step

    def validate(self) -> None:
        from daskgan.models import FAMILIES

        _require(self.family in FAMILIES, "model.family", f"must be one of {sorted(FAMILIES)}, got {self.family!r}")
        for name in ("z_dim", "g_channels", "d_channels", "w_dim", "mapping_layers", "channel_max", "mbstd_group",
                     "shared_dim", "sn_singular_values", "sn_iterations"):
            _require(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _require(self.fmaps > 0 and 0 <= self.style_mixing <= 1, "model.fmaps/style_mixing", "must be > 0 / in [0, 1]")
        _require(not self.conditional or self.family == "stylegan2", "model.conditional",
                 "applies to stylegan2 (biggan is always conditional, dcgan never)")


@dataclass
class TrainConfig:
    """Optimisation settings (DCGAN defaults: Adam lr 2e-4, beta1 0.5, BCE loss)."""

    iterations: int = 1000
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
    d_steps: int = 1  # discriminator steps per generator step (BigGAN: 2)
    accumulate: int = 1  # micro-batches per optimiser step: global batch = batch_size x workers x accumulate
    ortho_reg: float = 0.0  # BigGAN's orthogonal regularisation strength on G's weights (0: off; BigGAN 1e-4)
    pl_weight: float = 0.0  # stylegan2: path-length regularisation weight (0: off; NVlabs 2)
    pl_interval: int = 4  # lazy: every pl_interval-th iteration, weighted by the interval
    pl_decay: float = 0.01  # moving-average decay of the path-length target
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast for the highest-resolution blocks (stylegan2)
    reduced_precision_resolutions: int = 4  # how many of the highest resolutions run in bf16/fp16 (NVlabs: 4)
    compile: bool = False  # torch.compile G and D (passes with R1 / path length stay eager: double backward)

    def validate(self) -> None:
        from daskgan.losses import LOSSES

        _require(self.iterations >= 1, "train.iterations", "must be >= 1")
        _require(self.lr_g > 0 and self.lr_d > 0, "train.lr_g/lr_d", "must be > 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _require(self.loss in LOSSES, "train.loss", f"must be one of {sorted(LOSSES)}, got {self.loss!r}")
        _require(self.r1_gamma >= 0 and self.r1_interval >= 1, "train.r1_gamma/r1_interval", "must be >= 0 / >= 1")
        _require(self.ema_kimg >= 0, "train.ema_kimg", "must be >= 0")
        _require(self.ema_rampup is None or self.ema_rampup > 0, "train.ema_rampup", "must be > 0")
        for name in ("d_steps", "accumulate", "pl_interval", "reduced_precision_resolutions"):
            _require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _require(self.ema_start >= 0 and self.ortho_reg >= 0 and self.pl_weight >= 0,
                 "train.ema_start/ortho_reg/pl_weight", "must be >= 0")
        _require(0 < self.pl_decay <= 1, "train.pl_decay", "must be in (0, 1]")
        _require(self.precision in PRECISIONS, "train.precision",
                 f"must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


@dataclass
class OutputConfig:
    """The run directory (any fsspec URL) and how often records, grids and checkpoints go there."""

    run_url: str
    storage_options: dict = field(default_factory=dict)
    flush_every: int = 50
    grid_every: int = 100
    grid_images: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str = "auto"  # "auto" (newest checkpoint in run_url, if any), "never", or a checkpoint URL
    keep_best: int = 0  # also keep the k best checkpoints by best_metric (each evaluation then saves one)
    best_metric: str = "fid"  # one of metrics.kinds; lower is better

    def validate(self) -> None:
        check_no_plain_secrets(self.storage_options, "output.storage_options")
        for name in ("flush_every", "grid_every", "grid_images", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"output.{name}", "must be >= 1")
        _require(self.keep_best >= 0, "output.keep_best", "must be >= 0")
        _require(self.resume in ("auto", "never") or "://" in self.resume or self.resume.endswith(".pt"),
                 "output.resume", f"must be 'auto', 'never' or a checkpoint URL, got {self.resume!r}")


@dataclass
class AugmentConfig:
    """Discriminator augmentation: ``off``, a ``fixed`` p, or ``ada`` (p adapts toward E[sign(D(real))] = target)."""

    mode: str = "off"
    p: float = 0.0  # the fixed p, or where ADA starts
    pipeline: str = "bgc"  # blit, geom, color, bg or bgc (NVlabs' names)
    target: float = 0.6
    interval: int = 4  # minibatches between p adjustments
    speed_kimg: float = 500.0  # p can go from 0 to 1 in this many thousand images

    def validate(self) -> None:
        from daskgan.augment import PIPELINES

        _require(self.mode in ("off", "fixed", "ada"), "augment.mode", f"must be off, fixed or ada, got {self.mode!r}")
        _require(0 <= self.p <= 1, "augment.p", "must be in [0, 1]")
        _require(self.pipeline in PIPELINES, "augment.pipeline", f"must be one of {sorted(PIPELINES)}")
        _require(0 < self.target < 1, "augment.target", "must be in (0, 1)")
        _require(self.interval >= 1 and self.speed_kimg > 0, "augment.interval/speed_kimg", "must be positive")


@dataclass
class MetricsConfig:
    """FID/KID during training, over all workers (``daskgan.metrics``)."""

    every: int = 0  # iterations between evaluations (0: none); the last iteration is evaluated too
    kinds: list = field(default_factory=lambda: ["fid", "kid"])
    images: int = 1000  # generated images per evaluation (papers: 50000)
    real_images: Optional[int] = None  # real images for the reference statistics (default: images)
    extractor_url: Optional[str] = None  # NVlabs' inception-2015-12-05.pt (TorchScript); None: random-cnn-v1
    storage_options: dict = field(default_factory=dict)  # for extractor_url
    kid_subset_size: int = 1000

    def validate(self) -> None:
        from daskgan.metrics import METRICS

        _require(self.every >= 0, "metrics.every", "must be >= 0")
        _require(bool(self.kinds) and set(self.kinds) <= set(METRICS), "metrics.kinds",
                 f"must be a non-empty list from {list(METRICS)}, got {self.kinds!r}")
        _require(self.images >= 2 and (self.real_images is None or self.real_images >= 2), "metrics.images",
                 "must be >= 2")
        _require(self.kid_subset_size >= 2, "metrics.kid_subset_size", "must be >= 2")
        check_no_plain_secrets(self.storage_options, "metrics.storage_options")


@dataclass
class RecoveryConfig:
    """What the client does when a worker is lost mid-run (process killed, pod preempted)."""

    max_restarts: int = 3
    wait_for_workers_s: float = 300.0  # how long to wait for the cluster to offer the workers again
    min_workers: Optional[int] = None  # after that wait, continue with this many (global batch kept) instead of failing

    def validate(self) -> None:
        _require(self.max_restarts >= 0, "recovery.max_restarts", "must be >= 0")
        _require(self.wait_for_workers_s >= 0, "recovery.wait_for_workers_s", "must be >= 0")
        _require(self.min_workers is None or self.min_workers >= 1, "recovery.min_workers", "must be >= 1")


@dataclass
class SyntheticDatasetConfig:
    """A procedurally drawn image set (coloured shapes, one class folder per shape) the demo uploads itself."""

    images: int = 512
    resolution: int = 64
    seed: int = 0


@dataclass
class SandboxConfig:
    """Self-contained infrastructure for demos and tests: a loopback S3 server and a generated dataset."""

    s3_server: bool = False
    dataset: Optional[SyntheticDatasetConfig] = None
    copy_results_to: Optional[str] = None  # local folder that keeps the run directory after the S3 server stops


@dataclass
class JobConfig:
    """One training job, as read from ``jobs/<name>.yaml``."""

    name: str
    data: DataConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    sandbox: Optional[SandboxConfig] = None
    preset: Optional[str] = None  # NVlabs-style named settings (daskgan.presets), under the job's own keys
    preset_workers: Optional[int] = None  # the worker count the preset was scaled for

    def validate(self) -> "JobConfig":
        for section in (self.data, self.model, self.train, self.augment, self.metrics, self.output, self.recovery):
            section.validate()
        _require(not self.output.keep_best or (self.metrics.every and self.output.best_metric in self.metrics.kinds),
                 "output.keep_best", f"needs metrics.every > 0 and {self.output.best_metric!r} in metrics.kinds")
        if self.model.family == "biggan":
            from daskgan.models.biggan import ARCHITECTURES

            _require(self.data.resolution in ARCHITECTURES, "data.resolution",
                     f"biggan is built for {sorted(ARCHITECTURES)} pixels, got {self.data.resolution}")
            _require(self.model.z_dim >= len(ARCHITECTURES[self.data.resolution][0]) + 1, "model.z_dim",
                     "must be at least the number of G blocks + 1 (hierarchical z gives each a chunk)")
        stylegan_only = {"train.pl_weight": self.train.pl_weight > 0, "train.precision": self.train.precision != "fp32"}
        for key, used in stylegan_only.items():
            _require(not used or self.model.family == "stylegan2", key, f"is not supported for {self.model.family}")
        return self

    def to_dict(self, redact_secrets: bool = True) -> dict:
        """Plain dict of the job; credentials in storage options are replaced by ``***`` unless told otherwise."""
        data = dataclasses.asdict(self)
        if redact_secrets:
            for section in ("data", "output", "metrics"):
                data[section]["storage_options"] = redact(data[section]["storage_options"])
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "job", workers: int | None = None) -> "JobConfig":
        """Build and validate a job; a ``preset`` is scaled for ``workers`` (the number of Dask workers)."""
        try:
            return build_dataclass(cls, _with_preset(data, workers), "").validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def load_job(path: str | Path, workers: int | None = None) -> JobConfig:
    """Read and validate a job YAML file (``workers``: the cluster's size, needed when the job names a preset)."""
    return JobConfig.from_dict(load_yaml_mapping(path), source=str(path), workers=workers)


def _with_preset(data: dict, workers: int | None) -> dict:
    from daskgan.presets import PRESETS, apply_preset

    name = data.get("preset") if isinstance(data, dict) else None
    if name is None:
        return data
    _require(isinstance(name, str) and name in PRESETS, "preset", f"must be one of {list(PRESETS)}, got {name!r}")
    _require(workers is not None and workers >= 1, "preset",
             f"{name!r} scales with the number of workers: load the job with workers=<cluster size>")
    return {**apply_preset(data, workers), "preset_workers": workers}


def load_yaml_mapping(path: str | Path) -> dict:
    """Parse a YAML file that must hold a mapping, turning parse errors into one clear ConfigError line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def check_no_plain_secrets(options: dict, key: str) -> None:
    """Refuse credentials written into a job: the job travels inside pickled Dask tasks, so only references do.

    A secret option must be a reference such as ``${MY_SECRET}``, resolved from the environment of the machine
    that opens the storage (see ``daskgan.storage.resolve_references``).
    """
    for name, value in options.items():
        if isinstance(value, dict):
            check_no_plain_secrets(value, f"{key}.{name}")
        elif name.lower() in SECRET_OPTION_NAMES and value is not None and not ENV_REFERENCE.match(str(value)):
            raise ConfigError(
                f"{key}.{name}: a plain credential in a job file would travel inside the task graph; write "
                f"${{ENV_VAR}} to read it from the workers' environment, or use a profile or the machine's role")


def redact(options: dict) -> dict:
    """Copy of ``options`` with secret values (keys, tokens, passwords) replaced, at any depth."""
    out = {}
    for name, value in options.items():
        if isinstance(value, dict):
            out[name] = redact(value)
        elif name.lower() in SECRET_OPTION_NAMES and value is not None:
            out[name] = REDACTED
        else:
            out[name] = value
    return out


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type; errors name the dotted key."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(options[0], value, key)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, {} if value is None else value, key + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is list or origin is list:
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")
