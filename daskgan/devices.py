"""Which GPU each DDP rank uses, decided from what each worker sees, and a check that no two ranks share one.

``LOCAL_RANK`` (a worker's index among the workers on its host) is only a device index when every worker on the
host sees every GPU in the same order. dask-cuda gives each worker its own ``CUDA_VISIBLE_DEVICES`` with its GPU
first, so its GPU is device 0; a pod with one GPU sees exactly one. NCCL refuses two ranks on one GPU ("duplicate
GPU"), so the assignment is checked by GPU UUID at rendezvous.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from daskgan.errors import DeviceError


class GpuView(NamedTuple):
    """What one worker process sees: its ``CUDA_VISIBLE_DEVICES`` (None if unset) and how many GPUs."""

    visible: str | None
    count: int


def gpu_view() -> GpuView:
    """This worker's view (run on each worker before dispatching)."""
    import torch

    return GpuView(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


def assign_devices(host: str, views: list[GpuView]) -> list[int | None]:
    """The CUDA device index of each worker on ``host`` (in local-rank order); None for a worker without GPUs.

    One visible GPU -> device 0. Workers whose ``CUDA_VISIBLE_DEVICES`` each start with a different GPU (dask-cuda)
    -> device 0 each. Otherwise (several plain workers sharing a host's GPUs) the local rank, which needs at least
    as many GPUs as workers."""
    if all(view.count == 0 for view in views):
        return [None] * len(views)
    firsts = [view.visible.split(",")[0].strip() if view.visible else None for view in views]
    own_gpu_first = None not in firsts and len(set(firsts)) == len(firsts)
    if all(view.count == 1 for view in views) or own_gpu_first:
        return [0 if view.count else None for view in views]
    if any(view.count < len(views) for view in views):
        raise DeviceError(f"{host}: {len(views)} workers share {min(v.count for v in views)} visible GPU(s); run one "
                          f"worker per GPU (dask-cuda's LocalCUDACluster or dask worker --nworkers per GPU)")
    return list(range(len(views)))


def duplicate_devices(uuids: list[str | None]) -> dict[str, list[int]]:
    """GPU UUID -> the ranks using it, for every GPU used by more than one rank."""
    ranks: dict[str, list[int]] = {}
    for rank, uuid in enumerate(uuids):
        if uuid is not None:
            ranks.setdefault(uuid, []).append(rank)
    return {uuid: used_by for uuid, used_by in ranks.items() if len(used_by) > 1}


def check_no_shared_gpu(device_index: int | None) -> None:
    """Inside the process group: all-gather each rank's GPU UUID and refuse a GPU used by two ranks."""
    import torch
    import torch.distributed as dist

    uuid = str(torch.cuda.get_device_properties(device_index).uuid) if device_index is not None else None
    uuids: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(uuids, uuid)
    shared = duplicate_devices(uuids)
    if shared:
        raise DeviceError("ranks share a GPU: " + "; ".join(f"ranks {r} on GPU {u}" for u, r in shared.items())
                          + ": give each worker its own GPU (CUDA_VISIBLE_DEVICES, dask-cuda)")
