"""Weights made elsewhere, as daskgan checkpoint states: NVlabs StyleGAN2-ADA network pickles.

``import_weights(url)`` reads an NVlabs pickle (without running the code it carries) and returns what
``daskgan.run.checkpoint.load`` returns for a daskgan checkpoint; ``load_weights(url)`` accepts either.
"""

from __future__ import annotations

from typing import Any

from daskgan.pretrained.nvlabs_pickle import is_pickle, read_pickle
from daskgan.pretrained.stylegan2 import checkpoint_state
from daskgan.run import checkpoint, storage
from daskgan.run.storage import StorageOptions

__all__ = ["import_weights", "load_weights"]


def import_weights(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """The checkpoint state (iteration 0, model description, G, G_ema, D) of the NVlabs pickle at ``url``."""
    return checkpoint_state(read_pickle(storage.read_bytes(url, storage_options), url), url)


def load_weights(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """A daskgan checkpoint or an NVlabs pickle, told apart by content, as a checkpoint state."""
    data = checkpoint.read(url, storage_options)
    if is_pickle(data):
        return checkpoint_state(read_pickle(data, url), url)
    return checkpoint.parse(data, url)
