"""Cluster specs (``cluster/*.yaml``): what to start or connect to, and the exact object each backend gets.

One ``kind`` per spec, with its settings in the section of the same name:

- ``local``: a LocalCluster of worker processes on this machine, by default one per visible GPU, each its own;
- ``scheduler``: connect to a running scheduler at ``address``;
- ``kubernetes``: a DaskCluster for the dask-kubernetes operator (extra ``k8s``), GPU workers, credentials from a
  Kubernetes Secret or an IRSA service account;
- ``ec2``: dask-cloudprovider's EC2Cluster (extra ``cloud``), credentials from the instance profile.

``render(spec)`` returns what the backend is given (for Kubernetes the DaskCluster manifest and its NetworkPolicy, as
a List), so ``daskgan cluster render`` shows exactly what would be created. Credentials are only ever referenced (Secret
names, roles), never written into a spec.

Whoever reaches a scheduler can run code on its workers and read their credentials, so nothing listens beyond what
needs it: a local cluster (and its dashboard) on loopback, with distributed's TLS on request; on Kubernetes, TLS
between every pod with certificates from a Secret, and a NetworkPolicy admitting only the cluster's own pods; EC2
clusters get dask-cloudprovider's own default, TLS with a throwaway CA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from daskgan.config import ConfigError, RecoveryConfig, build_dataclass, load_yaml_mapping
from daskgan.errors import MissingExtra, SchedulerUnreachable, first_line

logger = logging.getLogger(__name__)

SECRET_LOOKING_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.IGNORECASE)


@dataclass
class LocalSpec:
    n_workers: Optional[int] = None  # None: one per visible GPU, each its own (``local_workers``), else 2 CPU workers
    threads_per_worker: int = 1  # one DDP rank per worker process; torch's own threads come on top
    memory_limit: str = "auto"
    # distributed's TLS with a throwaway CA (LocalCluster's security=True): the scheduler is on loopback either way,
    # which every user of a shared machine reaches
    tls: bool = False
    dashboard_address: str = "127.0.0.1:0"  # any free port on loopback; e.g. ":8787" serves it on every interface


@dataclass
class SchedulerSpec:
    address: str
    connect_timeout_s: float = 30.0  # how long to keep trying to reach the scheduler
    # a tls:// scheduler's CA and this client's certificate and key (PEM files, e.g. those of the cluster's Secret);
    # none: Dask's own settings (distributed.comm.tls.*, as DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...)
    tls_ca_file: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    def validate(self) -> None:
        files = {"tls_ca_file": self.tls_ca_file, "tls_cert": self.tls_cert, "tls_key": self.tls_key}
        given = [name for name, value in files.items() if value]
        if given and not self.address.startswith("tls://"):
            raise ConfigError(f"scheduler.{given[0]}: given, but scheduler.address is {self.address}: "
                              "a scheduler with TLS has a tls:// address")
        if given and len(given) < len(files):
            raise ConfigError(f"scheduler.{', '.join(sorted(set(files) - set(given)))}: needed with "
                              f"scheduler.{given[0]} (distributed's TLS checks both sides' certificates)")


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
    # distributed's TLS (tls://) between every pod: a Secret holding ca.crt, tls.crt and tls.key (PEM), mounted into
    # the scheduler, worker and DaskJob runner pods; null: plain TCP, which anything in the cluster network reaches
    tls_secret: Optional[str] = "daskgan-tls"
    client_pods: dict = field(default_factory=dict)  # labels of more pods admitted to the cluster, e.g. a notebook
    # how long an evicted worker pod may take to checkpoint its run and leave before it is killed; null: the job's
    # recovery.notice_grace_s plus a margin for leaving (in a DaskJob), or that of the default notice grace
    termination_grace_s: Optional[int] = None


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
        if self.kind == "local":
            return local_workers(self.settings()).count
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
        if self.kind == "scheduler":
            self.scheduler.validate()
        for name in ("n_workers", "threads_per_worker", "termination_grace_s"):
            value = getattr(self.settings(), name, None)
            if value is not None and value < 1:  # None: derived (the GPUs there, the job's notice grace)
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
    which the dask-kubernetes operator sets in a DaskJob's runner pod), else a local cluster that fits the machine
    (``local_workers``)."""
    import dask

    address = dask.config.get("scheduler-address", default=None)
    if address:
        return ClusterSpec(kind="scheduler", scheduler=SchedulerSpec(address=address)).validate()
    return ClusterSpec().validate()


CPU_WORKERS = 2  # a local cluster without GPUs: two worker processes, so a run is distributed (DDP) here too


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


