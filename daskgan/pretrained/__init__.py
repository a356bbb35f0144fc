"""Weights made elsewhere, as daskgan checkpoint states: NVlabs StyleGAN2-ADA and R3GAN network pickles and
BigGAN-PyTorch weights folders.

``import_weights(url)`` reads either (without running any code they might carry) and returns what
``daskgan.run.checkpoint.load`` returns for a daskgan checkpoint; ``load_weights(url)`` accepts all three.
"""

from __future__ import annotations

from typing import Any, Callable

from daskgan.errors import CheckpointUnreadable, NotFound
from daskgan.pretrained import biggan, r3gan, stylegan2
from daskgan.pretrained.nvlabs_pickle import is_pickle, read_pickle
from daskgan.run import checkpoint, storage
from daskgan.run.storage import StorageOptions

__all__ = ["import_weights", "load_weights", "optimizer_moments"]


def import_weights(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """The checkpoint state (iteration 0, model description, G, G_ema, D) of an NVlabs pickle or a
    BigGAN-PyTorch weights folder at ``url``."""
    def read() -> tuple[str, bytes]:
        return url, _read_weights_file(url, storage_options)

    return _checkpoint_state(url, storage_options, read, _not_weights)


def load_weights(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """A daskgan checkpoint (or a run directory or its ``latest.json``: see ``checkpoint.resolve``), an NVlabs
    pickle or a BigGAN-PyTorch weights folder, as a checkpoint state."""
    def read() -> tuple[str, bytes]:
        resolved = checkpoint.resolve(url, storage_options)
        return resolved, checkpoint.read(resolved, storage_options)

    return _checkpoint_state(url, storage_options, read, checkpoint.parse)


def _checkpoint_state(url: str, storage_options: StorageOptions | None, read: Callable[[], tuple[str, bytes]],
                      otherwise: Callable[[bytes, str], dict[str, Any]]) -> dict[str, Any]:
    """The one place where a BigGAN-PyTorch weights folder and an NVlabs or R3GAN pickle are told apart: the folder
    at ``url``, else the bytes that ``read`` returns (with the URL they came from) as a pickle (R3GAN's when its
    networks are modules pickled as themselves) or as ``otherwise`` reads them. The folder is asked for first:
    reading it as a file would fail."""
    if biggan.is_weights_folder(url, storage_options):
        return biggan.checkpoint_state(url, storage_options)
    source, data = read()
    if is_pickle(data):
        networks = read_pickle(data, source, r3gan.ADMITTED)
        reader = r3gan if r3gan.is_r3gan_pickle(networks) else stylegan2
        return reader.checkpoint_state(networks, source)
    return otherwise(data, source)


def _read_weights_file(url: str, storage_options: StorageOptions | None) -> bytes:
    """The file to import; a missing one says what ``import`` takes."""
    try:
        return storage.read_bytes(url, storage_options)
    except NotFound:
        raise NotFound(f"{url} does not exist: give an NVlabs network pickle or a BigGAN-PyTorch weights folder "
                       f"(G.pth, D.pth, state_dict.pth)") from None


def _not_weights(data: bytes, url: str) -> dict[str, Any]:
    """``import`` takes no daskgan checkpoint: bytes that are no pickle are refused."""
    raise CheckpointUnreadable(f"{url} is neither an NVlabs network pickle nor a BigGAN-PyTorch weights folder")


def optimizer_moments(url: str, storage_options: StorageOptions | None = None) -> dict[str, dict[str, dict]]:
    """The optimizers' per-parameter state of a BigGAN-PyTorch weights folder by daskgan parameter name (see
    ``biggan.optimizer_moments``); other sources hold none (NVlabs pickles) or carry it in their checkpoint state."""
    return biggan.optimizer_moments(url, storage_options) if biggan.is_weights_folder(url, storage_options) else {}
