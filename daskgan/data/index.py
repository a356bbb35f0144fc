"""What a dataset holds and which part each rank reads: the image objects under a URL with their labels, and
each rank's disjoint shard of every epoch's permutation (as DistributedSampler, without padding duplicates)."""

from __future__ import annotations

import functools
import json
import logging
import posixpath
from dataclasses import dataclass

import torch

from daskgan.data.archive import ZipEntry, list_zip, read_members
from daskgan.errors import NotFound
from daskgan.run import storage
from daskgan.seeding import derive_seed

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageIndex:
    """The image objects of a dataset: filesystem paths (no protocol), their labels, the class names and (when
    listed with them) the objects' sizes in bytes."""

    url: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    archive: str | None = None  # a zip archive's path: ``paths`` are then its member names
    entries: tuple[ZipEntry, ...] = ()  # where each member lies in the archive

    def __len__(self) -> int:
        return len(self.paths)

    def object_key(self, path: str) -> str:
        """A name for ``path`` unique across datasets (a member is named with its archive), e.g. for caches."""
        return f"{self.archive}/{path}" if self.archive else path

    @functools.cached_property
    def entry_of(self) -> dict[str, ZipEntry]:
        return dict(zip(self.paths, self.entries))


def index_images(url: str, storage_options: storage.StorageOptions | None = None) -> ImageIndex:
    """List the images under ``url``: a folder (files in subfolders are labelled by their first folder, sorted by
    name; or, when it holds NVlabs' ``dataset.json``, every image labelled by it) or an NVlabs zip archive (labels
    from its ``dataset.json``)."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    if root.lower().endswith(".zip"):
        return _index_archive(url, fs, root)
    listing = _find(url, fs, root)
    images = sorted(p for p in listing if p.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise NotFound(f"data.url: no images ({', '.join(IMAGE_SUFFIXES)}) under {url}: check the URL, or upload "
                       f"images (one subfolder per class) there")
    relative = [posixpath.relpath(p, root) for p in images]
    if f"{root}/dataset.json" in listing:
        document = json.loads(_read_file(url, fs, f"{root}/dataset.json"))
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


def dataset_json_labels(names: list[str], labelled: list | None, url: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Labels of ``names`` and class names from NVlabs' ``dataset.json`` ``labels`` (``[[name, class], ...]``;
    None: an unlabelled dataset)."""
    if labelled is None:
        return (0,) * len(names), ()
    label_of = {str(name).replace("\\", "/"): int(label) for name, label in labelled}
    missing = [n for n in names if n not in label_of]
    if missing:
        raise NotFound(f"data.url: {url}: dataset.json has no label for {len(missing)} images, e.g. {missing[0]}")
    labels = tuple(label_of[n] for n in names)
    return labels, tuple(str(c) for c in range(max(labels) + 1))


@storage.operation
def _read_file(url: str, fs, path: str) -> bytes:
    return fs.cat_file(path)


@storage.operation
def _list_zip(url: str, fs, path: str):
    return list_zip(fs, path, url, IMAGE_SUFFIXES)


def fetch_objects(index: ImageIndex, fs, paths: list[str]) -> dict[str, bytes | BaseException]:
    """Whole images by their index paths, concurrently: objects (one GET each) or archive members (one ranged GET
    each). A failed fetch maps to its error, for the caller to retry or skip."""
    if index.archive is None:
        return storage.cat_objects(fs, paths)
    return read_members(fs, index.archive, {path: index.entry_of[path] for path in paths})


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
        order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).tolist()
    else:
        order = list(range(size))
    return order[rank::world_size]
