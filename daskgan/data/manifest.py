"""A dataset's listing written once and read by every rank: keys, sizes and labels in one gzipped JSON object.

Listing a large bucket is slow (s3fs pages 1,000 keys per request: an hour-scale wait at ImageNet size on a
throttled bucket) and a pickled million-entry index is tens of MB per rank. So rank 0 lists once and writes the
manifest (by default ``dataset-manifest.json.gz`` in the run directory, or at ``data.manifest`` to share one
between runs); a restart or resume reuses it, and every rank reads it from storage rather than through a
collective. The manifest is JSON: reading one from a bucket runs no code from it. Its keys are relative to the
dataset and read under the dataset's own URL: a copied dataset is read where it now lies, and a manifest from
someone else cannot point reads anywhere else the user's credentials reach. Delete it to list again.
"""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
import time
import zlib

from daskgan.config import DataConfig, OutputConfig
from daskgan.data.archive import ZipEntry
from daskgan.data.index import ImageIndex, index_images
from daskgan.data.inflate import GZIP, MAX_DOCUMENT_BYTES, inflate
from daskgan.data.shard_scan import TarMember, is_shard_pattern
from daskgan.errors import ConfigError
from daskgan.ranks import from_rank0
from daskgan.run import layout, storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

FORMAT = "daskgan-manifest/2"  # keys relative to the dataset's own location
OLD_FORMAT = "daskgan-manifest/1"  # keys under an absolute "root": read when that root lies in the dataset


def manifest_location(data: DataConfig, output: OutputConfig) -> tuple[str, StorageOptions]:
    """Where this job's manifest lives, with the storage options to reach it."""
    if data.manifest:
        return data.manifest, data.storage_options
    return layout.manifest_url(output.run_url), output.storage_options


def training_index(data: DataConfig, output: OutputConfig) -> ImageIndex:
    """The dataset's index on every rank: rank 0 reuses or writes the manifest (waiting up to
    ``data.listing_timeout_s`` for a listing, longer than collectives may take), then every rank reads it."""
    url, options = manifest_location(data, output)
    from_rank0(lambda: ensure_manifest(data, url, options), timeout_s=data.listing_timeout_s)
    return read_manifest(url, options, data)


def ensure_manifest(data: DataConfig, url: str, options: StorageOptions) -> None:
    """Keep a manifest of ``data.url`` at ``url``: reuse one of the same dataset, else list and write it."""
    if storage.exists(url, options):
        listed = manifest_dataset(url, options)
        if listed == data.url:
            logger.info("dataset: reusing the manifest %s", url)
            return
        if data.manifest:
            raise ConfigError(f"data.manifest: {url} lists {listed}, not data.url {data.url}")
        logger.warning("dataset: the run's manifest lists %s, not %s: listing again", listed, data.url)
    started = time.perf_counter()
    with storage.retry_bounds(data.retry_tries, data.retry_seconds):  # the dataset's storage: the job's bounds
        index = dataset_manifest(data)
        if index is None:
            logger.info("dataset: listing %s", data.url)
            index = index_images(data.url, data.storage_options)
    storage.write_bytes(url, manifest_bytes(index, dataset_base(data.url, data.storage_options)), options)
    logger.info("dataset: %d images in %d classes listed in %.1f s, manifest %s", len(index), len(index.classes),
                time.perf_counter() - started, url)


def dataset_manifest(data: DataConfig) -> ImageIndex | None:
    """The manifest a dataset folder carries (``daskgan dataset`` writes one beside its shards), else None."""
    if is_shard_pattern(data.url) or data.url.lower().endswith(".zip"):
        return None
    beside = storage.join(data.url, layout.MANIFEST)
    if not storage.exists(beside, data.storage_options):
        return None
    logger.info("dataset: reading the manifest %s instead of listing", beside)
    return read_manifest(beside, data.storage_options, data)


def dataset_base(url: str, options: StorageOptions | None = None) -> str:
    """The path a manifest's keys are relative to, from the dataset's own URL: its folder, its zip archive, or
    the folder of its tar shards (a brace pattern's, a single shard's)."""
    root = storage.filesystem(url, options)[1].rstrip("/")
    return posixpath.dirname(root.split("{", 1)[0]) if is_shard_pattern(root) else root


def manifest_bytes(index: ImageIndex, base: str) -> bytes:
    """The manifest of ``index``: every key relative to ``base``, the dataset's ``dataset_base``, so that a copied
    dataset is read where it now lies, a manifest cannot point reads outside its dataset, and a million entries
    stay a few MB. An archive's members keep their names, with where each lies in it; a shard's members are
    named within their shard, whose path the manifest lists once."""
    sizes = index.sizes or (0,) * len(index)
    shards = [_relative(shard, base) for shard in index.shards]
    if shards:
        rows = [[p[len(index.shards[m.shard]) + 1:], s, label, m.shard, m.offset]
                for p, s, label, m in zip(index.paths, sizes, index.labels, index.entries)]
    elif index.archive:
        rows = [[p, s, label, *entry.as_list()] for p, s, label, entry in zip(index.paths, sizes, index.labels,
                                                                                index.entries)]
    else:
        prefix = base + "/"
        rows = [[p[len(prefix):] if p.startswith(prefix) else _relative(p, base), s, label]
                for p, s, label in zip(index.paths, sizes, index.labels)]
    document = {"format": FORMAT, "dataset": index.url, "archive": bool(index.archive), "shards": shards,
                "classes": list(index.classes), "images": rows}
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), compresslevel=6)


