"""Images in WebDataset-style tar shards in object storage, read a whole shard per GET.

A shard set is a folder of ``.tar`` files or a brace pattern (``s3://b/train-{000000..000127}.tar``). Members are
grouped into samples by key (the member name up to the first dot of its base name, WebDataset's convention): the
image is ``<key>.png|jpg|jpeg|webp``, its label ``<key>.cls`` (an integer) or a ``label``/``class`` field of
``<key>.json``. Listing reads each shard's tar headers once (rank 0, several shards at a time; the run's
manifest then keeps where every image lies, so restarts do not read them again).

Training reads shards whole: each rank takes every ``world_size``-th shard of the epoch's shard permutation and
walks them in windows of ``data.shuffle_shards`` shards, the images of a window shuffled together (a shuffle
buffer as WebDataset's, but a deterministic one): the stream's position (epoch, images consumed) then pins the
window, its permutation and the offset in it, so a resume continues mid-shard exactly. While a window is read,
the next one's shards are already being fetched. A single image (grids, evaluation reals) is one ranged GET.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import tarfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from daskgan.errors import NotFound
from daskgan.run import storage
from daskgan.seeding import stream_seed

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


@dataclass(frozen=True)
class Window:
    """Shards read together, and the order of their images (indices into the index, mirrored copies >= count)."""

    shards: tuple[int, ...]
    order: tuple[int, ...]


def images_by_shard(members: tuple[TarMember, ...], shard_count: int) -> tuple[tuple[int, ...], ...]:
    """The images (positions in the index) of each shard, in the shard's order."""
    in_shard: list[list[int]] = [[] for _ in range(shard_count)]
    for image, member in enumerate(members):
        in_shard[member.shard].append(image)
    return tuple(tuple(images) for images in in_shard)


def epoch_windows(shard_images: tuple[tuple[int, ...], ...], rank: int, world_size: int, epoch: int, seed: int,
                  window: int, shuffle: bool = True, mirror: bool = False) -> list[Window]:
    """This rank's windows in ``epoch``: every ``world_size``-th shard of the epoch's shard permutation, taken
    ``window`` at a time, the images of each window permuted together (mirrored copies among them).
    ``shard_images``: ``images_by_shard``, worked out once for a dataset."""
    shard_count = len(shard_images)
    if shard_count < world_size:
        raise NotFound(f"data.url: {shard_count} shards for {world_size} ranks: every rank needs a shard of its own "
                       f"(write more, smaller shards)")
    generator = torch.Generator().manual_seed(stream_seed(seed, "shards", epoch))
    shards = torch.randperm(shard_count, generator=generator).tolist() if shuffle else list(range(shard_count))
    mine = shards[rank::world_size]
    count = sum(len(images) for images in shard_images)
    windows = []
    for start in range(0, len(mine), window):
        group = tuple(mine[start:start + window])
        images = [image for shard in group for image in shard_images[shard]]
        images += [image + count for image in images] if mirror else []
        if shuffle:
            window_seed = stream_seed(seed, "window", epoch, rank, start)
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(window_seed)).tolist()
            images = [images[i] for i in order]
        windows.append(Window(group, tuple(images)))
    return windows


def tar_shard(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """One shard's bytes: each sample's members ``<key>.<extension>`` in order (plain ustar, uncompressed, as
    WebDataset writes them; mtime 0, so the same samples give the same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_members_ranged(fs: Any, shards: tuple[str, ...], members: dict[str, TarMember]) -> dict[str, Any]:
    """Single images, one ranged GET each (grids, evaluation reals); a failed fetch maps to its error."""
    names = list(members)
    fetched = fs.cat_ranges([shards[members[n].shard] for n in names], [members[n].offset for n in names],
                            [members[n].offset + members[n].size for n in names], on_error="return")
    return dict(zip(names, fetched))


class ShardReader:
    """One rank's shards, whole: the shards of the window being read, and the next window's fetched ahead
    (``ahead`` GETs in flight). Earlier windows' shards are let go, so at most two windows are held."""

    def __init__(self, fs: Any, shards: tuple[str, ...], members: dict[str, TarMember], ahead: int):
        self._fs, self._shards, self._members = fs, shards, members
        self._pool = ThreadPoolExecutor(max(1, ahead), thread_name_prefix="daskgan-shard")
        self._fetches: dict[int, Future] = {}
        self._window_of: dict[int, int] = {}
        self._windows: list[Window] = []
        self._then: tuple[int, ...] = ()
        self._lock = threading.Lock()

    def plan(self, windows: list[Window], offset: int = 0, then: tuple[int, ...] = ()) -> None:
        """The epoch's windows, in reading order; the one holding image ``offset`` of the epoch is fetched at once.
        ``then``: the shards of the next epoch's first window, fetched while the last window is read (an epoch of
        a small dataset is read in a fraction of a second: waiting for the next one's first GETs would halve it)."""
        self._windows, self._then = windows, then
        self._window_of = {shard: number for number, window in enumerate(windows) for shard in window.shards}
        for number, window in enumerate(windows):
            if offset < len(window.order):
                with self._lock:  # another epoch: other windows, but this one's shards may be on their way
                    self._fetches = {s: f for s, f in self._fetches.items() if s in window.shards}
                self._fetch_window(number)
                return
            offset -= len(window.order)

    def read(self, paths: list[str]) -> dict[str, Any]:
        """The images at ``paths`` (members of the planned shards), or the error their shard's fetch met."""
        needed = sorted({self._members[path].shard for path in paths})
        current = min(self._window_of.get(shard, 0) for shard in needed)
        self._release_before(current)
        for number in {self._window_of.get(shard, 0) for shard in needed} | {current + 1}:
            self._fetch_window(number)
        shard_bytes = {}
        for shard in needed:
            try:
                shard_bytes[shard] = self._fetch(shard).result()
            except Exception as error:  # handed back per image, for the stream's retry or stop
                shard_bytes[shard] = error
                with self._lock:
                    self._fetches.pop(shard, None)  # the next read fetches it again
        result = {}
        for path in paths:
            member, data = self._members[path], shard_bytes[self._members[path].shard]
            result[path] = data if isinstance(data, Exception) else data[member.offset:member.offset + member.size]
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch_window(self, number: int) -> None:
        """Fetch window ``number``'s shards; one past the last window is the next epoch's first."""
        for shard in self._windows[number].shards if number < len(self._windows) else self._then:
            self._fetch(shard)

    def _fetch(self, shard: int) -> Future:
        with self._lock:
            if shard not in self._fetches:
                self._fetches[shard] = self._pool.submit(self._get, self._shards[shard])
            return self._fetches[shard]

    def _get(self, path: str) -> bytes:
        """A shard in one GET (no HEAD first, no ranges: several shards are in flight instead)."""
        data = storage.cat_objects(self._fs, [path])[path]
        if isinstance(data, BaseException):
            raise data
        return data

    def _release_before(self, window: int) -> None:
        """Let go of the shards of windows before ``window`` (the next epoch's first window is kept once the last
        one is read: it was fetched for it)."""
        keep = set(self._then) if window == len(self._windows) - 1 else set()
        with self._lock:
            for shard in [s for s in self._fetches if self._window_of.get(s, -1) < window and s not in keep]:
                del self._fetches[shard]
