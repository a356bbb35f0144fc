"""A training as a dask-kubernetes ``DaskJob``: the run's driver in a pod of its own, beside the cluster it drives.

The operator starts the DaskCluster of the job's spec and a runner pod whose containers find its scheduler in
``DASK_SCHEDULER_ADDRESS`` (the operator sets it); the runner runs ``daskgan train`` on the job file, which a
ConfigMap mounts. Nothing depends on the machine that applied the manifest, so the run is detached by construction.
When the runner exits 0 the operator marks the job successful and removes the cluster. The runner drives the run
up to ``RUNNER_ATTEMPTS`` times, each resuming from the newest checkpoint, when the driver fails for a reason
other than the job's own; an error of the job's own (a bad setting, dataset or checkpoint) or the last failure
ends it (``restartPolicy: Never``: Kubernetes' ``OnFailure`` retried a permanent error forever while the GPU
cluster stayed allocated), and the operator marks the job failed and removes the cluster.
The runner holds no storage credentials: the client side of a run never touches the run directory. With the spec's
``tls_secret`` it is a TLS client of its scheduler like the workers, and the job's NetworkPolicy admits its pod.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Sequence

from daskgan.cluster.specs.kubernetes import (
    KubernetesSpec,
    add_tls_secret,
    kubernetes_manifest,
    network_policy,
    scheduler_address_variable,
    tls_environment_variables,
)
from daskgan.config import ConfigError, load_job

JOB_MOUNT = "/etc/daskgan"
JOB_FILE = "job.yaml"
RUNNER_ATTEMPTS = 3  # the driver's tries after failures not of the job's own making (run_job_attempts)


def daskjob_manifests(k8s: KubernetesSpec, job_path: str | Path, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The ConfigMap holding the job file, the NetworkPolicy of the job's cluster, and the DaskJob
    (kubernetes.dask.org/v1) that trains it.

    The job is validated first, as ``daskgan train`` would for this cluster's size, with the command line's
    ``overrides`` (``key=value``), which the runner is given after the job file as ``daskgan train`` was. All are named
    ``<spec name>-<job name>`` (so one spec serves many jobs; the operator names the job's DaskCluster the same,
    and its scheduler service ``<that>-scheduler``)."""
    job = load_job(job_path, workers=k8s.n_workers, overrides=overrides)
    if job.sandbox:
        raise ConfigError(f"{job_path}: sandbox: runs on this machine only (a loopback S3 server); a DaskJob needs "
                          "a job on storage the cluster reaches")
    name = daskjob_name(k8s, job.name)
    metadata = {"name": name, "namespace": k8s.namespace}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": dict(metadata),
                  "data": {JOB_FILE: _job_file_text(Path(job_path), job.name)}}
    cluster = kubernetes_manifest(k8s, cluster_name=name, recovery=job.recovery)
    daskjob = {"apiVersion": cluster["apiVersion"], "kind": "DaskJob", "metadata": dict(metadata),
               "spec": {"job": {"spec": _runner_pod(k8s, cluster, overrides)}, "cluster": {"spec": cluster["spec"]}}}
    return [config_map, network_policy(k8s, name), daskjob]


def daskjob_name(k8s: KubernetesSpec, job_name: str) -> str:
    """The name of job ``job_name``'s DaskJob on the cluster of ``k8s``, which the operator gives its DaskCluster too:
    ``daskgan cluster render --job`` names the objects it creates so, ``runs``/``status``/... ``--job`` find them."""
    return kubernetes_name(f"{k8s.name}-{job_name}")


def kubernetes_name(text: str) -> str:
    """``text`` as a Kubernetes object name (lowercase RFC 1123: letters, digits, '-'; at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    if not name:
        raise ConfigError(f"name: {text!r} gives no Kubernetes object name (letters, digits and '-')")
    return name


def _job_file_text(job_path: Path, name: str) -> str:
    """The job file as written (comments kept, trailing blanks dropped), named as ``daskgan train`` named it here:
    in the pod it is ``job.yaml``, which would otherwise name the run ``job``."""
    lines = [line.rstrip() for line in job_path.read_text().splitlines()]
    has_name = any(re.match(r"name\s*:", line) for line in lines)
    return "\n".join(lines if has_name else [f"name: {name}", *lines]) + "\n"


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """The manifests as YAML documents for ``kubectl apply -f``, multi-line strings (the job file) as blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # the same dict twice is written out twice, not as &id001
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump_all(manifests, Dumper=Dumper, sort_keys=False)


def _runner_pod(k8s: KubernetesSpec, cluster: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The driver's pod: ``daskgan train`` on the job file (the ConfigMap named as the cluster) and ``overrides``,
    against the cluster's scheduler (the operator's address, or its tls:// one with the Secret's client certificate)."""
    env = {**k8s.env, **tls_environment_variables(k8s)}
    container = {
        "name": "driver", "image": k8s.image,
        "args": ["daskgan", "train", f"{JOB_MOUNT}/{JOB_FILE}", "--no-progress", "--attempts", str(RUNNER_ATTEMPTS),
                 *overrides],
        "env": [{"name": name, "value": str(value)} for name, value in env.items()],
        "resources": copy.deepcopy(k8s.scheduler_resources),
        "volumeMounts": [{"name": "job", "mountPath": JOB_MOUNT, "readOnly": True}],
    }
    pod = {"restartPolicy": "Never", "containers": [container],
           "volumes": [{"name": "job", "configMap": {"name": cluster["metadata"]["name"]}}]}
    if k8s.tls_secret:
        add_tls_secret(pod, k8s)
        container["env"].append(scheduler_address_variable(cluster))
    return pod
