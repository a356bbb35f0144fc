"""One rank's training batches, streamed from any fsspec URL and fetched ahead of the training step.

- ``ImageStream`` is an endless iterator of batches for one rank: a background thread keeps many objects being
  fetched at once, each on its own (a ``FetchWindow``: an image waiting for its retry holds up only itself), hands
  them a chunk at a time to the rank's decoder (threads or processes, see ``decode_pool``), and keeps a bounded
  queue of ready batches, so storage latency and decoding hide behind compute. Unreadable objects are skipped,
  counted and logged once.
- Its position (epoch, index within the rank's shard) is part of every batch, so a checkpoint can resume the
  stream exactly where it stopped.
- Tar shards are read whole, a window of them at a time, by a ``ShardReader`` (see ``shard_read``); the epoch's order
  is then the rank's windows', and a position mid-shard resumes as exactly.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from daskgan.config import DataConfig
from daskgan.data.cache import DiskCache
from daskgan.data.decode import to_unit_range
from daskgan.data.decode_pool import Decoder, PendingChunk, decode_plan
from daskgan.data.index import ImageIndex, Settled, fetch_objects, fetch_settled, shard_indices
from daskgan.data.shard_epochs import Window, epoch_windows
from daskgan.data.shard_read import ShardReader
from daskgan.data.window import FetchWindow
from daskgan.run import storage

logger = logging.getLogger(__name__)


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
                 start: StreamPosition = StreamPosition(), epochs: int | None = None, drop_last: bool = True,
                 on_gpu: bool = False):
        """``epochs``: stop after this many (endless without); ``drop_last``: whether an epoch's last batch, short
        of ``batch_size``, is dropped (training: every batch full) or delivered (a pass over every image);
        ``on_gpu``: the rank trains on a GPU (its images then decode in processes unless the job says otherwise)."""
        self.index = index
        self._epochs, self._drop_last, self._start_epoch = epochs, drop_last, start.epoch
        self.config = config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.skipped = 0  # distinct objects that could not be read or decoded
        self.images_read = 0
        self._fs, _ = storage.filesystem(index.url, storage.for_reading_many(index.url, config.storage_options))
        self._bad: set[int] = set()
        self._cache = DiskCache(config.cache_dir, _bytes(config.cache_max_gb)) if config.cache_dir else None
        self._reader = (ShardReader(self._fs, index.shards, index.entry_of, ahead=config.shuffle_shards)
                        if index.shards else None)
        self._fetcher = self._make_fetcher()
        self._planned: tuple[int, list[Window]] | None = None  # the last epoch's shard windows worked out
        plan = decode_plan(config.decode_processes, config.decode_threads, on_gpu,
                           image_bytes=config.channels * config.resolution ** 2)
        self._decoder = Decoder(plan, config.resolution, config.channels, name=f"daskgan-decode-rank{rank}")
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True,
                                        name=f"daskgan-prefetch-rank{rank}")
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        return self

    @property
    def unreadable(self) -> frozenset[int]:
        """The images (positions in the index) this rank has skipped: ``skipped`` of them."""
        return frozenset(self._bad)

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            if isinstance(item, StopIteration):
                self._queue.put(item)  # the stream stays ended
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._fetcher.close()  # wakes the producer if it waits for an image
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
        if self._reader is not None:
            self._reader.close()
        self._decoder.close()

    @property
    def retried(self) -> int:
        """Fetches tried again after a transient storage error."""
        return self._fetcher.retried

    def _make_fetcher(self) -> FetchWindow | _FetchNow:
        """Objects and zip members: a window of ``fetch_batch`` single fetches; tar shards: the chunk's members,
        from the shards a ``ShardReader`` reads whole (it keeps its own window of shard GETs)."""
        tries = self.config.retry_tries * storage.CLIENT_ATTEMPTS_PER_TRY
        if self._reader is not None:
            return _FetchNow(self.index.url, self._reader.read, tries, self.config.retry_seconds)
        return FetchWindow(self.index.url, functools.partial(fetch_objects, self.index, self._fs),
                           self.config.fetch_batch or self.config.batch_size, tries, self.config.retry_seconds)

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
        """Emit the epoch's full batches from ``offset`` on (the tail that does not fill a batch is dropped, unless
        ``drop_last`` is off).

        Chunks of ``data.fetch_batch`` entries are requested from the fetcher up to ``AHEAD_CHUNKS`` ahead of the
        one being decoded, and handed to the decoder one ahead of the chunk being batched, so fetching, decoding
        and batching overlap, and images waiting for a retry hold up no fetch behind them. With ``data.mirror``
        the epoch holds every image twice, entries n.. being the x-flipped copies (NVlabs' ``--mirror``); an
        image fetched for one copy serves both."""
        order = self._epoch_order(epoch, offset)
        chunk_size = self.config.fetch_batch or self.config.batch_size
        ahead = AHEAD_CHUNKS * chunk_size if isinstance(self._fetcher, FetchWindow) else 0
        waiting, requested, decoding, emitted = _Rows(), deque(), deque(), offset > 0
        while (offset < len(order) or requested or decoding) and not self._stop.is_set():
            while offset < len(order) and (not requested or len(self._fetcher) < ahead):
                requested.append(self._request_chunk(order[offset:offset + chunk_size], offset))
                offset = min(offset + chunk_size, len(order))
            if requested:
                decoding.append(self._decode_chunk(requested.popleft()))
            if len(decoding) > 1 or (offset >= len(order) and not requested):
                waiting.add(*self._finish_chunk(decoding.popleft()))
                while len(waiting) >= self.config.batch_size:
                    self._put(waiting.take(self.config.batch_size, epoch))
                    emitted = True
        if len(waiting) and not self._drop_last and not self._stop.is_set():
            self._put(waiting.take(len(waiting), epoch))
            emitted = True
        return emitted

    def _epoch_order(self, epoch: int, offset: int) -> list[int]:
        """The images this rank reads in ``epoch`` (mirrored copies from ``len(index)`` on); for tar shards, the
        order of its windows, whose reading starts at the one holding ``offset``."""
        count = len(self.index) * (2 if self.config.mirror else 1)
        if self._reader is None:
            return shard_indices(count, self.rank, self.world_size, epoch, self.seed, self.config.shuffle)
        windows = self._windows(epoch)
        last = self._epochs is not None and epoch + 1 >= self._start_epoch + self._epochs
        self._reader.plan(windows, offset, then=() if last else self._windows(epoch + 1)[0].shards)
        return [image for window in windows for image in window.order]

    def _windows(self, epoch: int) -> list[Window]:
        """``epoch_windows`` of this rank, kept for the last epoch asked: each epoch's windows are first worked out
        for the previous epoch's look ahead (a permutation of every image of the rank's shards)."""
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, epoch_windows(self.index.shard_images, self.rank, self.world_size, epoch,
                                                  self.seed, self.config.shuffle_shards, self.config.shuffle,
                                                  self.config.mirror))
        return self._planned[1]

    def _request_chunk(self, entries: list[int], first: int) -> _Requested:
        """Ask for the images of epoch entries ``first``.. (those not known to be unreadable), from the local
        cache or the fetcher, in the order the entries first name them (so a chunk without mirrored copies or
        failures needs no reordering)."""
        count = len(self.index)
        images = [i for i in dict.fromkeys(entry % count for entry in entries) if i not in self._bad]
        cached = {}
        if self._cache is not None:
            for image in images:
                data = self._cache.read(self._cache_key(image), self.index.size_of.get(self.index.paths[image], 0))
                if data is not None:
                    cached[image] = data
        missing = [i for i in images if i not in cached]
        return _Requested(entries, first, images, cached, missing,
                          self._fetcher.request([self.index.paths[i] for i in missing]))

    def _decode_chunk(self, chunk: _Requested) -> _Chunk:
        """Wait for the chunk's images (only those) and start decoding the readable ones; fetched ones are
        cached."""
        fetched = {**chunk.cached, **dict(zip(chunk.missing, self._fetcher.take(chunk.tickets)))}
        if self._cache is not None:
            for image in chunk.missing:
                if isinstance(fetched[image], bytes):
                    self._cache.write(self._cache_key(image), fetched[image],
                                      self.index.size_of.get(self.index.paths[image], 0))
        readable = [i for i in chunk.images if isinstance(fetched[i], bytes)]
        unreadable = {i: _reason(fetched[i]) for i in chunk.images if not isinstance(fetched[i], bytes)}
        return _Chunk(chunk.entries, chunk.first, readable, unreadable,
                      self._decoder.submit([fetched[i] for i in readable]))

    def _cache_key(self, image: int) -> str:
        return self.index.object_key(self.index.paths[image])

    def _finish_chunk(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The chunk's images in entry order (flipped for mirrored entries), their labels and the epoch offset
        after each; unreadable images are marked bad, counted and logged once."""
        decoded = chunk.decoding.result()
        unreadable = {**chunk.unreadable, **{chunk.readable[row]: why for row, why in decoded.failures.items()}}
        for image, why in unreadable.items():
            self._note_unreadable(image, why)
        row_of = {image: row for row, image in enumerate(chunk.readable) if row not in decoded.failures}
        self.images_read += len(row_of)
        count = len(self.index)
        kept = [(n, entry) for n, entry in enumerate(chunk.entries, chunk.first) if entry % count in row_of]
        rows = [row_of[entry % count] for _, entry in kept]
        images = decoded.images
        if rows != list(range(len(images))):
            images = images.index_select(0, torch.tensor(rows, dtype=torch.long))
        mirrored = torch.tensor([entry >= count for _, entry in kept], dtype=torch.bool)
        if mirrored.any():
            images[mirrored] = images[mirrored].flip(-1)
        labels = torch.tensor([self.index.labels[entry % count] for _, entry in kept], dtype=torch.long)
        return images, labels, [n + 1 for n, _ in kept]

    def _note_unreadable(self, image: int, why: str) -> None:
        """A vanished object, a corrupt archive member or not an image: skipped from now on, counted once."""
        if image in self._bad:
            return
        self._bad.add(image)
        self.skipped += 1
        logger.warning("skipping unreadable image %s (%s); %d skipped so far", self.index.paths[image], why,
                       self.skipped)

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


