"""What a dataset holds and which part each rank reads: the images under a URL (objects, zip members or tar-shard
members) with their labels, and each rank's disjoint part of every epoch (as DistributedSampler, without padding
duplicates; for tar shards, whole shards per rank, see ``shard_epochs``)."""

from __future__ import annotations

import functools
import logging
import posixpath
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch

from daskgan.config.schema import RETRY_SECONDS, RETRY_TRIES
from daskgan.data.archive import CorruptMember, ZipEntry, folder_dataset_json, list_zip, oversized, read_members
from daskgan.data.shard_epochs import images_by_shard
from daskgan.data.shard_read import read_members_ranged
from daskgan.data.shard_scan import (
    IMAGE_EXTENSIONS,
    TarMember,
    expand_braces,
    is_shard,
    is_shard_pattern,
    refuse_compressed,
    scan_shards,
)
from daskgan.errors import NotFound
from daskgan.run import storage
from daskgan.seeding import stream_seed

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
MAX_CLASSES = 100_000  # ImageNet-21k, the largest class-labelled set in common use, has 21,841


@dataclass(frozen=True)
class ImageIndex:
    """The images of a dataset: filesystem paths (no protocol; a tar member's is ``<shard>/<member>``), their
    labels, the class names and (when listed with them) the images' sizes in bytes."""

    url: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    archive: str | None = None  # a zip archive's path: ``paths`` are then its member names
    entries: tuple[ZipEntry | TarMember, ...] = ()  # where each member lies in the archive or its shard
    shards: tuple[str, ...] = ()  # tar shards' paths: ``paths`` are then their members

    def __len__(self) -> int:
        return len(self.paths)

    def object_key(self, path: str) -> str:
        """A name for ``path`` unique across datasets (a member is named with its archive), e.g. for caches."""
        return f"{self.archive}/{path}" if self.archive else path

    @functools.cached_property
    def entry_of(self) -> dict[str, ZipEntry | TarMember]:
        return dict(zip(self.paths, self.entries))

    @functools.cached_property
    def size_of(self) -> dict[str, int]:
        return dict(zip(self.paths, self.sizes))

    @functools.cached_property
    def shard_images(self) -> tuple[tuple[int, ...], ...]:
        """The images of each tar shard, for ``epoch_windows`` (grouped once: a pass over every entry)."""
        return images_by_shard(self.entries, len(self.shards))


