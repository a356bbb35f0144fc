"""Named training presets (``preset: auto`` in a job): NVlabs' stylegan2-ada-pytorch ``cfg_specs``, the BigGAN
and SA-GAN settings of ajbrock's BigGAN-PyTorch / the papers, and the recipes of R3GAN's ``train.py``.

A preset fills in batch size, learning rates, regularisation, EMA, network sizes and the like from the resolution
and the number of workers; any key the job file sets itself wins over the preset. The presets give a global batch;
here each Dask worker is one GPU, so the per-worker batch is the global batch divided by the workers (and, for
BigGAN, by the gradient-accumulation count).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from daskgan.config.coerce import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StyleGanSpec:
    """One row of NVlabs' table: global minibatch, minibatch-std group, fmaps, lr, R1 gamma, EMA, mapping depth."""

    kimg: int
    batch: int
    mbstd: int
    fmaps: float
    lrate: float
    gamma: float
    ema_kimg: float
    ramp: Optional[float]
    mapping_layers: int
    style_mixing: float = 0.9
    pl_weight: float = 2.0
    d_architecture: str = "resnet"


def _auto(resolution: int, workers: int) -> StyleGanSpec:
    """NVlabs' ``auto``: settings scaled from the resolution and the number of GPUs (workers); the batch is rounded
    down to a multiple of the workers (NVlabs refuses a GPU count that does not divide it)."""
    batch = max(min(workers * min(4096 // resolution, 32), 64), workers) // workers * workers
    return StyleGanSpec(kimg=25000, batch=batch, mbstd=min(batch // workers, 4), fmaps=1 if resolution >= 512 else 0.5,
                        lrate=0.002 if resolution >= 1024 else 0.0025, gamma=0.0002 * resolution ** 2 / batch,
                        ema_kimg=batch * 10 / 32, ramp=0.05, mapping_layers=2)


STYLEGAN_PRESETS: dict[str, Callable[[int, int], StyleGanSpec]] = {
    "auto": _auto,
    "paper256": lambda res, n: StyleGanSpec(25000, 64, 8, 0.5, 0.0025, 1.0, 20, None, 8),
    "paper512": lambda res, n: StyleGanSpec(25000, 64, 8, 1.0, 0.0025, 0.5, 20, None, 8),
    "paper1024": lambda res, n: StyleGanSpec(25000, 32, 4, 1.0, 0.002, 2.0, 10, None, 8),
    # NVlabs' `stylegan2`: the original StyleGAN2 settings (the source of their ffhq512/1024 transfer networks)
    "stylegan2": lambda res, n: StyleGanSpec(25000, 32, 4, 1.0, 0.002, 10.0, 10, None, 8),
    # cifar: NVlabs also turn style mixing and path-length regularisation off, and D's residual connections
    "cifar": lambda res, n: StyleGanSpec(100000, 64, 32, 1.0, 0.0025, 0.01, 500, 0.05, 2, style_mixing=0.0,
                                         pl_weight=0.0, d_architecture="orig"),
}


@dataclass(frozen=True)
class BigGanSpec:
    """Global batch (= per-worker batch x workers x accumulate), D steps, learning rates, orthogonal
    regularisation, EMA (per-step decay from ema_start), widths and latent sizes."""

    batch: int
    accumulate: int
    d_steps: int
    lr_g: float
    lr_d: float
    ortho: float
    ema_decay: float
    ema_start: int
    channels: int
    z_dim: int
    hierarchical: bool
    iterations: int
    adam_eps: float = 1e-8
    shared_embedding: bool = True
    init: str = "ortho"


BIGGAN_PRESETS: dict[str, BigGanSpec] = {
    # BigGAN, the paper's values (Brock et al. 2019, ImageNet 128): batch 2048, 2 D steps, lr 5e-5 / 2e-4, ortho
    # 1e-4, EMA 0.9999 from 20k, ch 96, z 120 split hierarchically
    "biggan": BigGanSpec(2048, 8, 2, 5e-5, 2e-4, 1e-4, 0.9999, 20000, 96, 120, True, 150000),
    # the released models' recipe (ajbrock's launch_BigGAN_bs256x8.sh): 256 x 8 accumulations, 1 D step, lr 1e-4 /
    # 4e-4, no orthogonal regularisation, Adam eps 1e-6
    "biggan-pytorch": BigGanSpec(2048, 8, 1, 1e-4, 4e-4, 0.0, 0.9999, 20000, 96, 120, True, 150000, adam_eps=1e-6),
    # SA-GAN (Zhang et al. 2019; launch_SAGAN_bs128x2_ema.sh): batch 256 (128 x 2), TTUR 1e-4 / 4e-4, 1 D step
    # per-layer class embeddings (no shared one), z only into the first layer, xavier initialisation
    "sagan": BigGanSpec(256, 2, 1, 1e-4, 4e-4, 0.0, 0.9999, 2000, 64, 128, False, 1000000, shared_embedding=False,
                        init="xavier"),
}

BIGGAN_256_Z = 140  # BigGAN-256 splits a longer z over its one more block (20 per slot, as 120 at 128)



@dataclass(frozen=True)
class R3GanSpec:
    """One recipe of R3GAN's ``train.py`` (its README's command for the global batch and class conditioning):
    G's widths per stage from 4 px (R3GAN's ``WidthPerStage``), channels per group (width x 2 over its
    ``CardinalityPerStage``), bfloat16 stages (its ``FP16Stages``), gamma's, p's and the EMA half-life's schedule
    over ``decay_kimg``. Every recipe has z of 64, 2 blocks a stage, Adam betas (0, 0.9 -> 0.99), lr 2e-4 -> 5e-5,
    an EMA half-life from 0, x-flips and augmentation."""

    resolution: int
    batch: int
    widths: tuple[int, ...]
    group_channels: int
    bf16_stages: int
    gamma: tuple[float, float]
    p_final: float
    ema_kimg: float
    decay_kimg: float
    conditional: bool


R3GAN_PRESETS: dict[str, R3GanSpec] = {
    "r3gan-cifar10": R3GanSpec(32, 512, (768,) * 4, 16, 3, (0.05, 0.005), 0.55, 5000, 20000, True),
    "r3gan-ffhq64": R3GanSpec(64, 256, (768,) * 4 + (384,), 16, 4, (2, 0.2), 0.3, 500, 20000, False),
    "r3gan-ffhq256": R3GanSpec(256, 256, (768,) * 4 + (384, 192, 96), 16, 4, (150, 15), 0.3, 500, 20000, False),
    "r3gan-imagenet32": R3GanSpec(32, 4096, (1536,) * 4, 32, 3, (0.5, 0.05), 0.5, 50000, 200000, True),
    "r3gan-imagenet64": R3GanSpec(64, 4096, (1536,) * 5, 32, 4, (1, 0.1), 0.4, 50000, 200000, True),
}

PRESETS = (*STYLEGAN_PRESETS, *BIGGAN_PRESETS, *R3GAN_PRESETS)


def preset_settings(name: str, resolution: int, workers: int) -> dict[str, Any]:
    """The job settings (a nested mapping, like a job file's) that preset ``name`` gives for ``workers`` workers."""
    if name in BIGGAN_PRESETS:
        return _biggan_settings(name, BIGGAN_PRESETS[name], workers, resolution)
    if name in R3GAN_PRESETS:
        return _r3gan_settings(name, R3GAN_PRESETS[name], workers, resolution)
    spec = STYLEGAN_PRESETS[name](resolution, workers)
    per_worker = _per_worker(name, spec.batch, workers)
    global_batch = per_worker * workers
    return {
        "data": {"batch_size": per_worker},
        "model": {"family": "stylegan2", "z_dim": 512, "w_dim": 512, "fmaps": spec.fmaps,
                  "mapping_layers": spec.mapping_layers,
                  "mbstd_group": min(spec.mbstd, per_worker), "style_mixing": spec.style_mixing,
                  "d_architecture": spec.d_architecture},
        "train": {"iterations": spec.kimg * 1000 // global_batch, "lr_g": spec.lrate, "lr_d": spec.lrate,
                  "beta1": 0.0, "beta2": 0.99, "r1_gamma": spec.gamma, "r1_interval": 16, "ema_kimg": spec.ema_kimg,
                  "ema_rampup": spec.ramp, "pl_weight": spec.pl_weight, "pl_interval": 4},
        "augment": {"mode": "ada", "target": 0.6, "speed_kimg": 500},
    }


def _biggan_settings(name: str, spec: BigGanSpec, workers: int, resolution: int) -> dict[str, Any]:
    per_worker = _per_worker(name, spec.batch, workers * spec.accumulate)
    global_batch = per_worker * workers * spec.accumulate
    # a per-step decay is a half-life of ln(0.5)/ln(decay) steps of global_batch images
    ema_kimg = math.log(0.5) / math.log(spec.ema_decay) * global_batch / 1000
    return {
        "data": {"batch_size": per_worker},
        "model": {"family": "biggan", "z_dim": BIGGAN_256_Z if resolution == 256 and spec.hierarchical else spec.z_dim,
                  "g_channels": spec.channels, "d_channels": spec.channels,
                  "hierarchical": spec.hierarchical, "attention_resolution": 64,
                  "shared_embedding": spec.shared_embedding, "init": spec.init},
        "train": {"iterations": spec.iterations, "loss": "hinge", "lr_g": spec.lr_g, "lr_d": spec.lr_d,
                  "beta1": 0.0, "beta2": 0.999, "d_steps": spec.d_steps, "accumulate": spec.accumulate,
                  "ortho_reg": spec.ortho, "ema_kimg": ema_kimg, "ema_start": spec.ema_start,
                  "adam_eps": spec.adam_eps},
    }


def _r3gan_settings(name: str, spec: R3GanSpec, workers: int, resolution: int) -> dict[str, Any]:
    """A recipe is for its dataset's resolution: its widths list one stage per doubling from 4 px."""
    if resolution != spec.resolution:
        raise ConfigError(f"preset: {name} is R3GAN's {spec.resolution} px recipe, got data.resolution {resolution}")
    per_worker = _per_worker(name, spec.batch, workers)
    stages = len(spec.widths)
    return {
        "data": {"batch_size": per_worker, "mirror": True},
        "model": {"family": "r3gan", "z_dim": 64, "stage_widths": list(spec.widths), "stage_blocks": [2] * stages,
                  "group_channels": spec.group_channels, "expansion": 2, "bf16_stages": spec.bf16_stages,
                  "conditional": spec.conditional},
        "train": {"iterations": math.ceil(spec.decay_kimg * 1000 / (per_worker * workers)), "lr_g": 2e-4,
                  "lr_d": 2e-4, "beta1": 0.0, "beta2": 0.9, "r1_gamma": spec.gamma[0], "ema_kimg": 0.0,
                  "decay_kimg": spec.decay_kimg,
                  "decay_to": {"lr_g": 5e-5, "lr_d": 5e-5, "beta2": 0.99, "r1_gamma": spec.gamma[1],
                               "ema_kimg": spec.ema_kimg}},
        "augment": {"mode": "schedule", "p": 0.0, "p_final": spec.p_final, "pipeline": "r3gan"},
    }


def _per_worker(name: str, global_batch: int, parts: int) -> int:
    per_worker = max(global_batch // parts, 1)
    if per_worker * parts != global_batch:
        logger.warning("preset %s: global batch %d does not divide into %d parts; using %d per worker (%d)",
                       name, global_batch, parts, per_worker, per_worker * parts)
    return per_worker


# NVlabs' transfer learning (``--resume`` from a network): ADA reacts faster at first, the EMA has no ramp-up
TRANSFER_SETTINGS = {"augment": {"speed_kimg": 100}, "train": {"ema_rampup": None}}


def apply_defaults(job: dict[str, Any], workers: int | None) -> dict[str, Any]:
    """``job`` with its family's defaults, its preset's settings over them, then the transfer settings when it
    starts from other weights (``train.init_from``), filled in underneath the keys it sets itself."""
    base: dict[str, Any] = {}
    data, train, model = (section if isinstance(section, dict) else {}
                          for section in (job.get("data"), job.get("train"), job.get("model")))
    if job.get("preset") is not None:  # a section that is not a mapping is refused by the schema
        base = preset_settings(job["preset"], data.get("resolution", 64), workers)
    base = _merge(family_defaults(model.get("family", base.get("model", {}).get("family"))), base)
    if train.get("init_from"):
        base = _merge(base, TRANSFER_SETTINGS)
    return _merge(base, job)


def family_defaults(name: Any) -> dict[str, Any]:
    """The settings family ``name`` uses where a job sets none (``Family.defaults``), nested as a job file's; none
    for an unnamed family (the default one has none) or a name the schema will refuse."""
    from daskgan.config.families import FAMILIES

    family = FAMILIES.get(name) if isinstance(name, str) else None
    nested: dict[str, Any] = {}
    for key, value in (family.defaults.items() if family is not None else ()):
        section, setting = key.split(".")
        nested.setdefault(section, {})[setting] = value
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
