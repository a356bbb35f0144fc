"""Run a function on every Dask worker as one PyTorch DDP process group.

Same public shape as dask-pytorch-ddp's ``dispatch.run(client, fn, *args, backend=..., **kwargs)``, which no longer
works reliably with current ``distributed``: it hard-codes MASTER_PORT 23456 (back-to-back runs collide), sets no
LOCAL_RANK, and its own parameter names collide with positional ``*args``. Here each call picks a free port on rank
0's host, ``client`` and ``fn`` are positional-only, and a rank that fails tears its process group down so that the
other ranks fail fast instead of waiting in a collective. A rank that stops on a ``daskgan.errors.UserError`` (a
missing bucket, a checkpoint of another model) reports it as its result, not as a task failure, so the workers
print no traceback for a mistake in the input; ``results`` raises it on the client all the same.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import time
import traceback
import uuid
from collections import Counter
from typing import Any, Callable

from distributed import Client, Future, Variable, wait
from distributed.comm import get_address_host

from daskgan.devices import GpuView, assign_devices, check_no_shared_gpu, gpu_view
from daskgan.errors import FailureKind, UserError, WorkerLost, failure_kind, first_line

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# The least time the ranks get to meet at the rendezvous, whatever shorter timeout bounds their collectives: on a
# loaded host a worker can take seconds to start its rank, and gloo's connection wait took the collectives' timeout.
RENDEZVOUS_MIN_S = 60.0
POLL_SECONDS = 2.0  # how often a wait looks for lost workers
FAILURE_GRACE_S = 10.0  # after a rank fails, how long the others may take to fail or finish before being cancelled
SETTLING_POLL_S = 0.5  # how often that wait looks


class RankFailure:
    """What a rank returns instead of raising when the input is at fault (the error is raised on the client)."""

    def __init__(self, error: UserError):
        self.error = error


RANK_KEY_PREFIX = "ddp-"  # task keys of ranks: ddp-<function name>-<dispatch id>-rank-<rank>


def is_rank_of(key: Any, function_name: str) -> bool:
    """Whether the task ``key`` is a rank that ``run`` dispatched for a function named ``function_name``."""
    return isinstance(key, str) and key.startswith(f"{RANK_KEY_PREFIX}{function_name}-")


class RankFutures(list):
    """The futures of one dispatch, index = rank, remembering the worker each rank is pinned to."""

    def __init__(self, futures: list[Future], workers: list[str]):
        super().__init__(futures)
        self.workers = workers

    def lost_ranks(self) -> list[int]:
        """Ranks whose worker is no longer in the cluster (their task can never finish: it is pinned there)."""
        if not self:
            return []
        present = set(worker_addresses(self[0].client))
        return [rank for rank, (future, worker) in enumerate(zip(self, self.workers))
                if not future.done() and worker not in present]


def run(
    client: Client,
    fn: Callable[..., Any],
    /,
    *args: Any,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    pass_local_rank: bool = False,
    workers: list[str] | None = None,
    master_port: int | None = None,
    **kwargs: Any,
) -> RankFutures:
    """Start ``fn(*args, **kwargs)`` once on each worker, inside an initialised process group.

    Returns one future per rank (index = rank), as a list that also knows each rank's worker. ``backend`` defaults
    to ``nccl`` when the worker has CUDA, else ``gloo``. ``timeout`` bounds every collective, so a lost rank cannot
    hang the others forever, and the rendezvous (given at least ``RENDEZVOUS_MIN_S``). First every worker must have
    a free thread (a cancelled rank of an earlier dispatch runs on until its own collectives time out): waited for
    up to ``DEFAULT_TIMEOUT_S`` or ``timeout``, whichever is longer.
    With ``pass_local_rank`` the function also receives ``local_rank=`` (its index among workers on the same host).
    Rank 0 opens the rendezvous on ``master_port`` (for clusters that open only some ports) or, if that is taken
    or not given, on a port the system picks, and tells the other ranks through the scheduler: no port can be
    taken between choosing and binding it.
    """
    addresses = sorted(workers or worker_addresses(client))
    if not addresses:
        raise RuntimeError("the Dask cluster has no workers; start some before dispatching")
    _wait_for_free_threads(client, addresses, max(timeout, DEFAULT_TIMEOUT_S))
    master_addr = get_address_host(addresses[0])
    local_ranks = _local_ranks(addresses)
    ranks_per_host = Counter(get_address_host(address) for address in addresses)
    devices = _device_indices(client, addresses)
    dispatch_id = uuid.uuid4().hex[:12]  # task keys of one dispatch; a port may be reused by a later one
    logger.info("dispatching %s to %d ranks, rendezvous at %s", getattr(fn, "__name__", fn), len(addresses),
                master_addr)
    return RankFutures([
        client.submit(
            _run_rank, fn, args, kwargs,
            rank=rank, world_size=len(addresses), local_rank=local_ranks[rank],
            local_world_size=ranks_per_host[get_address_host(address)], device_index=devices[rank],
            master_addr=master_addr, master_port=master_port, backend=backend, timeout=timeout,
            pass_local_rank=pass_local_rank, rendezvous=f"daskgan-rendezvous-{dispatch_id}",
            workers=[address], allow_other_workers=False, pure=False,
            key=f"{RANK_KEY_PREFIX}{getattr(fn, '__name__', 'fn')}-{dispatch_id}-rank-{rank}",
        )
        for rank, address in enumerate(addresses)
    ], addresses)


def _wait_for_free_threads(client: Client, addresses: list[str], timeout: float) -> None:
    """Wait until every worker has a thread for its rank. A cancelled rank of an earlier dispatch (one that
    failed) runs on until it returns, holding its thread: a rank queued behind it would start only then, long
    after its peers gave up at the rendezvous."""
    deadline = time.monotonic() + timeout
    while busy := [address for address, free in client.run(_free_threads, workers=addresses).items() if free < 1]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {', '.join(busy)} still run earlier tasks after {timeout:.0f}s; "
                               "their ranks cannot start")
        logger.info("waiting for tasks of an earlier dispatch to end on %s", ", ".join(busy))
        time.sleep(POLL_SECONDS)


def _free_threads(dask_worker: Any) -> int:
    """On a worker: its threads not running a task (cancelled tasks still running count as running)."""
    return dask_worker.state.nthreads - dask_worker.state.executing_count


def results(futures: RankFutures, timeout: float | None = None, grace: float = FAILURE_GRACE_S) -> list[Any]:
    """Wait for every rank; return their results, or raise the failure that came first (it names its rank).

    When one rank fails, the others fail moments later with "connection closed by peer": consequences, not the
    cause. So after the first failure the other ranks get ``grace`` seconds to finish, and the exception raised
    earliest on the workers is the one re-raised here; ranks still running after that are cancelled. If a rank's
    worker left the cluster, ``WorkerLost`` is raised instead: the cause is the lost worker, not any exception;
    likewise (``confirmed=False``) when every failed rank lost its connection to peers while others went silent.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if has_failed(futures):
            _raise_the_cause(futures, grace)
        if all(f.done() for f in futures):
            return [f.result() for f in futures]  # has_failed was false: no RankFailure among them
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"ranks still running after {timeout:.0f}s")
        _wait_some(futures, POLL_SECONDS)