def read_manifest(url: str, options: StorageOptions | None, data: DataConfig) -> ImageIndex:
    """The index of ``data.url`` that the manifest at ``url`` describes, its keys read under the dataset."""
    return parse_manifest(storage.read_bytes(url, options), url, data.url, dataset_base(data.url,
                                                                                        data.storage_options))


def manifest_dataset(url: str, options: StorageOptions | None) -> str:
    """The dataset URL a manifest says it lists."""
    return str(_document(storage.read_bytes(url, options), url).get("dataset"))


def parse_manifest(data: bytes, url: str, dataset_url: str, base: str) -> ImageIndex:
    """The index of ``dataset_url`` (whose keys are relative to ``base``) that the manifest describes; a manifest
    of another shape, or a key that leaves the dataset, is refused with one line naming the URL."""
    document = _document(data, url)
    try:
        if document.get("format") == OLD_FORMAT:
            document = _relative_document(document, base, url)
        classes, archive = tuple(str(c) for c in document["classes"]), bool(document.get("archive"))
        shards = tuple(_under(base, str(s), url) for s in document.get("shards") or ())
        columns = list(zip(*document["images"])) or [()] * (7 if archive else 5 if shards else 3)
        keys, sizes, labels = columns[:3]
        if any(not 0 <= label < max(len(classes), 1) for label in labels):
            raise ValueError("a label out of range")
        if shards:
            entries = tuple(TarMember(int(shard), int(offset), int(size))
                            for shard, offset, size in zip(columns[3], columns[4], sizes))
            paths = tuple(f"{shards[m.shard]}/{k}" for k, m in zip(keys, entries))
        elif archive:
            entries = tuple(ZipEntry(*(int(v) for v in row)) for row in zip(*columns[3:7]))
            paths = tuple(str(k) for k in keys)
        else:
            entries, paths = (), tuple(_under(base, str(k), url) for k in keys)
        return ImageIndex(dataset_url, paths, tuple(int(v) for v in labels), classes, tuple(int(v) for v in sizes),
                          base if archive else None, entries, shards)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise _not_a_manifest(url, exc) from None


def _document(data: bytes, url: str) -> dict:
    """The manifest's JSON object (inflated within ``MAX_DOCUMENT_BYTES``), of a format this reads."""
    try:
        document = json.loads(inflate(data, MAX_DOCUMENT_BYTES, GZIP))
        if not isinstance(document, dict) or document.get("format") not in (FORMAT, OLD_FORMAT):
            raise ValueError(f"format {document.get('format') if isinstance(document, dict) else None!r}")
        return document
    except (zlib.error, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise _not_a_manifest(url, exc) from None


def _not_a_manifest(url: str, exc: Exception) -> ConfigError:
    return ConfigError(f"{url} is not a daskgan dataset manifest ({type(exc).__name__}: {exc}); delete it to "
                       f"list the dataset again")


def _under(base: str, key: str, url: str) -> str:
    """``key`` read under ``base``; a key that would leave it (absolute, or with a ``..`` part) is refused."""
    if not key or key[0] == "/" or (".." in key and ".." in key.split("/")):  # split only where it may matter
        raise ConfigError(f"{url}: the key {key!r} is not inside the dataset {base}; a manifest lists only its "
                          f"own dataset's images (delete it to list the dataset again)")
    return f"{base}/{key}"


def _relative(path: str, base: str) -> str:
    """``path`` relative to ``base``, which must hold it."""
    if not path.startswith(base + "/"):
        raise ValueError(f"{path} is not under the dataset {base}")
    return path[len(base) + 1:]


def _relative_document(document: dict, base: str, url: str) -> dict:
    """An ``OLD_FORMAT`` manifest (keys under an absolute ``root``) as ``FORMAT``: taken when everything it lists
    lies in the dataset (as in a run's own manifest), else refused in one line (another location's, or a
    crafted one)."""
    root, archive = str(document["root"]).rstrip("/"), document.get("archive")
    try:
        if archive:
            if archive != base:
                raise ValueError(f"{archive} is not the dataset {base}")
            return {**document, "archive": True}
        if document.get("shards"):
            shards = [_relative(posixpath.join(root, s) if root else s, base) for s in document["shards"]]
            return {**document, "shards": shards}
        prefix = "" if root == base else _relative(root, base) + "/"
        return {**document, "images": [[prefix + row[0], *row[1:]] for row in document["images"]]}
    except ValueError as exc:
        raise ConfigError(f"{url} lists images outside the dataset ({exc}): delete it to list the dataset "
                          f"again") from None
