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
THREAD_PART = 16  # images per task of a thread pool: a 64 px PNG decodes in ~20 us, so one task per image would
#                   spend much of it handing work out
PROCESS_PART_BYTES = 8 * 2**20  # pixels per task of a decoding process (and per shared block): up to 64 images of
#                                 64 px, 42 of 256 px (fewer, and a process waits for its next task between
#                                 parts: at 5 images of 256 px a part, two processes decoded at half the rate)
MAX_PROCESS_PART = 64
BLOCKS_PER_PROCESS = 2  # one being decoded into while the last part's pixels are copied out
SHARED_MEMORY = "/dev/shm"

DecodeKind = Literal["inline", "threads", "processes"]


class DecodePlan(NamedTuple):
    """How a rank decodes: the kind of worker, how many, and how many images each task takes."""

    kind: DecodeKind
    workers: int
    part: int


def decode_plan(decode_processes: int | None, decode_threads: int | None, on_gpu: bool, image_bytes: int,
                shared_memory_free: int | None = None) -> DecodePlan:
    """Processes when asked for (``decode_processes`` > 0) or, by default, when the rank trains on a GPU; else the
    thread pool of ``decode_threads``. Unset counts are the rank's share of its host's cores. Processes need a
    non-daemonic worker and room for their blocks in half of ``/dev/shm``'s free space (a container's is often
    64 MB); without either they give way to threads, with a warning saying why."""
    processes = decode_processes if decode_processes is not None else (rank_share_of_cores() if on_gpu else 0)
    if processes > 0 and multiprocessing.current_process().daemon:
        logger.warning("data.decode_processes: this worker's process is daemonic and may not start processes; "
                       "decoding in threads (set distributed.worker.daemon: False on the workers to allow it)")
    elif processes > 0:
        free = shared_memory_free if shared_memory_free is not None else _shared_memory_free()
        block = min(PROCESS_PART_BYTES, free // 2 // (BLOCKS_PER_PROCESS * processes))
        if block >= image_bytes:
            return DecodePlan("processes", processes, min(MAX_PROCESS_PART, block // image_bytes))
        logger.warning("data.decode_processes: %s has %d MiB free, too little for %d decoding processes' blocks of "
                       "%d-byte images; decoding in threads (give the workers a larger %s, e.g. a Kubernetes "
                       "emptyDir with medium: Memory)", SHARED_MEMORY, free // 2**20, processes, image_bytes,
                       SHARED_MEMORY)
    threads = decode_threads or rank_share_of_cores()
    return DecodePlan("threads", threads, THREAD_PART) if threads > 1 else DecodePlan("inline", 1, 0)


def rank_share_of_cores() -> int:
    """This rank's share of the cores its process may run on (``LOCAL_WORLD_SIZE`` ranks share a host), at most
    ``MAX_DEFAULT_DECODERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_DEFAULT_DECODERS, cores // ranks_here))


def _shared_memory_free() -> int:
    """Bytes free in ``/dev/shm``; where there is none (macOS), shared memory is not a filesystem's to bound."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return 2**62
    return stats.f_bavail * stats.f_frsize


@dataclass
class DecodedChunk:
    """A chunk's images, in the order given; ``failures`` maps a row whose image could not be decoded (its pixels
    are zero) to the reason."""

    images: torch.Tensor  # (n, C, R, R) uint8
    failures: dict[int, str]


class PendingChunk:
    """A chunk being decoded into one array, in parts; ``result()`` waits for them."""

    def __init__(self, images: np.ndarray, parts: list[tuple[int, Future]]):
        self._images, self._parts = images, parts

    def result(self) -> DecodedChunk:
        failures = {}
        for start, part in self._parts:
            try:
                failures.update({start + row: why for row, why in part.result().items()})
            except BrokenProcessPool as error:
                raise DecoderDied() from error
        return DecodedChunk(torch.from_numpy(self._images), failures)


class DecoderDied(RuntimeError):
    """A decoding process was killed (most often for memory): the rank's stream cannot go on."""

    def __init__(self):
        super().__init__("a decoding process died (out of memory?); give the workers more memory or set "
                         "data.decode_processes: 0 to decode in threads")


class Decoder:
    """Decodes chunks of encoded images for one rank, as its ``DecodePlan`` says. ``close()`` it."""

    def __init__(self, plan: DecodePlan, resolution: int, channels: int, name: str = "daskgan-decode"):
        self.plan, self.resolution, self.channels = plan, resolution, channels
        self._pool: Executor | None = None
        self._blocks: _SharedBlocks | None = None
        if plan.kind == "threads":
            self._pool = ThreadPoolExecutor(plan.workers, thread_name_prefix=name)
        elif plan.kind == "processes":  # spawned: forking a process that runs threads (Dask, torch) is unsafe
            self._pool = ProcessPoolExecutor(plan.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_torch_thread)
            self._blocks = _SharedBlocks(plan.part * channels * resolution * resolution,
                                         count=BLOCKS_PER_PROCESS * plan.workers)

    def submit(self, blobs: list[bytes]) -> PendingChunk:
        """Start decoding ``blobs`` into one (n, C, R, R) uint8 array; inline, it is done before this returns."""
        images = np.empty((len(blobs), self.channels, self.resolution, self.resolution), dtype=np.uint8)
        if self._pool is None:
            done: Future = Future()
            done.set_result(decode_part(blobs, images))
            return PendingChunk(images, [(0, done)])
        decode = self._in_process if self._blocks is not None else self._in_thread
        part = self.plan.part
        return PendingChunk(images, [(start, decode(blobs[start:start + part], images[start:start + part]))
                                     for start in range(0, len(blobs), part)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._blocks is not None:
            self._blocks.close()

    def _in_thread(self, blobs: list[bytes], out: np.ndarray) -> Future:
        return self._pool.submit(decode_part, blobs, out)

    def _in_process(self, blobs: list[bytes], out: np.ndarray) -> Future:
        """Decode ``blobs`` in a worker process into a shared block, then copy them to ``out`` (a pipe would carry
        the pixels at a fraction of memory's speed) and free the block for the next part."""
        block = self._blocks.take()
        try:
            decoding = self._pool.submit(decode_into_shared, block.name, blobs, out.shape)
        except BrokenProcessPool as error:
            self._blocks.give_back(block)
            raise DecoderDied() from error
        copied: Future = Future()

        def copy_out(done: Future) -> None:
            try:
                failures = done.result()
                out[...] = np.ndarray(out.shape, np.uint8, block.buf)
                copied.set_result(failures)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits for the chunk
                copied.set_exception(error)
            finally:
                self._blocks.give_back(block)

        decoding.add_done_callback(copy_out)
        return copied


class _SharedBlocks:
    """A few shared-memory blocks of one part's pixels, reused: each is mapped and first touched once per decoding
    process. ``take`` waits for a free one."""

    def __init__(self, size: int, count: int):
        self._size, self._count, self._free, self._all = size, count, [], []
        self._available = threading.Condition()

    def take(self) -> shared_memory.SharedMemory:
        with self._available:
            while not self._free and len(self._all) >= self._count:
                self._available.wait()
            if self._free:
                return self._free.pop()
            block = shared_memory.SharedMemory(create=True, size=self._size)
            self._all.append(block)
            return block

    def give_back(self, block: shared_memory.SharedMemory) -> None:
        with self._available:
            self._free.append(block)
            self._available.notify()

    def close(self) -> None:
        for block in self._all:
            block.close()
            block.unlink()


_attached: dict[str, shared_memory.SharedMemory] = {}  # a decoding process's mappings of its rank's blocks


def decode_into_shared(name: str, blobs: list[bytes], shape: tuple[int, ...]) -> dict[int, str]:
    """``decode_part`` in a decoding process, the (n, C, R, R) pixels written into the shared block ``name``."""
    if name not in _attached:
        _attached[name] = shared_memory.SharedMemory(name=name)
    return decode_part(blobs, np.ndarray(shape, np.uint8, _attached[name].buf))


def decode_part(blobs: list[bytes], out: np.ndarray) -> dict[int, str]:
    """Decode ``blobs`` into the rows of ``out``, an (n, C, R, R) uint8 array; a row whose image cannot be decoded
    is zeroed and its reason returned."""
    _, channels, resolution, _ = out.shape
    failures = {}
    for row, blob in enumerate(blobs):
        try:
            out[row] = decode_array(blob, resolution, channels)
        except DECODE_ERRORS as error:
            out[row] = 0
            failures[row] = f"{type(error).__name__}: {error}"
    return failures


def _one_torch_thread() -> None:
    """A decoding process resizes with torch on one thread: its siblings take the other cores."""
    torch.set_num_threads(1)
