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