AHEAD_CHUNKS = 4  # chunks of images being fetched ahead of the one being decoded (a window of objects)


class _FetchNow:
    """The fetcher of tar-shard members: a chunk's images fetched when requested (retrying the failed ones
    after a backoff), taken as they are."""

    def __init__(self, url: str, read: Callable[[list[str]], dict], tries: int, seconds: float):
        self._url, self._read, self._tries, self._seconds = url, read, tries, seconds
        self.retried = 0

    def __len__(self) -> int:
        return 0

    def request(self, paths: list[str]) -> list[Settled]:
        fetched, retried = fetch_settled(self._url, self._read, paths, storage.Backoff(self._tries, self._seconds))
        self.retried += retried
        return [fetched[path] for path in paths]

    def take(self, fetched: list[Settled]) -> list[Settled]:
        return fetched

    def close(self) -> None:
        pass


@dataclass
class _Requested:
    """Epoch entries ``first``.. asked for: their images, those read from the local cache, and the fetcher's
    tickets for the others (``missing``)."""

    entries: list[int]
    first: int
    images: list[int]
    cached: dict[int, bytes]
    missing: list[int]
    tickets: list


@dataclass
class _Chunk:
    """Epoch entries ``first``.. on their way: the images being decoded (in ``readable`` order) and those that could
    not be fetched (vanished, or a corrupt archive member), with the reason."""

    entries: list[int]
    first: int
    readable: list[int]
    unreadable: dict[int, str]
    decoding: PendingChunk


class _Rows:
    """Decoded images waiting to fill a batch, with their labels and the epoch offset after each."""

    def __init__(self):
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, images: torch.Tensor, labels: torch.Tensor, ends: list[int]) -> None:
        if ends:
            self._images.append(images)
            self._labels.append(labels)
            self._ends += ends

    def take(self, size: int, epoch: int) -> Batch:
        """The first ``size`` rows as a batch, positioned right after its last entry (a view when they lie in one
        decoded chunk, else one copy of the batch)."""
        images, labels, needed = [], [], size
        while needed:
            images.append(self._images[0][:needed])
            labels.append(self._labels[0][:needed])
            self._images[0], self._labels[0] = self._images[0][needed:], self._labels[0][needed:]
            needed -= len(images[-1])
            if not len(self._images[0]):
                del self._images[0], self._labels[0]
        position = StreamPosition(epoch, self._ends[size - 1])
        self._ends = self._ends[size:]
        return Batch(*(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (images, labels)), position)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _bytes(gigabytes: float | None) -> int | None:
    return None if gigabytes is None else int(gigabytes * 1e9)
