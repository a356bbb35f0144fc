"""One rank's training batches, streamed from any fsspec URL and fetched ahead of the training step.

- ``ImageStream`` is an endless iterator of batches for one rank: a background thread fetches many objects at
  once (s3fs ``cat`` of a list runs the GETs concurrently), decodes them (in a pool of ``data.decode_threads``:
  Pillow, simplejpeg and torch release the GIL while they work) and keeps a bounded queue of ready batches, so
  storage latency and decoding hide behind compute. Unreadable objects are skipped, counted and logged once.
- Its position (epoch, index within the rank's shard) is part of every batch, so a checkpoint can resume the
  stream exactly where it stopped.
- Tar shards are read whole, a window of them at a time, by a ``ShardReader`` (see ``shards``); the epoch's order
  is then the rank's windows', and a position mid-shard resumes as exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from daskgan.config import DataConfig
from daskgan.data.archive import CorruptMember
from daskgan.data.cache import DiskCache
from daskgan.data.decode import DECODE_ERRORS, decode_uint8, to_unit_range
from daskgan.data.index import ImageIndex, fetch_objects, shard_indices
from daskgan.data.shards import ShardReader, epoch_windows
from daskgan.run import storage

logger = logging.getLogger(__name__)

MAX_DEFAULT_DECODE_THREADS = 8
DECODE_CHUNK = 16  # images per task of the decode pool: a 64 px PNG decodes in tens of microseconds, so one task
#                    per image would spend much of it handing work out


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's stream stands: the epoch, and how many entries of its shard it has consumed."""

    epoch: int = 0
    offset: int = 0


