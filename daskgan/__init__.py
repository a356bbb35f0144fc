"""daskgan: train GANs with PyTorch DDP on a Dask cluster, streaming images from object storage.

The package is laid out by where code runs and what it owns:

- ``config``: job files (schema, YAML coercion, credential policy, presets); no torch;
- ``cluster``: the client side: cluster specs, the run driver (dispatch + recovery), the live monitor;
- ``dispatch``, ``results``, ``data``: the three names of dask-pytorch-ddp's API, for users' own DDP functions;
- ``training``: what runs on each worker: the loop, its steps, losses, augmentation, EMA, evaluation;
- ``models``, ``data``, ``metrics``: networks, datasets and their streams, FID/KID;
- ``run``: the run directory: storage, checkpoints, records and TensorBoard, images;
- ``tools``: the command line, generate, sample and the loopback sandbox.

Importing ``daskgan`` loads nothing heavy: the names below are imported when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"JobConfig": "daskgan.config", "load_job": "daskgan.config", "run": "daskgan.dispatch",
         "run_job": "daskgan.cluster.driver", "train_gan": "daskgan.training.loop"}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'daskgan' has no attribute {name!r}")
