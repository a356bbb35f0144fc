"""Errors that mean "what you asked for or gave cannot be used", as opposed to bugs.

The command line prints such an error as one line (``daskgan: <message>``) and exits with status 2, with no
traceback unless ``--debug``; so each message names the input (key, URL, option) and says what to do. They keep
the built-in base a caller would expect (``FileNotFoundError``, ``PermissionError``, ``ValueError``), so code that
catches those still does. Errors raised on a worker reach the client unchanged through ``dispatch.results``.
``InfrastructureError`` is neither the input's mistake nor a bug: what the run stands on failed for longer than
its retries (storage down); the driver restarts the run from its newest checkpoint rather than fail it.

``WorkerLost`` and ``Preempted`` end a dispatch without failing its run: a worker left, or was given notice and
its ranks checkpointed; the driver re-dispatches from the newest checkpoint.

A rank's failure is also of one ``FailureKind`` (``failure_kind``): the rank's own, a peer it lost, or the cluster
around it. Decided here, on the client (which peer was lost) and on the workers (whether the run failed) alike,
by the exception's type first, then by its message (gloo and NCCL tell of a lost peer in a plain
``RuntimeError``); torch and distributed are not imported for it, their classes are known by module and name.
"""

from __future__ import annotations

import enum
from typing import Any


class UserError(Exception):
    """A mistake in the input: printed as one line by the command line."""


class ConfigError(UserError, ValueError):
    """A job or cluster file that cannot be used; the message names the offending key."""


class RequestError(UserError, ValueError):
    """A request the model cannot serve: a class out of range, truncation for a model without it."""


class MissingExtra(UserError, ImportError):
    """A cluster backend whose optional dependency is not installed."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint made for a different model than the job asks for."""


class CheckpointUnreadable(UserError, ValueError):
    """A file that is not a daskgan checkpoint (another tool's pickle, a truncated upload)."""


class UnsafePickle(CheckpointUnreadable):
    """A pickle that asks to import something other than tensors and plain containers: refused unrun."""


class ChecksumMismatch(UserError, ValueError):
    """A file that must be one known file (NVlabs' Inception) but whose sha256 differs: refused unloaded, since
    loading it would run whatever code it holds."""


class NotFound(UserError, FileNotFoundError):
    """A URL, bucket, file or dataset that does not exist (or holds nothing usable)."""


class StorageAccessError(UserError, PermissionError):
    """Storage refused the request: credentials missing, wrong or expired, or not allowed to do this."""


class InfrastructureError(ConnectionError):
    """What the run stands on failed beyond its retries, not the run or its input: the driver restarts the run
    from its newest checkpoint (``recovery.max_restarts``, with growing waits); the command line prints one
    line."""


class StorageUnavailable(InfrastructureError):
    """Storage kept failing transiently (throttling, server errors, resets) beyond the retry bounds."""


class DeviceError(UserError, RuntimeError):
    """Workers and GPUs that do not pair up one to one."""


class SchedulerUnreachable(UserError, ConnectionError):
    """No Dask scheduler answered at the address of a cluster spec."""


class WorkerLost(RuntimeError):
    """A worker running a rank left the cluster (process killed, pod preempted) before the run finished.

    ``confirmed``: the scheduler removed the worker. Otherwise every failed rank reported a broken connection to
    its peers while these ranks went silent: the scheduler has not noticed the loss yet (a node gone from the
    network is noticed only when its heartbeats stop)."""

    def __init__(self, ranks: list[int], workers: list[str], confirmed: bool = True, evidence: str = ""):
        what = "left the cluster" if confirmed else f"stopped answering their peers ({evidence})"
        super().__init__(f"rank(s) {ranks} lost: worker(s) {', '.join(workers)} {what} during the run")
        self.ranks, self.workers, self.confirmed = ranks, workers, confirmed


class Preempted(Exception):
    """Workers of the run were given notice (``daskgan.preemption``): its ranks checkpointed and stopped."""

    def __init__(self, notice: dict[str, Any]):
        self.workers, self.seconds = notice["workers"], round(notice["notice_to_checkpoint_s"], 2)
        super().__init__(f"preempted: worker {', '.join(self.workers)} given notice; the checkpoint at iteration "
                         f"{notice['iteration']} was durable {self.seconds:.1f} s after it")


