"""A rank's image decoding: chunks of encoded images to one uint8 array, in the rank's process or beside it.

Three ways, the same pixels:

- ``inline``: the stream's own thread decodes (one core's worth, nothing to start);
- ``threads``: a pool in the rank's process. Pillow, simplejpeg and torch release the GIL while they work, so
  JPEGs decode on several cores; pyspng holds it, and every decode then competes with the training thread;
- ``processes``: worker processes, as NVlabs' training loop decodes in its DataLoader's workers. The rank's
  process only hands over bytes and receives pixel arrays, so its GIL stays with the training thread, which on a
  GPU needs it to launch kernels.

``decode_plan`` picks one from ``data.decode_processes``/``decode_threads`` and where the rank trains. A chunk
comes back as one (n, C, R, R) uint8 array (the rows of images that could not be decoded are zero, and say why),
so the stream assembles batches with a few tensor operations instead of per-image work.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Literal, NamedTuple

import numpy as np
import torch

from daskgan.data.decode import DECODE_ERRORS, decode_array

logger = logging.getLogger(__name__)

MAX_DEFAULT_DECODERS = 8  # beyond this, a rank's fetches rather than its decoders set the pace
PART = {"threads": 16, "processes": 64}  # images per task: a 64 px PNG decodes in ~20 us, so one task per image
#                                          would spend much of it handing work out (processes also pay a pickle)

DecodeKind = Literal["inline", "threads", "processes"]


class DecodePlan(NamedTuple):
    """How a rank decodes: the kind of worker and how many."""

    kind: DecodeKind
    workers: int


def decode_plan(decode_processes: int | None, decode_threads: int | None, on_gpu: bool) -> DecodePlan:
    """Processes when asked for (``decode_processes`` > 0) or, by default, when the rank trains on a GPU; else the
    thread pool of ``decode_threads``. Unset counts are the rank's share of its host's cores."""
    processes = decode_processes if decode_processes is not None else (rank_share_of_cores() if on_gpu else 0)
    if processes > 0:
        if not multiprocessing.current_process().daemon:
            return DecodePlan("processes", processes)
        logger.warning("data.decode_processes: this worker's process is daemonic and may not start processes; "
                       "decoding in threads (set distributed.worker.daemon: False on the workers to allow it)")
    threads = decode_threads or rank_share_of_cores()
    return DecodePlan("threads", threads) if threads > 1 else DecodePlan("inline", 1)


def rank_share_of_cores() -> int:
    """This rank's share of the cores its process may run on (``LOCAL_WORLD_SIZE`` ranks share a host), at most
    ``MAX_DEFAULT_DECODERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_DECODERS, cores // ranks_here))


@dataclass
class DecodedChunk:
    """A chunk's images, in the order given; ``failures`` maps a row whose image could not be decoded (its pixels
    are zero) to the reason."""

    images: torch.Tensor  # (n, C, R, R) uint8
    failures: dict[int, str]


class PendingChunk:
    """A chunk being decoded, in parts; ``result()`` waits for them and joins them."""

    def __init__(self, parts: list[Future]):
        self._parts = parts

    def result(self) -> DecodedChunk:
        arrays, failures, start = [], {}, 0
        for part in self._parts:
            try:
                array, failed = part.result()
            except BrokenProcessPool as error:
                raise RuntimeError("a decoding process died (out of memory?); set data.decode_processes: 0 to "
                                   "decode in threads") from error
            failures.update({start + row: why for row, why in failed.items()})
            arrays.append(array)
            start += len(array)
        return DecodedChunk(torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), failures)


class Decoder:
    """Decodes chunks of encoded images for one rank, as its ``DecodePlan`` says. ``close()`` it."""

    def __init__(self, plan: DecodePlan, resolution: int, channels: int, name: str = "daskgan-decode"):
        self.plan, self.resolution, self.channels = plan, resolution, channels
        self._pool: Executor | None = None
        self._blocks = None
        if plan.kind == "threads":
            self._pool = ThreadPoolExecutor(plan.workers, thread_name_prefix=name)
        elif plan.kind == "processes":  # spawned: forking a process that runs threads (Dask, torch) is unsafe
            self._pool = ProcessPoolExecutor(plan.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_torch_thread)
            self._blocks = _SharedBlocks(PART["processes"] * channels * resolution * resolution)

    def submit(self, blobs: list[bytes]) -> PendingChunk:
        """Start decoding ``blobs``; inline, they are decoded before this returns."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(decode_part(blobs, self.resolution, self.channels))
            return PendingChunk([done])
        size = PART[self.plan.kind]
        parts = [blobs[start:start + size] for start in range(0, max(len(blobs), 1), size)]
        if self._blocks is None:
            return PendingChunk([self._pool.submit(decode_part, part, self.resolution, self.channels)
                                 for part in parts])
        return PendingChunk([self._in_process(part) for part in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._blocks is not None:
            self._blocks.close()

    def _in_process(self, blobs: list[bytes]) -> Future:
        """Decode ``blobs`` in a worker process into a shared block; the future's array is a copy of the block
        (a pipe would carry the pixels at a fraction of memory's speed), and the block is free again."""
        block = self._blocks.take()
        decoding = self._pool.submit(decode_into_shared, block.name, blobs, self.resolution, self.channels)
        copied: Future = Future()

        def copy_out(done: Future) -> None:
            try:
                failures = done.result()
                shape = (len(blobs), self.channels, self.resolution, self.resolution)
                copied.set_result((np.ndarray(shape, np.uint8, block.buf).copy(), failures))
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits for the chunk
                copied.set_exception(error)
            finally:
                self._blocks.give_back(block)

        decoding.add_done_callback(copy_out)
        return copied


class _SharedBlocks:
    """Shared-memory blocks of one part's pixels, reused: a decoding process maps each once."""

    def __init__(self, size: int):
        self._size, self._free, self._all = size, [], []
        self._lock = threading.Lock()

    def take(self) -> shared_memory.SharedMemory:
        with self._lock:
            if self._free:
                return self._free.pop()
            block = shared_memory.SharedMemory(create=True, size=self._size)
            self._all.append(block)
            return block

    def give_back(self, block: shared_memory.SharedMemory) -> None:
        with self._lock:
            self._free.append(block)

    def close(self) -> None:
        for block in self._all:
            block.close()
            block.unlink()


_attached: dict[str, shared_memory.SharedMemory] = {}  # a decoding process's mappings of its rank's blocks


def decode_into_shared(name: str, blobs: list[bytes], resolution: int, channels: int) -> dict[int, str]:
    """``decode_part`` in a decoding process, the pixels written into the shared block ``name``."""
    if name not in _attached:
        _attached[name] = shared_memory.SharedMemory(name=name)
    images = np.ndarray((len(blobs), channels, resolution, resolution), np.uint8, _attached[name].buf)
    return decode_part(blobs, resolution, channels, out=images)[1]


def decode_part(blobs: list[bytes], resolution: int, channels: int,
                out: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Decode ``blobs`` into one (n, C, R, R) uint8 array (``out``, or a new one; zero rows for those that fail,
    with the reason)."""
    images = np.empty((len(blobs), channels, resolution, resolution), dtype=np.uint8) if out is None else out
    failures = {}
    for row, blob in enumerate(blobs):
        try:
            images[row] = decode_array(blob, resolution, channels)
        except DECODE_ERRORS as error:
            images[row] = 0
            failures[row] = f"{type(error).__name__}: {error}"
    return images, failures


def _one_torch_thread() -> None:
    """A decoding process resizes with torch on one thread: its siblings take the other cores."""
    torch.set_num_threads(1)
