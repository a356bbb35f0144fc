"""FID and KID over all workers, with a pluggable feature extractor.

Each rank embeds its share of the real and generated images (item i goes to rank i mod world), the features are
gathered back into item order, and the statistics are taken in float64, so 2 workers give the FID one process
gives on the same images. The extractor is chosen by name (``metrics.extractor``) and named beside every number:

- ``inception`` (records: ``inception-v3``): NVlabs' TorchScript Inception (``inception-2015-12-05.pt``, 2048 pool
  features, takes uint8 images). Numbers comparable with papers. The file is fetched once per host from NVlabs'
  URL, or from ``metrics.extractor_url`` on machines without internet, into a local cache (``$DASKGAN_CACHE``,
  default ``~/.cache/daskgan``), and its sha256 is checked before it is loaded, every time: loading TorchScript
  runs its code, so the only file ever loaded is NVlabs' own, whatever bucket or path it came through.
- ``random-cnn`` (default, records: ``random-cnn-v1``, no download): a fixed, seeded, randomly initialised 4-layer
  CNN on 64x64 inputs, mean- and std-pooled to 512 features. Random features separate image distributions well
  enough to rank checkpoints of one run (quick curves), but the numbers are not comparable with published FIDs.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from daskgan.data.cache import write_atomically
from daskgan.errors import ChecksumMismatch, StorageUnavailable, UserError, first_line
from daskgan.run import storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

# NVlabs' published file (stylegan2-ada-pytorch metrics/frechet_inception_distance.py) and its sha256, as pinned by
# k-diffusion (k_diffusion/evaluation.py), which checks it on every download
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


class RandomCnnFeatures(nn.Module):
    """The default extractor: random but fixed convolutions (seed 0), the same on every machine with this torch."""

    name = "random-cnn-v1"
    feature_width = 512
    classifies = False  # no class probabilities: no Inception Score

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        widths = [3, 32, 64, 128, 256]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(b, a, 3, 3, generator=generator) / (3 * a ** 0.5), requires_grad=False)
            for a, b in zip(widths, widths[1:]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(64, 64), mode="bilinear", align_corners=False)
        for weight in self.weights:
            x = F.leaky_relu(F.conv2d(x, weight, stride=2, padding=1), 0.2)
        return torch.cat([x.mean(dim=[2, 3]), x.std(dim=[2, 3])], dim=1)


class TorchScriptInception(nn.Module):
    """NVlabs' Inception-v3 TorchScript (``detector(uint8_images, return_features=True)`` -> 2048 features), from
    bytes whose sha256 was checked (``inception_bytes``)."""

    name = "inception-v3"
    feature_width = 2048
    classifies = True

    def __init__(self, verified: bytes):
        super().__init__()
        self.detector = torch.jit.load(io.BytesIO(verified), map_location="cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return self.detector(pixels, return_features=True)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for the Inception Score (NVlabs: the softmax without the output bias)."""
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return self.detector(pixels, no_output_bias=True)


def load_extractor(name: str = "random-cnn", source: str | None = None,
                   storage_options: StorageOptions | None = None) -> nn.Module:
    """The extractor ``metrics.extractor`` names; for ``inception``, NVlabs' file read from the host's cache, or
    fetched into it from ``source`` (``metrics.extractor_url``) or else NVlabs' URL."""
    extractor = TorchScriptInception(inception_bytes(source, storage_options)) if name == "inception" \
        else RandomCnnFeatures()
    return extractor.eval()


def cache_folder() -> str:
    """Where downloaded extractor files are kept on this host: ``$DASKGAN_CACHE``, else ``~/.cache/daskgan``."""
    return os.environ.get("DASKGAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "daskgan")


def inception_bytes(source: str | None = None, storage_options: StorageOptions | None = None) -> bytes:
    """NVlabs' Inception file, its sha256 checked: from this host's cache, else fetched from ``source`` (or NVlabs'
    URL) and cached. The ranks of a host take turns under a lock on the cached file, so the first fetches and the
    others read what it cached: one download per host, not one per rank."""
    file = os.path.join(cache_folder(), f"inception-2015-12-05-{INCEPTION_SHA256[:12]}.pt")
    with _locked(file + ".lock"):
        data = _cached(file)
        if data is None:
            data = _fetched(source, storage_options)
            write_atomically(file, data)
    return data


def _fetched(source: str | None, storage_options: StorageOptions | None) -> bytes:
    """The file from ``source`` or NVlabs' URL, checked; NVlabs unreachable (no internet) is one line saying what to
    do (retrying the run would not help), a user's own storage failing stays what it is (``StorageUnavailable``)."""
    url = source or INCEPTION_URL
    logger.info("metrics: fetching NVlabs' Inception from %s into %s", url, cache_folder())
    try:
        data = storage.read_bytes(url, storage_options)
    except StorageUnavailable as error:
        if source:
            raise
        raise UserError(f"{url}: cannot fetch NVlabs' Inception ({first_line(error)}); where workers have no "
                        "internet, download it elsewhere, put it where they can read it and set "
                        "metrics.extractor_url to it") from None
    check_sha256(data, url)
    return data


def check_sha256(data: bytes, where: str) -> None:
    """Refuse (one line) bytes that are not NVlabs' Inception file."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != INCEPTION_SHA256:
        raise ChecksumMismatch(f"{where}: sha256 {actual} is not NVlabs' inception-2015-12-05.pt "
                               f"(sha256 {INCEPTION_SHA256}); refused, not loaded")


def _cached(file: str) -> bytes | None:
    """The cached file's bytes if it holds NVlabs' file; one that does not (damaged on disk) is removed."""
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        check_sha256(data, file)
    except ChecksumMismatch as mismatch:
        logger.warning("metrics: removing a damaged cached file, fetching again: %s", mismatch)
        os.remove(file)
        return None
    return data


@contextmanager
def _locked(lock_file: str) -> Iterator[None]:
    """An exclusive lock shared by every process of this host (released when the file closes, also on a crash);
    a cache folder that cannot be written is one line naming it."""
    try:
        os.makedirs(os.path.dirname(lock_file), exist_ok=True)
        handle = open(lock_file, "a")
    except OSError as error:
        raise UserError(f"cache folder {os.path.dirname(lock_file)}: cannot be written ({error.strerror}); set "
                        "DASKGAN_CACHE to a folder the workers can write") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