class FailureKind(enum.Enum):
    """Who a rank's failure belongs to: the run restarts from its checkpoint after ``PEER`` and ``CLUSTER``, and
    records a ``RUN`` failure as the run's own (``state.json``: failed)."""

    RUN = "run"  # the rank's own work: a bug, a bad input, a full disk
    PEER = "peer"  # another rank is unreachable: its process or node is gone
    CLUSTER = "cluster"  # what the run stands on: the Dask scheduler, or storage down beyond the retries


# Exception classes that name their kind, by "module.qualname", matched along the error's class hierarchy. Python's
# own ConnectionError kinds are not among them: torch and gloo report a lost peer with their own errors, while
# storage and distributed raise those for their own connections (the messages below still catch an OS reset).
FAILURE_TYPES = {
    "torch.distributed.DistNetworkError": FailureKind.PEER,  # torch's sockets: a peer's connection failed
    "torch.distributed.DistBackendError": FailureKind.PEER,  # a collective's backend: NCCL's abort, gloo's pair
    "daskgan.errors.InfrastructureError": FailureKind.CLUSTER,  # storage down beyond the retries
}
CLUSTER_MODULE = "distributed."  # every class defined by distributed (CommClosedError once the scheduler is gone)

# For errors whose type names no kind: (lower-case substring of the message, kind).
FAILURE_MESSAGES = (
    ("connection closed by peer", FailureKind.PEER),  # gloo (tcp/pair.cc): the peer closed its socket
    ("connection reset by peer", FailureKind.PEER),  # gloo's read error on ECONNRESET (and the OS's own)
    ("broken pipe", FailureKind.PEER),  # gloo's write error on EPIPE (and the OS's own)
    ("timed out waiting", FailureKind.PEER),  # gloo (tcp/pair.cc): a peer's send never came within the timeout
    ("connection refused", FailureKind.PEER),  # torch's sockets (and the OS's ECONNREFUSED): the peer's port shut
    ("socket timeout", FailureKind.PEER),  # torch's TCPStore client: no answer from the store's rank
    ("nccl communicator was aborted", FailureKind.PEER),  # NCCL: a peer's abort reached this rank's collective
    ("watchdog caught collective operation", FailureKind.PEER),  # NCCL's watchdog: a collective outlived its timeout
)


def failure_kind(error: BaseException) -> FailureKind:
    """Whose failure ``error`` is: a lost peer's where its class or message says so (``FAILURE_TYPES``,
    ``FAILURE_MESSAGES``), else the cluster's where its class says so or distributed's own code raised it (the
    plain ``OSError`` of its connect when the scheduler cannot be reached), else the rank's own. A peer is looked
    for first: an error of the cluster's whose message tells of a peer's reset counts as the peer's."""
    if FailureKind.PEER in (_kind_by_type(error), _kind_by_message(error)):
        return FailureKind.PEER
    if _kind_by_type(error) is FailureKind.CLUSTER or _raised_in_distributed(error):
        return FailureKind.CLUSTER
    return FailureKind.RUN


def _kind_by_type(error: BaseException) -> FailureKind | None:
    """The kind named by the error's class or its nearest base class that names one."""
    for cls in type(error).__mro__:
        if (kind := FAILURE_TYPES.get(f"{cls.__module__}.{cls.__qualname__}")) is not None:
            return kind
        if cls.__module__.startswith(CLUSTER_MODULE):
            return FailureKind.CLUSTER
    return None


def _kind_by_message(error: BaseException) -> FailureKind | None:
    """The kind of the first entry of ``FAILURE_MESSAGES`` found in the error's message."""
    message = str(error).lower()
    return next((kind for text, kind in FAILURE_MESSAGES if text in message), None)


def _raised_in_distributed(error: BaseException) -> bool:
    """Whether ``error`` was raised by distributed's own code (the innermost frame of its traceback)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith(CLUSTER_MODULE)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (botocore and torch messages can run over several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
