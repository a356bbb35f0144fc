"""``kind: local``: a LocalCluster of worker processes on this machine, by default one per visible GPU, each its own.

It (and its dashboard) listens on loopback only, with distributed's TLS on request."""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from daskgan.cluster.specs.scheduler import SchedulerSpec
from daskgan.cluster.specs.workers import worker_settings
from daskgan.config import ConfigError
from daskgan.errors import MissingExtra

logger = logging.getLogger(__name__)

CPU_WORKERS = 2  # a local cluster without GPUs: two worker processes, so a run is distributed (DDP) here too


@dataclass
class LocalSpec:
    n_workers: Optional[int] = None  # None: one per visible GPU, each its own (``local_workers``), else 2 CPU workers
    threads_per_worker: int = 1  # one DDP rank per worker process; torch's own threads come on top
    memory_limit: str = "auto"
    # distributed's TLS with a throwaway CA (LocalCluster's security=True): the scheduler is on loopback either way,
    # which every user of a shared machine reaches
    tls: bool = False
    dashboard_address: str = "127.0.0.1:0"  # any free port on loopback; e.g. ":8787" serves it on every interface


@dataclass(frozen=True)
class LocalWorkers:
    """What a local cluster starts: ``count`` worker processes on a machine with ``gpus`` visible GPUs."""

    count: int
    gpus: int

    @property
    def own_gpu(self) -> bool:
        """Whether each worker gets a GPU of its own (with more workers than GPUs they share them all)."""
        return 0 < self.count <= self.gpus

    def describe(self) -> str:
        workers = f"{self.count} {'CPU ' if not self.gpus else ''}worker{'s' if self.count > 1 else ''}"
        if not self.gpus:
            return workers
        return workers + (", one GPU each" if self.own_gpu else f" sharing {self.gpus} GPUs")

    def visible_devices(self) -> list[Optional[str]]:
        """Each worker's ``CUDA_VISIBLE_DEVICES``: its own GPU first, then the others, as dask-cuda gives them (so it
        is each one's device 0, and no two ranks share a GPU); None where they share (or there are none)."""
        if not self.own_gpu:
            return [None] * self.count
        given = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in given.split(",")][:self.gpus] if given else [str(i) for i in range(self.gpus)]
        return [",".join(ids[i:] + ids[:i]) for i in range(self.count)]


def local_workers(local: LocalSpec) -> LocalWorkers:
    """The workers of a local cluster: the spec's ``n_workers`` if given, else one per visible GPU (a one-GPU
    workstation's two default workers would share its GPU, an 8-GPU server's would leave 6 idle), else 2."""
    import torch

    gpus = torch.cuda.device_count()
    return LocalWorkers(local.n_workers or gpus or CPU_WORKERS, gpus)


def render(local: LocalSpec) -> dict[str, Any]:
    """LocalCluster's keyword arguments."""
    return {"LocalCluster": _local_cluster_arguments(local, local_workers(local))}


# LocalCluster (a SpecCluster) closes the nanny of a worker that left and has not come back within distributed's
# deploy.lost-worker-timeout (15 s), and opens no other: on a busy host a nanny restarting a killed worker takes
# longer, and recovery would then wait for a worker that never comes. Nannies here restart their workers, and one
# that cannot closes itself: let them.
RESTART_PATIENCE = "1h"


@contextmanager
def connect(local: LocalSpec) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client of a local cluster started here, shut down on exit."""
    import dask
    from distributed import Client

    if local.tls and importlib.util.find_spec("cryptography") is None:
        raise MissingExtra("local.tls: distributed makes its throwaway CA with the cryptography package: "
                           "pip install cryptography")
    with dask.config.set(worker_settings()):
        cluster = _local_cluster(local)
    with dask.config.set({"distributed.deploy.lost-worker-timeout": RESTART_PATIENCE}), cluster, \
            Client(cluster) as client:
        yield client


def running_scheduler(local: LocalSpec, cluster_name: Optional[str] = None) -> SchedulerSpec:
    """Refused: a local cluster lives only as long as the command that started it, so another finds none."""
    raise ConfigError("kind: local: a local cluster lives only as long as the command that started it, so no "
                      "run is there to look at; give a `kind: scheduler` spec with a running scheduler's address")


def _local_cluster_arguments(local: LocalSpec, workers: LocalWorkers) -> dict[str, Any]:
    """LocalCluster's keyword arguments for ``local`` (its ``security=True``: a throwaway CA, tls:// everywhere)."""
    return {"n_workers": workers.count, "threads_per_worker": local.threads_per_worker,
            "memory_limit": local.memory_limit, "dashboard_address": local.dashboard_address,
            "security": local.tls or None, "processes": True}


def _local_cluster(local: LocalSpec) -> "distributed.LocalCluster":  # noqa: F821
    """The local cluster of ``local``, one GPU per worker where there are enough (dask-cuda's LocalCUDACluster where
    installed, else plain workers each given its own ``CUDA_VISIBLE_DEVICES``)."""
    from distributed import LocalCluster

    workers = local_workers(local)
    arguments = _local_cluster_arguments(local, workers)
    logger.info("cluster: %s", workers.describe())
    if not workers.own_gpu:
        return LocalCluster(**arguments)
    if importlib.util.find_spec("dask_cuda") is not None:
        from dask_cuda import LocalCUDACluster

        arguments.pop("processes")  # LocalCUDACluster's workers are processes always (and it says so itself)
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=workers.visible_devices()[0], **arguments)
    return _own_gpu_cluster_class()(workers.visible_devices(), **arguments)


def _own_gpu_cluster_class() -> type:
    """A LocalCluster whose n-th worker is given ``visible_devices[n]`` as its ``CUDA_VISIBLE_DEVICES``, as
    dask-cuda's LocalCUDACluster does (defined on first use: distributed is imported lazily here)."""
    from distributed import LocalCluster

    class OwnGpuLocalCluster(LocalCluster):
        def __init__(self, visible_devices: list[str], n_workers: int, **kwargs: Any):
            self.visible_devices = visible_devices
            super().__init__(n_workers=0, **kwargs)  # LocalCluster's own workers would all be alike
            self.scale(n_workers)
            self.sync(self._correct_state)

        def new_worker_spec(self) -> dict:
            (name, spec), = super().new_worker_spec().items()
            options = spec["options"]
            devices = self.visible_devices[name % len(self.visible_devices)]
            env = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": devices}
            return {name: {**spec, "options": {**options, "env": env}}}

    return OwnGpuLocalCluster
