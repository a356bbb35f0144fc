"""``kind: kubernetes``: a DaskCluster for the dask-kubernetes operator (extra ``k8s``), GPU workers, credentials from
a Kubernetes Secret or an IRSA service account.

``render`` gives the DaskCluster manifest and its NetworkPolicy, as a List: TLS between every pod with certificates
from a Secret, and a NetworkPolicy admitting only the cluster's own pods."""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from daskgan.cluster.specs.extras import import_extra
from daskgan.cluster.specs.scheduler import SchedulerSpec
from daskgan.cluster.specs.workers import WORKER_SHARED_MEMORY, environment_variables, worker_environment_variables
from daskgan.config import ConfigError, RecoveryConfig
from daskgan.errors import SchedulerUnreachable, first_line

logger = logging.getLogger(__name__)

# where the pods find the Secret of ``tls_secret`` (its keys as files)
TLS_MOUNT = "/etc/daskgan/tls"


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


def render(k8s: KubernetesSpec) -> dict[str, Any]:
    """A List (what ``kubectl apply -f`` takes as one document) of the DaskCluster manifest and its NetworkPolicy."""
    return {"apiVersion": "v1", "kind": "List", "items": [kubernetes_manifest(k8s), network_policy(k8s, k8s.name)]}


@contextmanager
def connect(k8s: KubernetesSpec) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client of the DaskCluster started here through dask-kubernetes' KubeCluster, shut down on exit."""
    from distributed import Client

    cluster = _kube_cluster(k8s)
    with cluster, Client(cluster) as client:
        yield client


def running_scheduler(k8s: KubernetesSpec, cluster_name: Optional[str] = None) -> SchedulerSpec:
    """The scheduler of the running DaskCluster ``cluster_name`` (a DaskJob's; default: the spec's ``name``),
    reached as the operator's ``KubeCluster.from_name`` reaches it: its scheduler service by name inside the cluster,
    else through a port-forward. Not through KubeCluster itself, which speaks tcp:// only and creates the cluster
    unless told ``CONNECT_ONLY``."""
    import_extra("dask_kubernetes.operator", "k8s", "kind: kubernetes")
    import httpx
    import kr8s

    cluster_name = cluster_name or k8s.name
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


def kubernetes_manifest(k8s: KubernetesSpec, cluster_name: Optional[str] = None,
                        recovery: Optional[RecoveryConfig] = None) -> dict[str, Any]:
    """A DaskCluster (kubernetes.dask.org/v1) built by dask-kubernetes' own ``make_cluster_spec``, then given GPU
    workers with one thread each, node placement, credentials by reference only, TLS from ``tls_secret``, and a
    grace period on eviction long enough for the run's checkpoint (``recovery``: the job's; default: the
    defaults').

    ``cluster_name`` is the name the operator gives the cluster (a DaskJob's cluster is named after the job): its
    scheduler service selects that cluster's scheduler pod, and with TLS the workers are given its tls:// address."""
    cluster_name = cluster_name or k8s.name
    make_cluster_spec = import_extra("dask_kubernetes.operator", "k8s", "kind: kubernetes").make_cluster_spec
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
    operator = import_extra("dask_kubernetes.operator", "k8s", "kind: kubernetes")
    return operator.KubeCluster(custom_cluster_spec=kubernetes_manifest(k8s), namespace=k8s.namespace)

