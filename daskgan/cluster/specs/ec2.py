"""``kind: ec2``: dask-cloudprovider's EC2Cluster (extra ``cloud``), credentials from the instance profile, with
dask-cloudprovider's own default security: TLS with a throwaway CA."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from daskgan.cluster.specs.extras import import_extra
from daskgan.cluster.specs.scheduler import SchedulerSpec
from daskgan.cluster.specs.workers import WORKER_SHARED_MEMORY, worker_environment_variables
from daskgan.config import ConfigError


@dataclass
class Ec2Spec:
    region: str
    docker_image: str  # must hold daskgan, torch (CUDA build) and the dask versions of the client
    instance_type: str = "g5.xlarge"  # one GPU per worker
    scheduler_instance_type: str = "t3.large"
    n_workers: int = 2
    iam_instance_profile: Optional[str] = None  # role that grants the workers S3 access
    subnet_id: Optional[str] = None
    security_groups: list = field(default_factory=list)
    filesystem_size: int = 100  # GB
    spot: bool = False
    shared_memory: Optional[str] = WORKER_SHARED_MEMORY  # the worker container's /dev/shm (Docker's own is 64 MB)
    env: dict = field(default_factory=dict)


def render(ec2: Ec2Spec) -> dict[str, Any]:
    """EC2Cluster's keyword arguments."""
    return {"EC2Cluster": ec2_arguments(ec2)}


@contextmanager
def connect(ec2: Ec2Spec) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client of an EC2Cluster started here, shut down on exit; on spot instances its workers watch for a
    reclaim notice, so the run checkpoints before it."""
    from distributed import Client

    aws = import_extra("dask_cloudprovider.aws", "cloud", "kind: ec2")
    cluster = aws.EC2Cluster(**ec2_arguments(ec2))
    with cluster, Client(cluster) as client:
        if ec2.spot:
            from daskgan.preemption import SpotInterruptionWatch

            client.register_plugin(SpotInterruptionWatch())  # the run checkpoints before a reclaim
        yield client


def running_scheduler(ec2: Ec2Spec, cluster_name: Optional[str] = None) -> SchedulerSpec:
    """Refused: a running EC2Cluster is not found from its spec, but through a `kind: scheduler` spec."""
    raise ConfigError("kind: ec2: a running EC2Cluster cannot be found from its spec; use a `kind: scheduler` "
                      "spec with the address of its scheduler")


def ec2_arguments(ec2: Ec2Spec) -> dict[str, Any]:
    """Keyword arguments for dask-cloudprovider's EC2Cluster."""
    arguments = {
        "region": ec2.region, "docker_image": ec2.docker_image, "n_workers": ec2.n_workers,
        "worker_instance_type": ec2.instance_type, "scheduler_instance_type": ec2.scheduler_instance_type,
        "filesystem_size": ec2.filesystem_size, "spot": ec2.spot, "worker_options": {"nthreads": 1},
        "env_vars": {**ec2.env, **worker_environment_variables()},
    }
    if ec2.shared_memory:  # Docker's size units: 2Gi -> 2g
        arguments["docker_args"] = f"--shm-size={ec2.shared_memory.removesuffix('i').lower()}"
    if ec2.iam_instance_profile:
        arguments["iam_instance_profile"] = {"Name": ec2.iam_instance_profile}
    if ec2.subnet_id:
        arguments["subnet_id"] = ec2.subnet_id
    if ec2.security_groups:
        arguments["security_groups"] = ec2.security_groups
    return arguments
