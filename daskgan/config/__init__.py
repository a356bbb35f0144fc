"""Job configuration, read on the client without importing torch: the schema of job files (``schema``), the
YAML-to-dataclass coercion shared with cluster specs (``coerce``), the credential policy (``credentials``) and
NVlabs/BigGAN-style presets (``presets``)."""

from daskgan.config.coerce import ConfigError, build_dataclass, load_yaml_mapping
from daskgan.config.credentials import check_no_plain_secrets, redact, resolve_references
from daskgan.config.schema import (
    AugmentConfig,
    DataConfig,
    JobConfig,
    MetricsConfig,
    ModelConfig,
    OutputConfig,
    RecoveryConfig,
    SandboxConfig,
    SyntheticDatasetConfig,
    TrainConfig,
    load_job,
)

__all__ = ["AugmentConfig", "ConfigError", "DataConfig", "JobConfig", "MetricsConfig", "ModelConfig", "OutputConfig",
           "RecoveryConfig", "SandboxConfig", "SyntheticDatasetConfig", "TrainConfig", "build_dataclass",
           "check_no_plain_secrets", "load_job", "load_yaml_mapping", "redact", "resolve_references"]