def has_failed(futures: RankFutures) -> bool:
    """Whether any rank raised, reported a failure or lost its worker (the run cannot complete as dispatched)."""
    return bool(_failures(futures)) or bool(futures.lost_ranks())


def _failures(futures: RankFutures) -> list[BaseException]:
    """The exceptions of ranks that raised, and the errors of ranks that reported a ``RankFailure``."""
    failures = []
    for future in futures:
        if future.status == "error":
            failures.append(future.exception())
        elif future.status == "finished" and isinstance(value := future.result(), RankFailure):
            failures.append(value.error)
    return failures


def _raise_the_cause(futures: RankFutures, grace: float) -> None:
    """After a failure: let the other ranks finish (up to ``grace`` s), cancel the rest and raise the cause."""
    deadline = time.monotonic() + grace
    lost = futures.lost_ranks()
    while not lost and time.monotonic() < deadline and not all(f.done() for f in futures):
        _wait_some(futures, SETTLING_POLL_S)
        lost = futures.lost_ranks()
    silent = [rank for rank, future in enumerate(futures) if not future.done()]
    for future in futures:
        if not future.done():
            future.cancel()
    if lost:
        raise WorkerLost(lost, [futures.workers[r] for r in lost])
    failures = _failures(futures)
    first = min(failures, key=lambda error: getattr(error, "failed_at", float("inf")))
    if silent and all(failure_kind(error) is FailureKind.PEER for error in failures):
        evidence = f"rank {getattr(first, 'rank', '?')}: {first_line(first)}"
        raise WorkerLost(silent, [futures.workers[r] for r in silent], confirmed=False, evidence=evidence) from first
    raise first


def _wait_some(futures: list[Future], seconds: float) -> None:
    """Block until a pending future finishes or ``seconds`` pass (distributed's wait raises on the latter)."""
    try:
        wait([f for f in futures if not f.done()], timeout=seconds, return_when="FIRST_COMPLETED")
    except TimeoutError:
        pass


