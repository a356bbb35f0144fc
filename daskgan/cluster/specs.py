"""Cluster specs (``cluster/*.yaml``): what to start or connect to, and the exact object each backend gets.

One ``kind`` per spec, with its settings in the section of the same name:

- ``local``: a LocalCluster of worker processes on this machine;
- ``scheduler``: connect to a running scheduler at ``address``;
- ``kubernetes``: a DaskCluster for the dask-kubernetes operator (extra ``k8s``), GPU workers, credentials from a
  Kubernetes Secret or an IRSA service account;
- ``ec2``: dask-cloudprovider's EC2Cluster (extra ``cloud``), credentials from the instance profile.

``render(spec)`` returns what the backend is given (for Kubernetes the DaskCluster manifest), so
``daskgan cluster render`` shows exactly what would be created. Credentials are only ever referenced (Secret names,
roles), never written into a spec.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from daskgan.config import ConfigError, build_dataclass, load_yaml_mapping
from daskgan.errors import MissingExtra, SchedulerUnreachable

SECRET_LOOKING_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.IGNORECASE)


@dataclass
class LocalSpec:
    n_workers: int = 2
    threads_per_worker: int = 1  # one DDP rank per worker process; torch's own threads come on top
    memory_limit: str = "auto"


@dataclass
class SchedulerSpec:
    address: str
    connect_timeout_s: float = 30.0  # how long to keep trying to reach the scheduler


# /dev/shm for GPU workers: ranks' decoding processes hand pixels over through it (blocks of up to 8 MiB, two per
# process) and NCCL keeps its buffers there; a container gets 64 MB
WORKER_SHARED_MEMORY = "2Gi"


@dataclass
class KubernetesSpec:
    image: str  # must hold daskgan, torch and the dask versions of the client
    name: str = "daskgan"
    namespace: str = "default"
    n_workers: int = 2
    worker_resources: dict = field(default_factory=lambda: {"limits": {"nvidia.com/gpu": "1"}})
    scheduler_resources: dict = field(default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"}})
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    service_account: Optional[str] = None  # IRSA: a service account bound to an IAM role with S3 access
    aws_secret: Optional[str] = None  # a Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    env: dict = field(default_factory=dict)  # plain settings, e.g. AWS_ENDPOINT_URL_S3, S3_ENDPOINT, AWS_REGION
    shared_memory: Optional[str] = WORKER_SHARED_MEMORY  # the workers' /dev/shm (memory emptyDir); null: 64 MB


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


@dataclass
class ClusterSpec:
    kind: str = "local"
    local: Optional[LocalSpec] = None
    scheduler: Optional[SchedulerSpec] = None
    kubernetes: Optional[KubernetesSpec] = None
    ec2: Optional[Ec2Spec] = None

    def settings(self) -> Any:
        """The section of this spec's kind (a local cluster needs none written out)."""
        return getattr(self, self.kind) or (LocalSpec() if self.kind == "local" else None)

    def planned_workers(self) -> int | None:
        """How many workers the spec starts (None for an existing scheduler: ask it once connected)."""
        return getattr(self.settings(), "n_workers", None)

    def validate(self) -> "ClusterSpec":
        kinds = [f.name for f in dataclasses.fields(self) if f.name != "kind"]
        if self.kind not in kinds:
            raise ConfigError(f"kind: must be one of {', '.join(kinds)}, got {self.kind!r}")
        if self.settings() is None:
            raise ConfigError(f"{self.kind}: required for kind: {self.kind}")
        for other in kinds:
            if other != self.kind and getattr(self, other) is not None:
                raise ConfigError(f"{other}: given, but kind is {self.kind}")
        for name in ("n_workers", "threads_per_worker"):
            if getattr(self.settings(), name, 1) < 1:
                raise ConfigError(f"{self.kind}.{name}: must be >= 1")
        for name in getattr(self.settings(), "env", {}):
            if SECRET_LOOKING_ENV.search(name):
                raise ConfigError(f"{self.kind}.env.{name}: credentials do not belong in a cluster spec; "
                                  "reference a Kubernetes Secret (aws_secret), a service account or an instance role")
        return self


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    data = load_yaml_mapping(path)  # its errors name the file already
    try:
        return build_dataclass(ClusterSpec, data, "").validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def default_cluster_spec() -> ClusterSpec:
    """The cluster of a command given no spec: the scheduler Dask itself would connect to (``DASK_SCHEDULER_ADDRESS``,
    which the dask-kubernetes operator sets in a DaskJob's runner pod), else a local cluster of 2 worker processes."""
    import dask

    address = dask.config.get("scheduler-address", default=None)
    if address:
        return ClusterSpec(kind="scheduler", scheduler=SchedulerSpec(address=address)).validate()
    return ClusterSpec().validate()


