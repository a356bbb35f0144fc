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

Each kind is a module of this package (``local``, ``scheduler``, ``kubernetes``, ``ec2``) holding its section's
dataclass and three functions of that section: ``render``, ``connect`` (a context manager of a Client) and
``running_scheduler`` (the scheduler of a cluster already running, for commands that only look); what every
backend's workers are given is ``workers``. A new kind is one module and one field of ``ClusterSpec``.

Whoever reaches a scheduler can run code on its workers and read their credentials, so nothing listens beyond what
needs it: a local cluster (and its dashboard) on loopback, with distributed's TLS on request; on Kubernetes, TLS
between every pod with certificates from a Secret, and a NetworkPolicy admitting only the cluster's own pods; EC2
clusters get dask-cloudprovider's own default, TLS with a throwaway CA.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

from daskgan.cluster.specs import ec2, kubernetes, local, scheduler
from daskgan.cluster.specs.ec2 import Ec2Spec
from daskgan.cluster.specs.kubernetes import KubernetesSpec
from daskgan.cluster.specs.local import LocalSpec, local_workers
from daskgan.cluster.specs.scheduler import SchedulerSpec
from daskgan.config import ConfigError, build_dataclass, load_yaml_mapping

SECRET_LOOKING_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.IGNORECASE)

# each kind's module, named as its section
BACKENDS: dict[str, ModuleType] = {"local": local, "scheduler": scheduler, "kubernetes": kubernetes, "ec2": ec2}


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


def render(spec: ClusterSpec) -> dict[str, Any]:
    """The exact object the backend gets: LocalCluster/EC2Cluster keyword arguments, or for Kubernetes a List (what
    ``kubectl apply -f`` takes as one document) of the DaskCluster manifest and its NetworkPolicy."""
    return BACKENDS[spec.kind].render(spec.settings())


@contextmanager
def connect(spec: ClusterSpec) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client for ``spec``; a cluster started here is shut down on exit."""
    with BACKENDS[spec.kind].connect(spec.settings()) as client:
        yield client


@contextmanager
def connect_existing(spec: ClusterSpec, cluster_name: Optional[str] = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """A Client of a cluster that is already running, never one started here: looking at runs (``runs``,
    ``status``, ``attach``, ``stop``) must not start 4 GPU pods to list them, nor a local cluster to find nothing
    there. ``cluster_name``: the DaskCluster to find on Kubernetes (a DaskJob's; default: the spec's ``name``)."""
    with scheduler.connect(BACKENDS[spec.kind].running_scheduler(spec.settings(), cluster_name)) as client:
        yield client
