"""The client side: cluster specs and connecting to them (``specs``), the run driver that dispatches training and
recovers from lost workers (``driver``), and the live view of a running job (``monitor``)."""

from daskgan.cluster.specs import (
    ClusterSpec,
    Ec2Spec,
    KubernetesSpec,
    LocalSpec,
    MissingExtra,
    SchedulerSpec,
    connect,
    connect_existing,
    default_cluster_spec,
    load_cluster_spec,
    render,
)

__all__ = ["ClusterSpec", "Ec2Spec", "KubernetesSpec", "LocalSpec", "MissingExtra", "SchedulerSpec", "connect",
           "connect_existing", "default_cluster_spec", "load_cluster_spec", "render"]