def render(spec: ClusterSpec) -> dict[str, Any]:
    """The exact object the backend gets: LocalCluster/EC2Cluster keyword arguments, or the DaskCluster manifest."""
    settings = spec.settings()
    if spec.kind == "local":
        return {"LocalCluster": {**dataclasses.asdict(settings), "processes": True}}
    if spec.kind == "scheduler":
        return {"address": settings.address}
    if spec.kind == "kubernetes":
        return kubernetes_manifest(settings)
    return {"EC2Cluster": ec2_arguments(settings)}


def kubernetes_manifest(k8s: KubernetesSpec) -> dict[str, Any]:
    """A DaskCluster (kubernetes.dask.org/v1) built by dask-kubernetes' own ``make_cluster_spec``, then given GPU
    workers with one thread each, node placement, and credentials by reference only."""
    make_cluster_spec = _import("dask_kubernetes.operator", "k8s", "kind: kubernetes").make_cluster_spec
    env = {**k8s.env, **worker_environment_variables()}
    manifest = make_cluster_spec(name=k8s.name, image=k8s.image, n_workers=k8s.n_workers,
                                 resources=k8s.worker_resources, env=env)
    manifest["metadata"]["namespace"] = k8s.namespace
    scheduler_pod = manifest["spec"]["scheduler"]["spec"]
    scheduler_pod["containers"][0]["resources"] = k8s.scheduler_resources
    worker_pod = manifest["spec"]["worker"]["spec"]
    worker = worker_pod["containers"][0]
    worker["resources"] = k8s.worker_resources
    worker["args"] += ["--nthreads", "1"]
    if k8s.node_selector:
        worker_pod["nodeSelector"] = k8s.node_selector
    if k8s.tolerations:
        worker_pod["tolerations"] = k8s.tolerations
    if k8s.service_account:
        worker_pod["serviceAccountName"] = k8s.service_account
    if k8s.aws_secret:
        worker["env"] += [{"name": name, "valueFrom": {"secretKeyRef": {"name": k8s.aws_secret, "key": name}}}
                          for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if k8s.shared_memory:
        worker_pod["volumes"] = [*worker_pod.get("volumes", []),
                                 {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shared_memory}}]
        worker["volumeMounts"] = [*worker.get("volumeMounts", []), {"name": "dshm", "mountPath": "/dev/shm"}]
    return manifest


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


@contextmanager
def connect(spec: ClusterSpec) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client for ``spec``; a cluster started here is shut down on exit."""
    import dask
    from distributed import Client, LocalCluster

    settings = spec.settings()
    if spec.kind == "scheduler":
        with _client_of_scheduler(settings) as client:
            yield client
        return
    if spec.kind == "local":
        with dask.config.set(worker_settings()):
            cluster = LocalCluster(n_workers=settings.n_workers, threads_per_worker=settings.threads_per_worker,
                                   memory_limit=settings.memory_limit, processes=True,
                                   dashboard_address=":0")  # any free port: several clusters may run at once
    elif spec.kind == "kubernetes":
        operator = _import("dask_kubernetes.operator", "k8s", "kind: kubernetes")
        cluster = operator.KubeCluster(custom_cluster_spec=kubernetes_manifest(settings), namespace=settings.namespace)
    else:
        aws = _import("dask_cloudprovider.aws", "cloud", "kind: ec2")
        cluster = aws.EC2Cluster(**ec2_arguments(settings))
    with cluster, Client(cluster) as client:
        yield client


def _client_of_scheduler(settings: SchedulerSpec) -> "distributed.Client":  # noqa: F821
    from distributed import Client

    try:
        return Client(settings.address, timeout=settings.connect_timeout_s)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachable(
            f"scheduler.address: no Dask scheduler answered at {settings.address} within "
            f"{settings.connect_timeout_s:.0f}s: is it running, and reachable from here?") from exc


def worker_settings() -> dict[str, Any]:
    """The Dask settings daskgan's workers start with: glibc's malloc defaults (``torch_worker_environ``), and
    non-daemonic worker processes, so a rank may start a torch ``DataLoader`` with worker processes of its own."""
    return {"distributed.nanny.pre-spawn-environ": torch_worker_environ(), "distributed.worker.daemon": False}


def worker_environment_variables() -> dict[str, str]:
    """``worker_settings`` as the environment variables of a worker pod or instance."""
    return {f"DASK_{key.upper().replace('.', '__').replace('-', '_')}": repr(value)
            for key, value in worker_settings().items()}


def torch_worker_environ() -> dict:
    """distributed's pre-spawn environment for worker processes, without ``MALLOC_TRIM_THRESHOLD_``.

    distributed sets it to 64 KiB, which also freezes glibc's adaptive mmap threshold, so every large tensor of a
    training step is mapped and unmapped from the OS again: measured here, a DCGAN 64x64 step went from 0.86 s to
    1.25 s. Workers that train with PyTorch are better off with glibc's defaults.
    """
    import dask

    current = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {name: value for name, value in current.items() if name != "MALLOC_TRIM_THRESHOLD_"}


def _import(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs the '{extra}' extra: pip install 'daskgan[{extra}]' ({exc})") from exc
