"""Which GPU each rank takes, from what its worker sees (no GPU needed: the choice is a pure function)."""

import pytest

from daskgan.devices import GpuView, assign_devices, duplicate_devices
from daskgan.errors import DeviceError


def test_dask_cuda_workers_each_use_their_own_gpu_as_device_0():
    views = [GpuView("0,1,2,3", 4), GpuView("1,2,3,0", 4), GpuView("2,3,0,1", 4), GpuView("3,0,1,2", 4)]
    assert assign_devices("node", views) == [0, 0, 0, 0]


def test_plain_workers_sharing_a_hosts_gpus_use_their_local_rank():
    assert assign_devices("node", [GpuView(None, 4)] * 4) == [0, 1, 2, 3]
    assert assign_devices("node", [GpuView("0,1", 2)] * 2) == [0, 1], "the same list everywhere: local rank"


def test_one_gpu_per_pod_and_cpu_workers():
    assert assign_devices("pod", [GpuView("GPU-5b2c", 1)]) == [0]
    assert assign_devices("pod", [GpuView(None, 1), GpuView(None, 1)]) == [0, 0]
    assert assign_devices("cpu", [GpuView(None, 0)] * 2) == [None, None]


def test_more_workers_than_gpus_is_refused_with_the_host_named():
    with pytest.raises(DeviceError, match="node-7: 3 workers share 2 visible GPU"):
        assign_devices("node-7", [GpuView(None, 2)] * 3)


def test_shared_gpus_are_found_by_uuid():
    assert duplicate_devices(["GPU-a", "GPU-b", "GPU-a", None, None]) == {"GPU-a": [0, 2]}
    assert duplicate_devices(["GPU-a", "GPU-b"]) == {}


# --- a local cluster that fits the machine: one worker per visible GPU, each its own -------------------------------


@pytest.mark.parametrize("gpus, n_workers, started", [
    (0, None, "2 CPU workers"), (1, None, "1 worker, one GPU each"), (4, None, "4 workers, one GPU each"),
    (8, 2, "2 workers, one GPU each"), (0, 1, "1 CPU worker"), (2, 3, "3 workers sharing 2 GPUs"),
])
def test_the_local_cluster_has_a_worker_per_visible_gpu_unless_the_spec_says(monkeypatch, gpus, n_workers, started):
    import torch

    from daskgan.cluster import LocalSpec
    from daskgan.cluster.specs.local import local_workers

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    workers = local_workers(LocalSpec(n_workers=n_workers))
    assert (workers.count, workers.describe()) == (int(started.split()[0]), started)


def test_each_local_worker_sees_its_own_gpu_first(monkeypatch):
    import torch

    from daskgan.cluster import LocalSpec
    from daskgan.cluster.specs.local import local_workers

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    visible = local_workers(LocalSpec()).visible_devices()
    assert visible == ["0,1,2,3", "1,2,3,0", "2,3,0,1", "3,0,1,2"]
    assert assign_devices("node", [GpuView(v, 4) for v in visible]) == [0, 0, 0, 0], "device 0 each: its own GPU"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # this machine's GPUs as the command was given them
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_workers(LocalSpec()).visible_devices() == ["3,5", "5,3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert local_workers(LocalSpec()).visible_devices() == [None, None], "CPU workers: nothing set"


def test_started_local_workers_are_handed_a_gpu_each_and_the_command_says_so(monkeypatch, caplog):
    """Started for real on this machine without GPUs: each worker process's environment holds its own GPU first."""
    import logging
    import os

    import torch

    from daskgan.cluster import ClusterSpec, connect

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="daskgan"), connect(ClusterSpec().validate()) as client:
        visible = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(visible.values()) == ["0,1", "1,0"]
    assert "cluster: 2 workers, one GPU each" in caplog.text


def test_dask_cuda_starts_the_gpu_workers_where_installed(monkeypatch):
    import importlib.machinery
    import sys
    import types

    import torch

    from daskgan.cluster import ClusterSpec, connect

    given = {}

    def local_cuda_cluster(**kwargs):
        given.update(kwargs)
        raise RuntimeError("LocalCUDACluster called")

    dask_cuda = types.ModuleType("dask_cuda")
    dask_cuda.__spec__ = importlib.machinery.ModuleSpec("dask_cuda", None)
    dask_cuda.LocalCUDACluster = local_cuda_cluster
    monkeypatch.setitem(sys.modules, "dask_cuda", dask_cuda)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match="LocalCUDACluster called"), connect(ClusterSpec().validate()):
        pass
    assert (given["n_workers"], given["CUDA_VISIBLE_DEVICES"], given["threads_per_worker"]) == (4, "0,1,2,3", 1)
    assert "processes" not in given, "LocalCUDACluster passes processes=True itself"