def _run_rank(fn, args, kwargs, *, rank: int, world_size: int, local_rank: int, local_world_size: int,
              device_index: int | None,
              master_addr: str, master_port: int | None, backend: str | None, timeout: float, pass_local_rank: bool,
              rendezvous: str) -> Any:
    import torch
    import torch._dynamo  # noqa: F401  before the process group: see below
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout  # torch's own setter, for gloo and nccl

    # torch._inductor, first imported when DDP wraps a model, keeps a reference to a process group that exists
    # at its import: destroying the group then leaves its connections open, and a peer blocked in an all-reduce
    # learns that this rank failed only at the collective timeout (minutes) instead of at once.
    meeting = datetime.timedelta(seconds=max(timeout, RENDEZVOUS_MIN_S))
    store = _rendezvous_store(rank, master_addr, master_port, rendezvous, meeting)
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(store.port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world_size))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if device_index is not None:
        torch.cuda.set_device(device_index)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=meeting)
    if meeting.total_seconds() > timeout:  # the collectives keep the caller's shorter timeout
        _set_pg_timeout(datetime.timedelta(seconds=timeout))
    try:
        if torch.cuda.is_available():
            check_no_shared_gpu(device_index)
        return fn(*args, **kwargs, **({"local_rank": local_rank} if pass_local_rank else {}))
    except BaseException as exc:
        exc.failed_at = time.time()
        exc.rank = rank
        exc.add_note(f"(raised on DDP rank {rank} of {world_size})")
        _release_frames(exc)
        _shorten_traceback(exc)
        if isinstance(exc, UserError):
            return RankFailure(exc)
        raise
    finally:
        # Closing our connections makes peers blocked in a collective fail now rather than at the timeout.
        dist.destroy_process_group()
        if rank == 0:
            Variable(rendezvous).delete()


def _release_frames(exc: BaseException) -> None:
    """Drop the local variables of the frames ``exc`` was raised through, keeping its traceback's lines.

    Dask keeps a failed task's exception, and with it every frame of its traceback: a training loop's frame holds
    its DDP model, whose reducer holds the process group, so destroying the group would not close its
    connections."""
    traceback.clear_frames(exc.__traceback__)
    for chained in (exc.__cause__, exc.__context__):
        if chained is not None and chained.__traceback__ is not None:
            traceback.clear_frames(chained.__traceback__)
    gc.collect()  # a module graph has reference cycles: free the group now, not at the next collection


TRACEBACK_ENDS = 25  # frames kept at each end of a longer traceback of a rank's error


def _shorten_traceback(exc: BaseException) -> None:
    """Keep the first and last ``TRACEBACK_ENDS`` frames of a longer traceback (where the error started and where it
    was raised). Distributed pickles a failed task's error with its traceback: a RecursionError's thousand frames
    cannot be, and the client then saw a lost worker instead of the error. The errors it was raised from too."""
    for error in (exc, exc.__cause__, exc.__context__):
        frames, tb = [], error.__traceback__ if error is not None else None
        while tb is not None:
            frames.append(tb)
            tb = tb.tb_next
        if len(frames) > 2 * TRACEBACK_ENDS:
            frames[TRACEBACK_ENDS - 1].tb_next = frames[-TRACEBACK_ENDS]


def _rendezvous_store(rank: int, host: str, port: int | None, name: str, timeout: datetime.timedelta):
    """The process group's key-value store: rank 0 serves it and publishes its port in the Dask variable
    ``name``; the other ranks read the port there and connect."""
    import torch.distributed as dist

    if rank != 0:
        port = int(Variable(name).get(timeout=timeout.total_seconds()))
        return dist.TCPStore(host, port, is_master=False, timeout=timeout)
    try:
        store = dist.TCPStore(host, port or 0, is_master=True, wait_for_workers=False, timeout=timeout)
    except (RuntimeError, OSError) as error:  # torch's DistNetworkError: the port is in use
        if not port:
            raise
        logger.warning("rendezvous port %d on %s is taken (%s); using one the system picks", port, host,
                       first_line(error))
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
    Variable(name).set(store.port)
    return store


def worker_addresses(client: Client) -> list[str]:
    """Addresses of every worker the scheduler knows now (not only the first page of a large cluster).

    Asked of the scheduler, not read from ``client.scheduler_info()``: that returns a cache the client's own
    periodic refresh overwrites with a worker-less identity, so it can come back empty under load.
    """
    return list(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


def _device_indices(client: Client, addresses: list[str]) -> list[int | None]:
    """Each rank's CUDA device (None without GPUs), decided host by host from what its workers see."""
    views = client.run(gpu_view, workers=addresses)
    by_host: dict[str, list[str]] = {}
    for address in addresses:
        by_host.setdefault(get_address_host(address), []).append(address)
    devices = {}
    for host, on_host in by_host.items():
        devices.update(zip(on_host, assign_devices(host, [GpuView(*views[a]) for a in on_host])))
    return [devices[address] for address in addresses]


def _local_ranks(addresses: list[str]) -> list[int]:
    """Index of each worker among the workers on its host, in address order."""
    seen: Counter[str] = Counter()
    ranks = []
    for address in addresses:
        host = get_address_host(address)
        ranks.append(seen[host])
        seen[host] += 1
    return ranks