def index_images(url: str, storage_options: storage.StorageOptions | None = None) -> ImageIndex:
    """List the images under ``url``: a folder (files in subfolders are labelled by their first folder, sorted by
    name; or, when it holds NVlabs' ``dataset.json``, every image labelled by it), an NVlabs zip archive (labels
    from its ``dataset.json``), or tar shards: a brace pattern, one ``.tar``, or a folder holding only shards."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    if root.lower().endswith(".zip"):
        return _index_archive(url, fs, root)
    if is_shard_pattern(root):
        return _index_shards(url, fs, expand_braces(root))
    listing = _find(url, fs, root)
    images = sorted(p for p in listing if p.lower().endswith(IMAGE_SUFFIXES))
    shards = sorted(p for p in listing if is_shard(p))
    if not images and shards:
        return _index_shards(url, fs, shards)
    if not images:
        raise NotFound(f"data.url: no images ({', '.join(IMAGE_SUFFIXES)}) under {url}: check the URL, or upload "
                       f"images (one subfolder per class) there")
    relative = [posixpath.relpath(p, root) for p in images]
    labels_file = f"{root}/dataset.json"
    if labels_file in listing:
        document = _folder_dataset_json(url, fs, labels_file, int(listing[labels_file].get("size") or 0))
        labels, classes = dataset_json_labels(relative, document.get("labels"), url)
        return ImageIndex(url, tuple(images), labels, classes, _sizes(listing, images))
    in_folders = ["/" in r for r in relative]
    if not any(in_folders):
        return ImageIndex(url, tuple(images), (0,) * len(images), (), _sizes(listing, images))
    if not all(in_folders):
        logger.warning("%s: %d images sit beside the class folders and are ignored", url,
                       in_folders.count(False))
    kept = [(p, r.split("/", 1)[0]) for p, r, f in zip(images, relative, in_folders) if f]
    classes = tuple(sorted({c for _, c in kept}))
    label_of = {c: i for i, c in enumerate(classes)}
    paths = [p for p, _ in kept]
    return ImageIndex(url, tuple(paths), tuple(label_of[c] for _, c in kept), classes, _sizes(listing, paths))


def _index_archive(url: str, fs, path: str) -> ImageIndex:
    names, entries, labelled = _list_zip(url, fs, path)
    if not names:
        raise NotFound(f"data.url: no images ({', '.join(IMAGE_SUFFIXES)}) in the archive {url}")
    labels, classes = dataset_json_labels(names, labelled, url)
    return ImageIndex(url, tuple(names), labels, classes, tuple(entries[n].size for n in names), path,
                      tuple(entries[n] for n in names))


def _index_shards(url: str, fs, shards: list[str]) -> ImageIndex:
    refuse_compressed(url, shards)
    paths, members, labels = _scan_shards(url, fs, shards)
    if not paths:
        raise NotFound(f"data.url: no images ({', '.join(IMAGE_EXTENSIONS)}) in the tar shards of {url}")
    unlabelled = labels.count(None)
    if 0 < unlabelled < len(labels):
        example = paths[labels.index(None)]
        raise NotFound(f"data.url: {url}: {unlabelled} of {len(labels)} samples have no label (.cls or .json), "
                       f"e.g. {example}")
    classes = () if unlabelled else class_names(paths, labels, url)
    return ImageIndex(url, tuple(paths), tuple(label or 0 for label in labels), classes,
                      tuple(m.size for m in members), entries=tuple(members), shards=tuple(shards))


@storage.operation
def _scan_shards(url: str, fs, shards: list[str]):
    return scan_shards(fs, shards, url)


def dataset_json_labels(names: list[str], labelled: list | None, url: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Labels of ``names`` and class names from NVlabs' ``dataset.json`` ``labels`` (``[[name, class], ...]``;
    None: an unlabelled dataset)."""
    if labelled is None:
        return (0,) * len(names), ()
    if not isinstance(labelled, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in labelled):
        raise NotFound(f"data.url: {url}: dataset.json's labels are not NVlabs' list [[name, class], ...]")
    label_of = {str(name).replace("\\", "/"): _class_number(label, name, url) for name, label in labelled}
    missing = [n for n in names if n not in label_of]
    if missing:
        raise NotFound(f"data.url: {url}: dataset.json has no label for {len(missing)} images, e.g. {missing[0]}")
    labels = tuple(label_of[n] for n in names)
    return labels, class_names(names, labels, url)


def class_names(names: list[str], labels: tuple[int, ...] | list[int], url: str) -> tuple[str, ...]:
    """The class names ``"0"`` to the largest label, refused past ``MAX_CLASSES`` in one line naming the image
    that holds the largest: a crafted label of 10**12 would otherwise have a run build 10**12 names."""
    largest = max(range(len(labels)), key=labels.__getitem__)
    if labels[largest] >= MAX_CLASSES:
        raise NotFound(f"data.url: {url}: the label of {names[largest]} is {labels[largest]}: more than "
                       f"{MAX_CLASSES} classes are not taken")
    return tuple(str(c) for c in range(labels[largest] + 1))


