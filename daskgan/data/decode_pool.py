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

import contextlib
import itertools
import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Literal, NamedTuple, Protocol

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


class _Part(Protocol):
    """A part of a chunk being decoded: ``result()`` waits for it and gives its failures by row."""

    def result(self) -> dict[int, str]: ...


class PendingChunk:
    """A chunk being decoded into one array, in parts; ``result()`` waits for them."""

    def __init__(self, images: np.ndarray, parts: list[tuple[int, _Part]]):
        self._images, self._parts = images, parts

    def result(self) -> DecodedChunk:
        failures = {}
        for start, part in self._parts:
            failures.update({start + row: why for row, why in part.result().items()})
        return DecodedChunk(torch.from_numpy(self._images), failures)


class DecoderDied(RuntimeError):
    """A decoding process was killed (most often for memory): the rank's stream cannot go on."""

    def __init__(self):
        super().__init__("a decoding process died (out of memory?); give the workers more memory or set "
                         "data.decode_processes: 0 to decode in threads")


class Decoder:
    """Decodes chunks of encoded images for one rank, as its ``DecodePlan`` says. One thread submits and waits for
    chunks; ``close()`` it."""

    def __init__(self, plan: DecodePlan, resolution: int, channels: int, name: str = "daskgan-decode"):
        self.plan, self.resolution, self.channels = plan, resolution, channels
        self._threads: ThreadPoolExecutor | None = None
        self._processes: list[_DecodingProcess] = []
        if plan.kind == "threads":
            self._threads = ThreadPoolExecutor(plan.workers, thread_name_prefix=name)
        elif plan.kind == "processes":
            block_size = plan.part * channels * resolution * resolution
            self._processes = [_DecodingProcess(f"{name}-{n}", block_size) for n in range(plan.workers)]
        self._next_process = itertools.cycle(self._processes)  # parts take turns: each process decodes its share

    def submit(self, blobs: list[bytes]) -> PendingChunk:
        """Start decoding ``blobs`` into one (n, C, R, R) uint8 array; inline, it is done before this returns."""
        images = np.empty((len(blobs), self.channels, self.resolution, self.resolution), dtype=np.uint8)
        if self.plan.kind == "inline":
            done: Future = Future()
            done.set_result(decode_part(blobs, images))
            return PendingChunk(images, [(0, done)])
        part = self.plan.part
        return PendingChunk(images, [(start, self._submit_part(blobs[start:start + part], images[start:start + part]))
                                     for start in range(0, len(blobs), part)])

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        for process in self._processes:
            process.close()

    def _submit_part(self, blobs: list[bytes], out: np.ndarray) -> _Part:
        if self._threads is not None:
            return self._threads.submit(decode_part, blobs, out)
        return next(self._next_process).submit(blobs, out)


class _DecodingProcess:
    """A spawned decoding process with a pipe of its own: parts go in and their failures come back in order, and
    the pixels come through one of its ``BLOCKS_PER_PROCESS`` reused shared-memory blocks (a pipe would carry them
    at a fraction of memory's speed). The rank's thread talks to it directly: a process pool's manager and feeder
    threads each needed the rank's GIL to pass a part on, and its decoders waited for work over half the time."""

    def __init__(self, name: str, block_size: int):
        context = multiprocessing.get_context("spawn")  # forking a process that runs threads (Dask, torch) is unsafe
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_serve_parts, args=(child_end,), name=name, daemon=True)
        self._process.start()
        child_end.close()  # the child's death then ends the pipe for the rank
        self._blocks = [shared_memory.SharedMemory(create=True, size=block_size) for _ in range(BLOCKS_PER_PROCESS)]
        self._free = list(self._blocks)
        self._in_flight: deque[_ProcessPart] = deque()

    def submit(self, blobs: list[bytes], out: np.ndarray) -> _ProcessPart:
        """Send a part to decode into a free block (waiting for the oldest part in flight when none is)."""
        if not self._free:
            self.collect_oldest()
        part = _ProcessPart(self, self._free.pop(), out)
        try:
            self._pipe.send((part.block.name, blobs, out.shape))
        except OSError as error:
            raise DecoderDied() from error
        self._in_flight.append(part)
        return part

    def collect_oldest(self) -> None:
        """Wait for the oldest part in flight, copy its pixels out and free its block."""
        part = self._in_flight.popleft()
        try:
            answer = self._pipe.recv()
        except (EOFError, OSError) as error:
            raise DecoderDied() from error
        finally:
            self._free.append(part.block)
        if isinstance(answer, BaseException):
            raise answer
        part.out[...] = np.ndarray(part.out.shape, np.uint8, part.block.buf)
        part.failures = answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._pipe.close()
        for block in self._blocks:
            block.close()
            block.unlink()


@dataclass
class _ProcessPart:
    """A part sent to a decoding process: the block it decodes into, where its pixels go, and, once collected, its
    failures."""

    process: _DecodingProcess
    block: shared_memory.SharedMemory
    out: np.ndarray
    failures: dict[int, str] | None = None

    def result(self) -> dict[int, str]:
        while self.failures is None:
            self.process.collect_oldest()
        return self.failures


def _serve_parts(pipe: Connection) -> None:
    """A decoding process: decode each part that comes down the pipe into the shared block it names, answer with
    its failures (or the error that stopped it), until the rank says ``None`` or goes away."""
    torch.set_num_threads(1)  # its siblings take the other cores
    attached: dict[str, shared_memory.SharedMemory] = {}
    while True:
        try:
            request = pipe.recv()
        except EOFError:
            return
        if request is None:
            return
        name, blobs, shape = request
        try:
            if name not in attached:
                attached[name] = shared_memory.SharedMemory(name=name)
            answer: dict[int, str] | BaseException = decode_part(blobs, np.ndarray(shape, np.uint8,
                                                                                    attached[name].buf))
        except Exception as error:  # noqa: BLE001 - handed to the rank, which raises it
            answer = error
        pipe.send(answer)


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