def render(spec: ClusterSpec) -> dict[str, Any]:
    """The exact object the backend gets: LocalCluster/EC2Cluster keyword arguments, or for Kubernetes a List (what
    ``kubectl apply -f`` takes as one document) of the DaskCluster manifest and its NetworkPolicy."""
    settings = spec.settings()
    if spec.kind == "local":
        return {"LocalCluster": _local_cluster_arguments(settings, local_workers(settings))}
    if spec.kind == "scheduler":
        return {"address": settings.address}
    if spec.kind == "kubernetes":
        return {"apiVersion": "v1", "kind": "List",
                "items": [kubernetes_manifest(settings), network_policy(settings, settings.name)]}
    return {"EC2Cluster": ec2_arguments(settings)}


def _local_cluster_arguments(local: LocalSpec, workers: LocalWorkers) -> dict[str, Any]:
    """LocalCluster's keyword arguments for ``local`` (its ``security=True``: a throwaway CA, tls:// everywhere)."""
    return {"n_workers": workers.count, "threads_per_worker": local.threads_per_worker,
            "memory_limit": local.memory_limit, "dashboard_address": local.dashboard_address,
            "security": local.tls or None, "processes": True}


# where the pods find the Secret of ``tls_secret`` (its keys as files)
TLS_MOUNT = "/etc/daskgan/tls"


def kubernetes_manifest(k8s: KubernetesSpec, cluster_name: Optional[str] = None,
                        recovery: Optional[RecoveryConfig] = None) -> dict[str, Any]:
    """A DaskCluster (kubernetes.dask.org/v1) built by dask-kubernetes' own ``make_cluster_spec``, then given GPU
    workers with one thread each, node placement, credentials by reference only, TLS from ``tls_secret``, and a
    grace period on eviction long enough for the run's checkpoint (``recovery``: the job's; default: the
    defaults').

    ``cluster_name`` is the name the operator gives the cluster (a DaskJob's cluster is named after the job): its
    scheduler service selects that cluster's scheduler pod, and with TLS the workers are given its tls:// address."""
    cluster_name = cluster_name or k8s.name
    make_cluster_spec = _import("dask_kubernetes.operator", "k8s", "kind: kubernetes").make_cluster_spec
    env = {**k8s.env, **worker_environment_variables(), **tls_environment_variables(k8s)}
    manifest = make_cluster_spec(name=cluster_name, image=k8s.image, n_workers=k8s.n_workers,
                                 resources=k8s.worker_resources, env=env)
    manifest["metadata"]["namespace"] = k8s.namespace
    scheduler_pod = manifest["spec"]["scheduler"]["spec"]
    scheduler_pod["containers"][0]["resources"] = k8s.scheduler_resources
    worker_pod = manifest["spec"]["worker"]["spec"]
    worker = worker_pod["containers"][0]
    worker["resources"] = k8s.worker_resources
    worker["args"] += ["--nthreads", "1"]
    worker_pod["terminationGracePeriodSeconds"] = termination_grace_s(k8s, recovery or RecoveryConfig())
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
        add_volume(worker_pod, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shared_memory}},
                   "/dev/shm")
    if k8s.tls_secret:
        scheduler_pod["containers"][0]["args"] += ["--protocol", "tls"]
        add_tls_secret(scheduler_pod, k8s)
        add_tls_secret(worker_pod, k8s)
        worker["env"].append(scheduler_address_variable(manifest))
    return manifest


def termination_grace_s(k8s: KubernetesSpec, recovery: RecoveryConfig) -> int:
    """The worker pods' grace period: the spec's, which must cover the job's notice grace, or one derived from it."""
    if k8s.termination_grace_s is None:
        return recovery.platform_grace_s()
    if k8s.termination_grace_s < recovery.notice_grace_s:
        raise ConfigError(f"kubernetes.termination_grace_s: {k8s.termination_grace_s} s is shorter than the job's "
                          f"recovery.notice_grace_s ({recovery.notice_grace_s:.0f} s): an evicted worker would be "
                          f"killed before its run's checkpoint; raise it to {recovery.platform_grace_s()} or more")
    return k8s.termination_grace_s


