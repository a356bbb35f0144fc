"""How daskgan's workers start, whichever backend starts them: their Dask settings, as settings or as the
environment variables of a pod or instance, and the size of their ``/dev/shm``."""

from __future__ import annotations

from typing import Any

# /dev/shm for GPU workers: ranks' decoding processes hand pixels over through it (blocks of up to 8 MiB, two per
# process) and NCCL keeps its buffers there; a container gets 64 MB
WORKER_SHARED_MEMORY = "2Gi"


def worker_settings() -> dict[str, Any]:
    """The Dask settings daskgan's workers start with: glibc's malloc defaults (``torch_worker_environ``), and
    non-daemonic worker processes, so a rank may start a torch ``DataLoader`` with worker processes of its own."""
    return {"distributed.nanny.pre-spawn-environ": torch_worker_environ(), "distributed.worker.daemon": False}


def worker_environment_variables() -> dict[str, str]:
    """``worker_settings`` as the environment variables of a worker pod or instance."""
    return environment_variables(worker_settings())


def environment_variables(settings: dict[str, Any]) -> dict[str, str]:
    """Dask settings (dotted keys) as the ``DASK_*`` environment variables Dask reads them from."""
    return {f"DASK_{key.upper().replace('.', '__').replace('-', '_')}": repr(value) for key, value in settings.items()}


def torch_worker_environ() -> dict:
    """distributed's pre-spawn environment for worker processes, without ``MALLOC_TRIM_THRESHOLD_``.

    distributed sets it to 64 KiB, which also freezes glibc's adaptive mmap threshold, so every large tensor of a
    training step is mapped and unmapped from the OS again: measured here, a DCGAN 64x64 step went from 0.86 s to
    1.25 s. Workers that train with PyTorch are better off with glibc's defaults.
    """
    import dask

    current = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {name: value for name, value in current.items() if name != "MALLOC_TRIM_THRESHOLD_"}
