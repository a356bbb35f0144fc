"""Where this process stands in the DDP process group, for code that also runs outside one (tools, tests)."""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


def process_group_running() -> bool:
    """Whether this process is a rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if process_group_running() else 0


def world_size() -> int:
    return dist.get_world_size() if process_group_running() else 1


def from_rank0(compute: Callable[[], Any], timeout_s: float | None = None) -> Any:
    """Inside a process group: run ``compute`` on rank 0 only (a listing, a pointer read, a first write) and hand
    its result to every rank; outside one, just run it. An error on rank 0 is raised on every rank, so all stop
    together (on the input's mistake, or storage down) rather than on a lost peer, or when the wait times out.

    The other ranks wait as long as collectives may (the process group's timeout), or ``timeout_s`` for work
    known to take longer (listing a large bucket): a gloo group with that timeout carries the result."""
    if not process_group_running():
        return compute()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if timeout_s else None
    box: list[Any] = [None]
    own_error = None
    try:
        if dist.get_rank() == 0:
            try:
                box = [(compute(), None)]
            except Exception as exc:  # handed on too: the others would wait for an answer until the timeout
                own_error, box = exc, [(None, _portable(exc))]
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    value, error = box[0]
    if own_error is not None:
        raise own_error  # with rank 0's own traceback
    if error is not None:
        raise error
    return value


def _portable(error: Exception) -> Exception:
    """``error`` as the other ranks can receive it: itself when it pickles, else a ``RuntimeError`` with its line."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")


def collective_device() -> torch.device:
    """Where tensors for this process group's collectives must live: the current GPU under NCCL, else the CPU."""
    if process_group_running() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