@dataclass
class Batch:
    """A rank's batch as the stream delivers it: uint8 pixels, as NVlabs' loader yields them (a quarter of the
    bytes to queue and to copy to the GPU; ``real_images`` converts them on the device)."""

    images: torch.Tensor  # (B, C, R, R) uint8
    labels: torch.Tensor  # (B,), int64
    position: StreamPosition  # stream position right after this batch

    def real_images(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The images on ``device`` as float32 in [-1, 1], what G makes and D judges."""
        return to_unit_range(self.images.to(device, non_blocking=True))


class ImageStream:
    """Endless batches of one rank's shard, prefetched by a background thread. Use as an iterator; ``close()`` it."""

    def __init__(self, index: ImageIndex, config: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start: StreamPosition = StreamPosition(), epochs: int | None = None, drop_last: bool = True):
        """``epochs``: stop after this many (endless without); ``drop_last``: whether an epoch's last batch, short
        of ``batch_size``, is dropped (training: every batch full) or delivered (a pass over every image)."""
        self.index = index
        self._epochs, self._drop_last = epochs, drop_last
        self.config = config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.skipped = 0  # distinct objects that could not be read or decoded
        self.images_read = 0
        self.retried = 0  # fetches tried again after a transient storage error
        self._fs, _ = storage.filesystem(index.url, config.storage_options)
        self._bad: set[int] = set()
        self._cache = DiskCache(config.cache_dir, _bytes(config.cache_max_gb)) if config.cache_dir else None
        self._sizes = dict(zip(index.paths, index.sizes))
        self._reader = (ShardReader(self._fs, index.shards, index.entry_of, ahead=config.shuffle_shards)
                        if index.shards else None)
        threads = config.decode_threads or default_decode_threads()
        self._decoder = (ThreadPoolExecutor(threads, thread_name_prefix=f"daskgan-decode-rank{rank}")
                         if threads > 1 else None)
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True,
                                        name=f"daskgan-prefetch-rank{rank}")
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            if isinstance(item, StopIteration):
                self._queue.put(item)  # the stream stays ended
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
        if self._reader is not None:
            self._reader.close()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)

    def _produce(self, start: StreamPosition) -> None:
        try:
            epoch, offset = start.epoch, start.offset
            while not self._stop.is_set():
                if not self._produce_epoch(epoch, offset) and not self._stop.is_set():
                    raise RuntimeError(
                        f"rank {self.rank}: its shard of {self.index.url} holds fewer readable images than one "
                        f"batch ({self.config.batch_size}); {self.skipped} objects were unreadable")
                epoch, offset = epoch + 1, 0
                if self._epochs is not None and epoch - start.epoch >= self._epochs:
                    self._put(StopIteration())
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it in the training loop
            self._put(exc)

    def _produce_epoch(self, epoch: int, offset: int) -> bool:
        """Emit the epoch's full batches from ``offset`` on (the tail that does not fill a batch is dropped).

        With ``data.mirror`` the epoch holds every image twice, entries n.. being the x-flipped copies (NVlabs'
        ``--mirror``); an image fetched for one copy serves both."""
        count = len(self.index)
        shard = self._epoch_order(epoch, offset)
        chunk_size = self.config.fetch_batch or self.config.batch_size
        images, labels, emitted = [], [], offset > 0
        while offset < len(shard) and not self._stop.is_set():
            chunk = shard[offset:offset + chunk_size]
            decoded = self._fetch_decoded(sorted({i % count for i in chunk} - self._bad))
            for i in chunk:
                offset += 1
                image = decoded.get(i % count)
                if image is None:
                    continue
                images.append(image.flip(-1) if i >= count else image)
                labels.append(self.index.labels[i % count])
                if len(images) == self.config.batch_size:
                    self._put(Batch(torch.stack(images), torch.tensor(labels), StreamPosition(epoch, offset)))
                    images, labels, emitted = [], [], True
        if images and not self._drop_last and not self._stop.is_set():
            self._put(Batch(torch.stack(images), torch.tensor(labels), StreamPosition(epoch, offset)))
            emitted = True
        return emitted

    def _epoch_order(self, epoch: int, offset: int) -> list[int]:
        """The images this rank reads in ``epoch`` (mirrored copies from ``len(index)`` on); for tar shards, the
        order of its windows, whose reading starts at the one holding ``offset``."""
        count = len(self.index) * (2 if self.config.mirror else 1)
        if self._reader is None:
            return shard_indices(count, self.rank, self.world_size, epoch, self.seed, self.config.shuffle)
        windows = epoch_windows(self.index.entries, len(self.index.shards), self.rank, self.world_size, epoch,
                                self.seed, self.config.shuffle_shards, self.config.shuffle, self.config.mirror)
        self._reader.plan(windows, offset)
        return [image for window in windows for image in window.order]

    def _fetch_decoded(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """The uint8 images of ``indices`` that could be read; the others are marked bad, counted and logged."""
        raw = self._fetch_bytes([self.index.paths[i] for i in indices])
        outcomes = self._decode_all([raw[self.index.paths[i]] for i in indices])
        decoded = {}
        for i, outcome in zip(indices, outcomes):
            if isinstance(outcome, torch.Tensor):
                decoded[i] = outcome
                self.images_read += 1
            else:  # vanished (404), a corrupt archive member, or not an image
                self._bad.add(i)
                self.skipped += 1
                logger.warning("skipping unreadable image %s (%s: %s); %d skipped so far", self.index.paths[i],
                               type(outcome).__name__, outcome, self.skipped)
        return decoded

    def _decode_all(self, blobs: list[bytes | BaseException]) -> list[torch.Tensor | BaseException]:
        """Each blob's uint8 image or the reason it has none, in order; in the decode pool when there is one."""
        decode = functools.partial(_decoded_or_error, resolution=self.config.resolution,
                                   channels=self.config.channels)
        if self._decoder is None:
            return [decode(blob) for blob in blobs]
        chunks = [blobs[start:start + DECODE_CHUNK] for start in range(0, len(blobs), DECODE_CHUNK)]
        return [outcome for part in self._decoder.map(lambda chunk: [decode(b) for b in chunk], chunks)
                for outcome in part]

    def _fetch_bytes(self, paths: list[str]) -> dict[str, bytes | BaseException]:
        """Fetch objects (or archive members) concurrently, through the local cache when one is set.

        A vanished object or a corrupt member comes back as its error (skipped and counted by the caller). Throttling,
        server errors and resets are retried with backoff (``data.retry_tries``/``retry_seconds``), never taken
        for a bad image; refused credentials stop the run with a message naming the dataset."""
        result: dict[str, bytes | BaseException] = {}
        if self._cache is not None:
            for path in paths:
                data = self._cache.read(self.index.object_key(path), self._sizes.get(path, 0))
                if data is not None:
                    result[path] = data
        missing = [p for p in paths if p not in result]
        backoff = storage.Backoff(self.config.retry_tries, self.config.retry_seconds)
        while missing:
            fetched = self._reader.read(missing) if self._reader else fetch_objects(self.index, self._fs, missing)
            failed = {}
            for path in missing:
                value = fetched.get(path, FileNotFoundError(path))
                if isinstance(value, (bytes, FileNotFoundError, CorruptMember)):
                    result[path] = value
                    if self._cache is not None and isinstance(value, bytes):
                        self._cache.write(self.index.object_key(path), value, self._sizes.get(path, 0))
                elif storage.is_transient(value):
                    failed[path] = value
                else:  # refused credentials (named with the dataset's URL), or a bug: not worth retrying
                    explained = storage.explained_error(self.index.url, value)
                    if explained is value:
                        raise value
                    raise explained from value
            missing = list(failed)
            if missing:
                self.retried += len(missing)
                backoff.wait(f"reading {len(missing)} images under {self.index.url}", next(iter(failed.values())))
        return result

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def default_decode_threads() -> int:
    """This rank's share of the cores its process may run on (``LOCAL_WORLD_SIZE`` ranks share a host), at most
    ``MAX_DEFAULT_DECODE_THREADS``: beyond that the fetches, not the decoders, set the pace."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_DECODE_THREADS, cores // ranks_here))


def _decoded_or_error(blob: bytes | BaseException, resolution: int, channels: int) -> torch.Tensor | BaseException:
    if isinstance(blob, BaseException):
        return blob
    try:
        return decode_uint8(blob, resolution, channels)
    except DECODE_ERRORS as exc:
        return exc


def _bytes(gigabytes: float | None) -> int | None:
    return None if gigabytes is None else int(gigabytes * 1e9)
