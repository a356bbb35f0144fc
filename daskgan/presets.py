"""Named training presets (``preset: auto`` in a job), after NVlabs' stylegan2-ada-pytorch ``cfg_specs``.

A preset fills in batch size, learning rates, R1 gamma, EMA, mapping depth and the like from the resolution and the
number of workers; any key the job file sets itself wins over the preset. NVlabs sizes the minibatch for a number of
GPUs; here each Dask worker is one GPU, so the per-worker batch is the preset's global batch divided by the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

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
    # cifar: NVlabs also turn style mixing and path-length regularisation off
    "cifar": lambda res, n: StyleGanSpec(100000, 64, 32, 1.0, 0.0025, 0.01, 500, 0.05, 2, style_mixing=0.0,
                                         pl_weight=0.0),
}


def preset_settings(name: str, resolution: int, workers: int) -> dict[str, Any]:
    """The job settings (a nested mapping, like a job file's) that preset ``name`` gives for ``workers`` workers."""
    spec = STYLEGAN_PRESETS[name](resolution, workers)
    per_worker = max(spec.batch // workers, 1)
    if per_worker * workers != spec.batch:
        logger.warning("preset %s: global batch %d does not divide over %d workers; using %d per worker (%d)",
                       name, spec.batch, workers, per_worker, per_worker * workers)
    global_batch = per_worker * workers
    return {
        "data": {"batch_size": per_worker},
        "model": {"family": "stylegan2", "fmaps": spec.fmaps, "mapping_layers": spec.mapping_layers,
                  "mbstd_group": min(spec.mbstd, per_worker), "style_mixing": spec.style_mixing},
        "train": {"iterations": spec.kimg * 1000 // global_batch, "lr_g": spec.lrate, "lr_d": spec.lrate,
                  "beta1": 0.0, "beta2": 0.99, "r1_gamma": spec.gamma, "r1_interval": 16, "ema_kimg": spec.ema_kimg,
                  "ema_rampup": spec.ramp, "pl_weight": spec.pl_weight, "pl_interval": 4},
        "augment": {"mode": "ada", "target": 0.6, "speed_kimg": 500},
    }


def apply_preset(job: dict[str, Any], workers: int) -> dict[str, Any]:
    """``job`` with its preset's settings filled in underneath the keys it sets itself."""
    name = job["preset"]
    resolution = job.get("data", {}).get("resolution", 64)
    return _merge(preset_settings(name, resolution, workers), job)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