def tls_environment_variables(k8s: KubernetesSpec) -> dict[str, str]:
    """Dask's TLS settings for every pod of a cluster with ``tls_secret``, as environment variables: the Secret's
    CA and certificate for every role (scheduler, worker, client), and no unencrypted connection in or out."""
    if not k8s.tls_secret:
        return {}
    settings = {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": f"{TLS_MOUNT}/ca.crt"}
    for role in ("scheduler", "worker", "client"):
        settings |= {f"distributed.comm.tls.{role}.cert": f"{TLS_MOUNT}/tls.crt",
                     f"distributed.comm.tls.{role}.key": f"{TLS_MOUNT}/tls.key"}
    return environment_variables(settings)


def add_tls_secret(pod: dict[str, Any], k8s: KubernetesSpec) -> None:
    """The Secret of ``tls_secret`` mounted read-only at ``TLS_MOUNT`` into the pod's first container."""
    add_volume(pod, {"name": "tls", "secret": {"secretName": k8s.tls_secret}}, TLS_MOUNT, read_only=True)


def add_volume(pod: dict[str, Any], volume: dict[str, Any], path: str, read_only: bool = False) -> None:
    """``volume`` in ``pod``, mounted at ``path`` into its first container."""
    pod["volumes"] = [*pod.get("volumes", []), volume]
    container = pod["containers"][0]
    mount = {"name": volume["name"], "mountPath": path, **({"readOnly": True} if read_only else {})}
    container["volumeMounts"] = [*container.get("volumeMounts", []), mount]


def scheduler_address_variable(manifest: dict[str, Any]) -> dict[str, str]:
    """``DASK_SCHEDULER_ADDRESS`` of the manifest's scheduler service with tls://. The operator sets it in worker
    and job runner pods that lack it, with tcp://, which a scheduler requiring encryption refuses; here is the
    same service name and port (``make_cluster_spec``'s ``tcp-comm``), over TLS."""
    from dask_kubernetes.constants import SCHEDULER_NAME_TEMPLATE

    service = SCHEDULER_NAME_TEMPLATE.format(cluster_name=manifest["metadata"]["name"])
    port, = (p["port"] for p in manifest["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm")
    return {"name": "DASK_SCHEDULER_ADDRESS",
            "value": f"tls://{service}.{manifest['metadata']['namespace']}.svc.cluster.local:{port}"}


def network_policy(k8s: KubernetesSpec, cluster_name: str) -> dict[str, Any]:
    """A NetworkPolicy (networking.k8s.io/v1) admitting to the pods of cluster ``cluster_name`` only its own pods
    (the operator labels its scheduler, workers and DaskJob runner ``dask.org/cluster-name``) and ``client_pods``.
    Every port: Dask workers, DDP ranks and torch's rendezvous store (TCPStore) listen on ports of their own choice.
    A client outside the cluster network comes through ``kubectl port-forward``, which no NetworkPolicy filters."""
    def pods(labels: dict) -> dict:  # a fresh object each time: YAML writes a shared one as &id001 / *id001
        return {"matchLabels": dict(labels)}

    own_pods = {"dask.org/cluster-name": cluster_name}
    admitted = [{"podSelector": pods(own_pods)}] + ([{"podSelector": pods(k8s.client_pods)}] if k8s.client_pods else [])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": cluster_name, "namespace": k8s.namespace},
            "spec": {"podSelector": pods(own_pods), "policyTypes": ["Ingress"], "ingress": [{"from": admitted}]}}


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
    from distributed import Client

    settings = spec.settings()
    if spec.kind == "scheduler":
        with _client_of_scheduler(settings) as client:
            yield client
        return
    if spec.kind == "local":
        if settings.tls and importlib.util.find_spec("cryptography") is None:
            raise MissingExtra("local.tls: distributed makes its throwaway CA with the cryptography package: "
                               "pip install cryptography")
        with dask.config.set(worker_settings()):
            cluster = _local_cluster(settings)
    elif spec.kind == "kubernetes":
        cluster = _kube_cluster(settings)
    else:
        aws = _import("dask_cloudprovider.aws", "cloud", "kind: ec2")
        cluster = aws.EC2Cluster(**ec2_arguments(settings))
    with cluster, Client(cluster) as client:
        if spec.kind == "ec2" and settings.spot:
            from daskgan.preemption import SpotInterruptionWatch

            client.register_plugin(SpotInterruptionWatch())  # the run checkpoints before a reclaim
        yield client


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


@contextmanager
def connect_existing(spec: ClusterSpec, cluster_name: Optional[str] = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client of a cluster that is already running, never one started here: looking at runs (``runs``,
    ``status``, ``attach``, ``stop``) must not start 4 GPU pods to list them, nor a local cluster to find nothing
    there. ``cluster_name``: the DaskCluster to find on Kubernetes (a DaskJob's; default: the spec's ``name``)."""
    settings = spec.settings()
    if spec.kind == "local":
        raise ConfigError("kind: local: a local cluster lives only as long as the command that started it, so no "
                          "run is there to look at; give a `kind: scheduler` spec with a running scheduler's address")
    if spec.kind == "ec2":
        raise ConfigError("kind: ec2: a running EC2Cluster cannot be found from its spec; use a `kind: scheduler` "
                          "spec with the address of its scheduler")
    if spec.kind == "kubernetes":
        settings = _running_kubernetes_scheduler(settings, cluster_name or settings.name)
    with _client_of_scheduler(settings) as client:
        yield client


def _running_kubernetes_scheduler(k8s: KubernetesSpec, cluster_name: str) -> SchedulerSpec:
    """The scheduler of the running DaskCluster ``cluster_name``, reached as the operator's ``KubeCluster.from_name``
    reaches it: its scheduler service by name inside the cluster, else through a port-forward. Not through
    KubeCluster itself, which speaks tcp:// only and creates the cluster unless told ``CONNECT_ONLY``."""
    _import("dask_kubernetes.operator", "k8s", "kind: kubernetes")
    import httpx
    import kr8s

    where = f"DaskCluster {cluster_name} in namespace {k8s.namespace}"
    try:
        address = asyncio.run(_kubernetes_scheduler_address(cluster_name, k8s.namespace))
    except (ValueError, OSError, httpx.HTTPError, kr8s.ServerError, kr8s.APITimeoutError) as exc:
        raise SchedulerUnreachable(f"kubernetes: could not look for the {where}: no Kubernetes API reachable from "
                                   f"here ({first_line(exc)}); check kubectl's context (KUBECONFIG)") from exc
    if address is None:
        raise SchedulerUnreachable(f"kubernetes: no running {where}, so no run is there to look at (a DaskJob's "
                                   f"cluster is named <spec name>-<job name>: give --job)")
    if not k8s.tls_secret:
        return SchedulerSpec(address=address)
    import dask

    if not dask.config.get("distributed.comm.tls.ca-file", default=None):
        raise ConfigError(f"kubernetes.tls_secret: the scheduler of the {where} speaks TLS: give this client the "
                          f"Secret {k8s.tls_secret}'s files as Dask's TLS settings "
                          "(DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._CLIENT__CERT, ..._CLIENT__KEY)")
    return SchedulerSpec(address=address.replace("tcp://", "tls://", 1))


async def _kubernetes_scheduler_address(cluster_name: str, namespace: str) -> Optional[str]:
    """The address of ``cluster_name``'s scheduler service (tcp://; a port-forward from outside the cluster), or
    None when there is no such DaskCluster or it has no scheduler service yet."""
    import kr8s
    from dask_kubernetes.constants import SCHEDULER_NAME_TEMPLATE
    from dask_kubernetes.operator import networking
    from dask_kubernetes.operator._objects import DaskCluster

    if not await (await DaskCluster(cluster_name, namespace=namespace)).exists():
        return None
    try:
        return await networking.get_scheduler_address(SCHEDULER_NAME_TEMPLATE.format(cluster_name=cluster_name),
                                                      namespace)
    except kr8s.NotFoundError:
        return None


def _kube_cluster(k8s: KubernetesSpec) -> "dask_kubernetes.operator.KubeCluster":  # noqa: F821
    """dask-kubernetes' KubeCluster for ``k8s``, which reaches its scheduler over tcp:// only (and creates the
    DaskCluster alone, without its NetworkPolicy)."""
    if k8s.tls_secret:
        raise ConfigError("kubernetes.tls_secret: dask-kubernetes' KubeCluster reaches its scheduler over tcp:// only; "
                          "train inside the cluster as a DaskJob (daskgan cluster render SPEC --job JOB | kubectl "
                          "apply -f -), or set tls_secret: null for a plain-TCP cluster driven from here")
    logger.warning("kubernetes: the scheduler of %s speaks plain TCP (tls_secret: null), and KubeCluster creates no "
                   "NetworkPolicy: apply the one `daskgan cluster render` prints", k8s.name)
    operator = _import("dask_kubernetes.operator", "k8s", "kind: kubernetes")
    return operator.KubeCluster(custom_cluster_spec=kubernetes_manifest(k8s), namespace=k8s.namespace)


def _client_of_scheduler(settings: SchedulerSpec) -> "distributed.Client":  # noqa: F821
    from distributed import Client

    security = _scheduler_security(settings)
    try:
        return Client(settings.address, timeout=settings.connect_timeout_s, security=security)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachable(
            f"scheduler.address: no Dask scheduler answered at {settings.address} within "
            f"{settings.connect_timeout_s:.0f}s: is it running, and reachable from here?") from exc


def _scheduler_security(settings: SchedulerSpec) -> Optional["distributed.Security"]:  # noqa: F821
    """The client's side of a tls:// scheduler: the spec's files, else Dask's own TLS settings (None: Dask's)."""
    import dask
    from distributed.security import Security

    if settings.tls_ca_file:
        return Security(tls_ca_file=settings.tls_ca_file, tls_client_cert=settings.tls_cert,
                        tls_client_key=settings.tls_key, require_encryption=True)
    if settings.address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", default=None):
        raise ConfigError("scheduler.address: a tls:// scheduler needs its CA and a client certificate: set "
                          "scheduler.tls_ca_file, tls_cert and tls_key (or Dask's distributed.comm.tls settings)")
    return None


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


def _import(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs the '{extra}' extra: pip install '<daskgan checkout>[{extra}]' "
                           f"({exc})") from exc