def _class_number(label: object, name: str, url: str) -> int:
    """``label`` as a class number (``6.0`` is 6); json reads ``Infinity`` and ``NaN`` as floats, no whole number."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise NotFound(f"data.url: {url}: dataset.json: the label of {name} is {label!r}; labels must be class "
                       f"numbers (0, 1, ...): NVlabs' float vector labels are not taken")
    return label


@storage.operation
def _folder_dataset_json(url: str, fs, path: str, listed_size: int) -> dict:
    return folder_dataset_json(fs, path, listed_size, url)


@storage.operation
def _list_zip(url: str, fs, path: str):
    return list_zip(fs, path, url, IMAGE_SUFFIXES)


def fetch_objects(index: ImageIndex, fs, paths: list[str]) -> dict[str, bytes | BaseException]:
    """Whole images by their index paths, concurrently: objects (one GET each) or archive or shard members (one
    ranged GET each). A failed fetch maps to its error, for the caller to retry or skip; an object or zip member
    over ``MAX_MEMBER_BYTES`` (as listed) maps to a ``CorruptMember`` unfetched, skipped and counted."""
    if index.shards:
        return read_members_ranged(fs, index.shards, {path: index.entry_of[path] for path in paths})
    if index.archive is None:
        skipped = oversized({path: index.size_of.get(path, 0) for path in paths})
        wanted = [path for path in paths if path not in skipped]
        return {**skipped, **(storage.cat_objects(fs, wanted) if wanted else {})}
    return read_members(fs, index.archive, {path: index.entry_of[path] for path in paths})


Fetch = Callable[[list[str]], Mapping[str, "bytes | BaseException"]]
Settled = Union[bytes, FileNotFoundError, CorruptMember]


def fetch_settled(url: str, fetch: Fetch, paths: list[str], backoff: storage.Backoff
                  ) -> tuple[dict[str, Settled], int]:
    """``fetch(paths)`` until every image is settled (see ``settled``), the failed ones fetched again after
    ``backoff`` (``StorageUnavailable`` once it is used up). Also returns how many fetches were tried again."""
    settled_paths: dict[str, Settled] = {}
    retried = 0
    while paths:
        fetched = fetch(paths)
        failed = {}
        for path in paths:
            value = settled(url, fetched.get(path, FileNotFoundError(path)))
            if value is None:
                failed[path] = fetched[path]
            else:
                settled_paths[path] = value
        paths = list(failed)
        if paths:
            retried += len(paths)
            backoff.wait(f"reading {len(paths)} images under {url}", next(iter(failed.values())))
    return settled_paths, retried


def fetch_images(index: ImageIndex, fs, paths: list[str], tries: int = RETRY_TRIES,
                 seconds: float = RETRY_SECONDS) -> dict[str, Settled]:
    """Images of ``index`` read together outside the stream (evaluation's reals, the grid of reals, ``daskgan
    dataset``'s chunks), each settled: throttling and server errors are fetched again within ``tries`` and
    ``seconds`` (a job's ``data.retry_tries``/``retry_seconds``), so a retried image is the same image."""
    backoff = storage.Backoff(tries, seconds)
    return fetch_settled(index.url, functools.partial(fetch_objects, index, fs), paths, backoff)[0]


def settled(url: str, value: bytes | BaseException) -> Settled | None:
    """A fetched image's outcome: its bytes, or a sign that it is gone (a vanished object, a corrupt archive
    member), which callers skip and count; None for throttling, server errors and resets, to fetch again, never
    taken for a bad image. Refused credentials raise, explained with ``url``."""
    if isinstance(value, (bytes, FileNotFoundError, CorruptMember)):
        return value
    if storage.is_transient(value):
        return None
    explained = storage.explained_error(url, value)  # refused credentials, or a bug: not worth retrying
    if explained is value:
        raise value
    raise explained from value


def _sizes(listing: dict[str, dict], paths: list[str]) -> tuple[int, ...]:
    return tuple(int(listing[p].get("size") or 0) for p in paths)


def examples(index: ImageIndex, labels: list[int] | None, count: int) -> list[str]:
    """Paths of ``count`` images to show beside samples: for each entry of ``labels`` the next image of that
    class (rows of a class-conditional grid), or without labels the first ``count`` images in listing order."""
    if labels is None:
        return list(index.paths[:count])
    by_class: dict[int, list[str]] = {}
    for path, label in zip(index.paths, index.labels):
        by_class.setdefault(label, []).append(path)
    taken: dict[int, int] = {}
    chosen = []
    for label in labels:
        pool = by_class[label]
        chosen.append(pool[taken.get(label, 0) % len(pool)])
        taken[label] = taken.get(label, 0) + 1
    return chosen


@storage.operation
def _find(url: str, fs, root: str) -> dict[str, dict]:
    """Every object under ``root`` with its details (s3fs: pages of 1,000 keys)."""
    return fs.find(root, detail=True)


def shard_indices(size: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices this rank reads in ``epoch``: every ``world_size``-th entry of the epoch's permutation."""
    if shuffle:
        epoch_stream = torch.Generator().manual_seed(stream_seed(seed, "epoch", epoch))
        order = torch.randperm(size, generator=epoch_stream).tolist()
    else:
        order = list(range(size))
    return order[rank::world_size]
