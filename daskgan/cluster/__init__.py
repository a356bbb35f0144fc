"""The client side: cluster specs and connecting to them (``specs``), the run driver that dispatches training and
recovers from lost workers (``driver``), and the live view of a running job (``monitor``)."""

from daskgan.cluster.specs import (
    ClusterSpec,
    connect,
    connect_existing,
    default_cluster_spec,
    load_cluster_spec,
    render,
)
from daskgan.cluster.specs.ec2 import Ec2Spec
from daskgan.cluster.specs.kubernetes import KubernetesSpec
from daskgan.cluster.specs.local import LocalSpec
from daskgan.cluster.specs.scheduler import SchedulerSpec
from daskgan.errors import MissingExtra

__all__ = ["ClusterSpec", "Ec2Spec", "KubernetesSpec", "LocalSpec", "MissingExtra", "SchedulerSpec", "connect",
           "connect_existing", "default_cluster_spec", "load_cluster_spec", "render"]
