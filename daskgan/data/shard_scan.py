"""What a set of WebDataset-style tar shards holds: its shards, and each image sample's place and label.

A shard set is a folder of ``.tar`` files or a brace pattern (``s3://b/train-{000000..000127}.tar``). Members are
grouped into samples by key (the member name up to the first dot of its base name, WebDataset's convention): the
image is ``<key>.png|jpg|jpeg|webp``, its label ``<key>.cls`` (an integer) or a ``label``/``class`` field of
``<key>.json``. Listing reads each shard's tar headers once (rank 0, several shards at a time; the run's
manifest then keeps where every image lies, so restarts do not read them again).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from daskgan.errors import NotFound

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")  # recognised, to be refused clearly
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
SCAN_THREADS = 8  # shards whose headers rank 0 reads at once while listing
SCAN_BLOCK = 8 * 2**20  # read-ahead of the scan's sequential reads


@dataclass(frozen=True)
class TarMember:
    """Where an image lies: its shard (a position in ``ImageIndex.shards``) and its data's offset in it."""

    shard: int
    offset: int
    size: int

    def as_list(self) -> list[int]:
        return [self.shard, self.offset, self.size]


def is_shard_pattern(path: str) -> bool:
    return bool(BRACES.search(path)) or is_shard(path)


def is_shard(path: str) -> bool:
    """Whether ``path`` names a tar shard, plain or compressed."""
    return path.lower().endswith((SHARD_SUFFIX, *COMPRESSED_SUFFIXES))


def refuse_compressed(url: str, shards: list[str]) -> None:
    """Training reads a member at its offset in its shard (and a grid's image by a ranged GET): a compressed
    shard has no such offsets."""
    compressed = [shard for shard in shards if shard.lower().endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise NotFound(f"data.url: {url}: compressed tar shards ({compressed[0]}, {len(compressed)} of "
                       f"{len(shards)}) cannot be read member by member: write them uncompressed (e.g. gunzip "
                       f"each; their images are compressed already)")


def expand_braces(path: str) -> list[str]:
    """``train-{000..002}.tar`` -> ``train-000.tar``, ``train-001.tar``, ``train-002.tar`` (zero-padded as written;
    several ranges multiply out)."""
    match = BRACES.search(path)
    if match is None:
        return [path]
    first, last = match.groups()
    width = len(first) if first.startswith("0") else 0
    expanded = [f"{path[:match.start()]}{n:0{width}d}{path[match.end():]}" for n in range(int(first), int(last) + 1)]
    return [name for each in expanded for name in expand_braces(each)]


def scan_shards(fs: Any, shards: list[str], url: str) -> tuple[list[str], list[TarMember], list[int | None]]:
    """Every image sample of ``shards``: its path (``<shard>/<member>``), where it lies and its label (or None)."""
    with ThreadPoolExecutor(min(SCAN_THREADS, len(shards))) as pool:
        scanned = list(pool.map(lambda shard: _scan_shard(fs, shard, url), shards))
    paths, members, labels = flatten_samples(shards, scanned)
    logger.info("dataset: %d images in %d shards under %s", len(paths), len(shards), url)
    return paths, members, labels


def flatten_samples(shards: list[str], samples: list[list[tuple[str, int, int, int | None]]]
                    ) -> tuple[list[str], list[TarMember], list[int | None]]:
    """Paths (``<shard>/<member>``), places and labels of every sample, from each shard's ``samples_in`` list."""
    paths, members, labels = [], [], []
    for number, (shard, shard_samples) in enumerate(zip(shards, samples)):
        for name, offset, size, label in shard_samples:
            paths.append(f"{shard}/{name}")
            members.append(TarMember(number, offset, size))
            labels.append(label)
    return paths, members, labels


def _scan_shard(fs: Any, shard: str, url: str) -> list[tuple[str, int, int, int | None]]:
    try:
        with fs.open(shard, "rb", block_size=SCAN_BLOCK) as handle:
            return samples_in(handle)
    except tarfile.TarError as error:
        raise NotFound(f"data.url: {url}: {shard} is not a readable tar shard ({error})") from None


def samples_in(handle: Any) -> list[tuple[str, int, int, int | None]]:
    """(image member, data offset, size, label or None) of a shard's samples, in the shard's order, from one
    sequential pass over its headers (and its label members' bytes)."""
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, extension = sample_key(info.name)
            if extension in IMAGE_EXTENSIONS:
                images.setdefault(key, (info.name, info.offset_data, info.size))
            elif extension in ("cls", "json"):
                label = _label(tar.extractfile(info).read(), extension)
                if label is not None:
                    labels[key] = label
    return [(name, offset, size, labels.get(key)) for key, (name, offset, size) in images.items()]


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def _label(data: bytes, extension: str) -> int | None:
    """A sample's class number from its ``.cls`` or ``.json`` member; None for anything else a crafted member may
    hold (a negative, a list, an infinity, JSON nested too deeply), which marks the sample as unlabelled."""
    try:
        if extension == "cls":
            value = data.decode().strip()
        else:
            document = json.loads(data)
            value = document.get("label", document.get("class")) if isinstance(document, dict) else None
        label = None if value is None or isinstance(value, bool) else int(value)
    except (ValueError, TypeError, OverflowError, RecursionError, UnicodeDecodeError):
        return None
    return label if label is not None and label >= 0 else None
