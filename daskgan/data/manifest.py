"""A dataset's listing written once and read by every rank: keys, sizes and labels in one gzipped JSON object.

Listing a large bucket is slow (s3fs pages 1,000 keys per request: an hour-scale wait at ImageNet size on a
throttled bucket) and a pickled million-entry index is tens of MB per rank. So rank 0 lists once and writes the
manifest (by default ``dataset-manifest.json.gz`` in the run directory, or at ``data.manifest`` to share one
between runs); a restart or resume reuses it, and every rank reads it from storage rather than through a
collective. The manifest is JSON: reading one from a bucket runs no code from it. Delete it to list again.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import posixpath
import time

from daskgan.config import DataConfig, OutputConfig
from daskgan.data.archive import ZipEntry
from daskgan.data.shards import TarMember, is_shard_pattern
from daskgan.data.index import ImageIndex, index_images
from daskgan.errors import ConfigError
from daskgan.ranks import from_rank0
from daskgan.run import storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

FORMAT = "daskgan-manifest/1"
RUN_MANIFEST = "dataset-manifest.json.gz"


def manifest_location(data: DataConfig, output: OutputConfig) -> tuple[str, StorageOptions]:
    """Where this job's manifest lives, with the storage options to reach it."""
    if data.manifest:
        return data.manifest, data.storage_options
    return storage.join(output.run_url, RUN_MANIFEST), output.storage_options


def training_index(data: DataConfig, output: OutputConfig) -> ImageIndex:
    """The dataset's index on every rank: rank 0 reuses or writes the manifest (waiting up to
    ``data.listing_timeout_s`` for a listing, longer than collectives may take), then every rank reads it."""
    url, options = manifest_location(data, output)
    from_rank0(lambda: ensure_manifest(data, url, options), timeout_s=data.listing_timeout_s)
    return read_manifest(url, options)


def ensure_manifest(data: DataConfig, url: str, options: StorageOptions) -> None:
    """Keep a manifest of ``data.url`` at ``url``: reuse one of the same dataset, else list and write it."""
    if storage.exists(url, options):
        listed = read_manifest(url, options).url
        if listed == data.url:
            logger.info("dataset: reusing the manifest %s", url)
            return
        if data.manifest:
            raise ConfigError(f"data.manifest: {url} lists {listed}, not data.url {data.url}")
        logger.warning("dataset: the run's manifest lists %s, not %s: listing again", listed, data.url)
    started = time.perf_counter()
    index = dataset_manifest(data)
    if index is None:
        logger.info("dataset: listing %s", data.url)
        index = index_images(data.url, data.storage_options)
    storage.write_bytes(url, manifest_bytes(index, storage.filesystem(data.url, data.storage_options)[1]), options)
    logger.info("dataset: %d images in %d classes listed in %.1f s, manifest %s", len(index), len(index.classes),
                time.perf_counter() - started, url)


def dataset_manifest(data: DataConfig) -> ImageIndex | None:
    """The manifest a dataset folder carries (``daskgan dataset`` writes one beside its shards), else None."""
    if is_shard_pattern(data.url) or data.url.lower().endswith(".zip"):
        return None
    beside = storage.join(data.url, RUN_MANIFEST)
    if not storage.exists(beside, data.storage_options):
        return None
    logger.info("dataset: reading the manifest %s instead of listing", beside)
    return dataclasses.replace(read_manifest(beside, data.storage_options), url=data.url)


def manifest_bytes(index: ImageIndex, root: str) -> bytes:
    """The manifest of ``index``: keys relative to ``root``, the dataset's folder in its filesystem, so that
    a million entries stay a few MB. An archive's members keep their names, with where each lies in it; a shard's
    members are named within their shard, whose path the manifest lists once."""
    sizes = index.sizes or (0,) * len(index)
    shards = list(index.shards)
    if shards:
        folders = {posixpath.dirname(shard) for shard in shards}
        root = folders.pop() if len(folders) == 1 else ""
        shards = [posixpath.relpath(shard, root) if root else shard for shard in shards]
        rows = [[p[len(index.shards[m.shard]) + 1:], s, label, m.shard, m.offset]
                for p, s, label, m in zip(index.paths, sizes, index.labels, index.entries)]
    elif index.archive:
        root = ""
        rows = [[p, s, label, *entry.as_list()] for p, s, label, entry in zip(index.paths, sizes, index.labels,
                                                                                index.entries)]
    else:
        root = root.rstrip("/")
        rows = [[posixpath.relpath(p, root), s, label] for p, s, label in zip(index.paths, sizes, index.labels)]
    document = {"format": FORMAT, "dataset": index.url, "root": root, "archive": index.archive,
                "shards": shards, "classes": list(index.classes), "images": rows}
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), compresslevel=6)


def read_manifest(url: str, options: StorageOptions | None = None) -> ImageIndex:
    return parse_manifest(storage.read_bytes(url, options), url)


def parse_manifest(data: bytes, url: str) -> ImageIndex:
    """The index a manifest describes; anything else is refused with one line naming the URL."""
    try:
        document = json.loads(gzip.decompress(data))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        root, classes, archive = document["root"], tuple(str(c) for c in document["classes"]), document.get("archive")
        shards = tuple(posixpath.join(root, str(s)) for s in document.get("shards") or ())
        columns = list(zip(*document["images"])) or [()] * (7 if archive else 5 if shards else 3)
        keys, sizes, labels = columns[:3]
        if any(not 0 <= label < max(len(classes), 1) for label in labels):
            raise ValueError("a label out of range")
        if shards:
            entries = tuple(TarMember(int(shard), int(offset), int(size))
                            for shard, offset, size in zip(columns[3], columns[4], sizes))
            paths = tuple(f"{shards[m.shard]}/{k}" for k, m in zip(keys, entries))
        else:
            prefix = "" if archive else root.rstrip("/") + "/"
            entries = tuple(ZipEntry(*(int(v) for v in row)) for row in zip(*columns[3:7])) if archive else ()
            paths = tuple(prefix + k for k in keys)
        return ImageIndex(str(document["dataset"]), paths, tuple(int(v) for v in labels), classes,
                          tuple(int(v) for v in sizes), archive, entries, shards)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ConfigError(f"{url} is not a daskgan dataset manifest ({type(exc).__name__}: {exc}); delete it to "
                          f"list the dataset again") from None

