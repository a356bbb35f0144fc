"""Cluster specs: every example renders, and the Kubernetes manifest is what dask-kubernetes' CRD accepts."""

import inspect
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from daskgan.cluster import MissingExtra, load_cluster_spec, render
from daskgan.config import ConfigError
from daskgan.tools.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "cluster").glob("*.yaml"))


def operator_schema(crd: str | None = None):
    """dask-kubernetes' DaskCluster schema (or, with ``crd``, the openAPI schema of that CRD file, e.g.
    ``daskjob.yaml``), its internal references made local; k8s PodSpec/ServiceSpec references (resolved from a
    package not available here) are checked separately against the kubernetes client's models."""
    import dask_kubernetes

    folder = Path(dask_kubernetes.__file__).parent / "operator" / "customresources"

    def local(text: str) -> str:
        return text.replace("python://dask_kubernetes/operator/customresources/templates.yaml#", "#")

    definitions = yaml.safe_load(local((folder / "templates.yaml").read_text()))["definitions"]

    def local_refs(node):
        if isinstance(node, dict):
            if str(node.get("$ref", "")).startswith("python://k8s_crd_resolver"):
                return {"type": "object"}
            return {k: local_refs(v) for k, v in node.items()}
        return [local_refs(v) for v in node] if isinstance(node, list) else node

    definitions = local_refs(definitions)
    if crd is None:
        return {**definitions["dask.k8s.api.v1.DaskCluster"], "definitions": definitions}
    schema = yaml.safe_load(local((folder / crd).read_text()))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return {**local_refs(schema), "definitions": definitions}


def check_k8s_model(data, type_name, path):
    """Every key must be a field of the kubernetes API type, recursively (catches typos like nodeSelecter)."""
    import kubernetes.client.models as models

    if type_name.startswith("list["):
        for i, item in enumerate(data):
            check_k8s_model(item, type_name[5:-1], f"{path}[{i}]")
    elif type_name.startswith("dict("):
        for key, value in data.items():
            check_k8s_model(value, type_name.split(",", 1)[1][:-1].strip(), f"{path}.{key}")
    elif hasattr(models, type_name):
        model = getattr(models, type_name)
        assert isinstance(data, dict), f"{path}: expected an object for {type_name}"
        fields = {json_name: name for name, json_name in model.attribute_map.items()}
        for key, value in data.items():
            assert key in fields, f"{path}.{key} is not a field of {type_name}"
            check_k8s_model(value, model.openapi_types[fields[key]], f"{path}.{key}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_renders(path):
    assert render(load_cluster_spec(path))


def test_kubernetes_manifest_is_a_valid_daskcluster_with_gpus_and_secret_refs():
    import jsonschema
    from dask_kubernetes.operator import make_cluster_spec

    manifest, _ = render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))["items"]
    jsonschema.validate(manifest, operator_schema())
    check_k8s_model(manifest["spec"]["worker"]["spec"], "V1PodSpec", "worker.spec")
    check_k8s_model(manifest["spec"]["scheduler"]["spec"], "V1PodSpec", "scheduler.spec")
    check_k8s_model(manifest["spec"]["scheduler"]["service"], "V1ServiceSpec", "scheduler.service")

    base = make_cluster_spec(name="daskgan", image="x")
    assert (manifest["apiVersion"], manifest["kind"]) == (base["apiVersion"], base["kind"])
    assert manifest["metadata"] == {"name": "daskgan", "namespace": "gan-training"}
    assert manifest["spec"]["worker"]["replicas"] == 4
    worker_pod = manifest["spec"]["worker"]["spec"]
    worker = worker_pod["containers"][0]
    assert worker["args"][:len(base["spec"]["worker"]["spec"]["containers"][0]["args"])] == \
        base["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert worker["args"][-2:] == ["--nthreads", "1"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(manifest["spec"]["scheduler"]["spec"]["containers"][0]["resources"])
    assert worker_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert worker_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    env = {e["name"]: e for e in worker["env"]}
    assert env["AWS_REGION"]["value"] == "us-east-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "daskgan-aws", "key": key}}}
    assert "MALLOC_TRIM_THRESHOLD_" not in env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]["value"]
    shm = {volume["name"]: volume for volume in worker_pod["volumes"]}[worker["volumeMounts"][0]["name"]]
    assert worker["volumeMounts"][0]["mountPath"] == "/dev/shm", "decoding processes and NCCL outgrow a pod's 64 MB"
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_irsa_service_account_instead_of_a_secret(tmp_path):
    spec = yaml.safe_load((ROOT / "cluster" / "kubernetes.yaml").read_text())
    del spec["kubernetes"]["aws_secret"]
    spec["kubernetes"]["service_account"] = "daskgan-irsa"
    path = tmp_path / "irsa.yaml"
    path.write_text(yaml.safe_dump(spec))
    worker_pod = render(load_cluster_spec(path))["items"][0]["spec"]["worker"]["spec"]
    assert worker_pod["serviceAccountName"] == "daskgan-irsa"
    assert "secretKeyRef" not in str(worker_pod)


def test_ec2_arguments_are_ones_ec2cluster_takes():
    from dask_cloudprovider.aws import EC2Cluster
    from dask_cloudprovider.generic.vmcluster import VMCluster

    accepted = {*inspect.signature(EC2Cluster.__init__).parameters, *inspect.signature(VMCluster.__init__).parameters}
    arguments = render(load_cluster_spec(ROOT / "cluster" / "aws-ec2.yaml"))["EC2Cluster"]
    assert set(arguments) <= accepted
    assert arguments["iam_instance_profile"] == {"Name": "daskgan-s3-access"}
    assert arguments["worker_instance_type"] == "g5.xlarge" and arguments["spot"] is True
    assert arguments["docker_args"] == "--shm-size=2g", "Docker's /dev/shm is 64 MB"


@pytest.mark.parametrize("text, message", [
    ("kind: kubernetes\nkubernetes:\n  image: x\n  imagee: y\n", "kubernetes.imagee: unknown key"),
    ("kind: kubernetes\n", "kubernetes: required for kind: kubernetes"),
    ("kind: local\nlocal:\n  n_workers: 0\n", "local.n_workers: must be >= 1"),
    ("kind: kubernetes\nkubernetes:\n  image: x\n  termination_grace_s: 0\n",
     "kubernetes.termination_grace_s: must be >= 1"),
    ("kind: local\nec2:\n  region: r\n  docker_image: i\n", "ec2: given, but kind is local"),
    ("kind: slurm\n", "kind: must be one of local, scheduler, kubernetes, ec2"),
    ("kind: kubernetes\nkubernetes:\n  image: x\n  env: {AWS_SECRET_ACCESS_KEY: abc}\n",
     "kubernetes.env.AWS_SECRET_ACCESS_KEY: credentials do not belong"),
    ("kind: kubernetes\nkubernetes:\n  image: x\n  tolerations: {key: a}\n", "kubernetes.tolerations: expected a list"),
])
def test_bad_specs_name_the_key(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_cluster_spec(path)


def test_missing_backend_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(MissingExtra, match=r"pip install '<daskgan checkout>\[k8s\]'"):
        render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml")]) == 2
    assert "<daskgan checkout>[k8s]" in capsys.readouterr().err


def test_cli_render_prints_the_manifest(capsys):
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml")]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))
    assert "&id" not in out, "no YAML anchors for a reader to follow"


def rendered_daskjob(tmp_path, job: dict, spec: str = "kubernetes.yaml", overrides: tuple = ()) -> list[dict]:
    """``daskgan cluster render <spec> --job <job> [overrides]`` as the YAML documents it prints."""
    import contextlib
    import io

    path = tmp_path / "my_job.yaml"
    path.write_text(yaml.safe_dump(job))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["cluster", "render", str(ROOT / "cluster" / spec), "--job", str(path), *overrides]) == 0
    return list(yaml.safe_load_all(printed.getvalue()))


PLAIN_JOB = {"data": {"url": "s3://datasets/shapes", "resolution": 16}, "output": {"run_url": "s3://runs/shapes"}}


def test_a_job_renders_as_a_daskjob_the_operator_accepts(tmp_path):
    import jsonschema

    from daskgan.config import load_job

    config_map, policy, daskjob = rendered_daskjob(tmp_path, PLAIN_JOB)
    jsonschema.validate(daskjob, operator_schema("daskjob.yaml"))
    check_network_policy(policy, "daskgan-my-job", "gan-training")
    runner = daskjob["spec"]["job"]["spec"]
    check_k8s_model(runner, "V1PodSpec", "job.spec")
    check_k8s_model(daskjob["spec"]["cluster"]["spec"]["worker"]["spec"], "V1PodSpec", "cluster.worker.spec")
    check_k8s_model(config_map, "V1ConfigMap", "configmap")
    assert daskjob["metadata"] == config_map["metadata"] == {"name": "daskgan-my-job", "namespace": "gan-training"}
    cluster = daskjob["spec"]["cluster"]["spec"]
    assert cluster["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "daskgan-my-job", \
        "the operator names the job's cluster after the job and labels its scheduler pod so"
    standalone, _ = kubernetes_objects()
    renamed = yaml.safe_dump(standalone["spec"]).replace("daskgan-scheduler.", "daskgan-my-job-scheduler.")
    assert cluster == {**yaml.safe_load(renamed), "scheduler": cluster["scheduler"]}
    assert {**cluster["scheduler"], "service": None} == {**standalone["spec"]["scheduler"], "service": None}

    driver = runner["containers"][0]
    assert runner["restartPolicy"] == "Never", "a permanent error must end the job and free its GPUs"
    mounts = {m["name"]: m for m in driver["volumeMounts"]}
    assert {v["name"]: v for v in runner["volumes"]} == {
        "job": {"name": "job", "configMap": {"name": config_map["metadata"]["name"]}},
        "tls": {"name": "tls", "secret": {"secretName": "daskgan-tls"}}}
    job_file, = config_map["data"]
    assert driver["args"][:3] == ["daskgan", "train", f"{mounts['job']['mountPath']}/{job_file}"]
    driver_env = {e["name"]: e["value"] for e in driver["env"]}
    assert driver_env["DASK_SCHEDULER_ADDRESS"] == "tls://daskgan-my-job-scheduler.gan-training.svc.cluster.local:8786"
    assert tls_environment(driver) == tls_environment(cluster["worker"]["spec"]["containers"][0])
    assert "secretKeyRef" not in str(runner), "the driver never touches storage: it gets no credentials"

    mounted = tmp_path / "mounted" / job_file
    mounted.parent.mkdir()
    mounted.write_text(config_map["data"][job_file])
    assert load_job(mounted) == load_job(tmp_path / "my_job.yaml"), "the pod trains the same job, under its name"


def test_a_daskjob_runner_trains_with_the_overrides_it_was_rendered_with(tmp_path, capsys):
    *_, daskjob = rendered_daskjob(tmp_path, PLAIN_JOB, overrides=("train.iterations=7", "data.batch_size=4"))
    assert daskjob["spec"]["job"]["spec"]["containers"][0]["args"][-2:] == ["train.iterations=7", "data.batch_size=4"]
    path = tmp_path / "my_job.yaml"
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml"), "--job", str(path),
                 "train.iterations=many"]) == 2
    assert "my_job.yaml: train.iterations: expected an integer, got 'many'" in capsys.readouterr().err
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml"), "train.iterations=7"]) == 2
    assert "train.iterations=7: overrides apply to a job: give --job" in capsys.readouterr().err


def test_daskjob_refuses_what_cannot_run_there(tmp_path, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({**PLAIN_JOB, "sandbox": {"s3_server": True}}))
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml"), "--job", str(path)]) == 2
    assert "sandbox: runs on this machine only" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(PLAIN_JOB))
    assert main(["cluster", "render", str(ROOT / "cluster" / "local.yaml"), "--job", str(path)]) == 2
    assert "a DaskJob needs a kubernetes cluster spec" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**PLAIN_JOB, "data": {"url": "s3://d", "resolution": "big"}}))
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml"), "--job", str(path)]) == 2
    assert "data.resolution" in capsys.readouterr().err


def test_worker_pods_are_given_the_grace_their_runs_checkpoint_needs_before_eviction_kills_them(tmp_path, capsys):
    from daskgan.config import RecoveryConfig

    standalone, _ = kubernetes_objects()
    assert standalone["spec"]["worker"]["spec"]["terminationGracePeriodSeconds"] > RecoveryConfig().notice_grace_s
    slow = {**PLAIN_JOB, "recovery": {"notice_grace_s": 600}}
    *_, daskjob = rendered_daskjob(tmp_path, slow)
    assert daskjob["spec"]["cluster"]["spec"]["worker"]["spec"]["terminationGracePeriodSeconds"] > 600

    spec = yaml.safe_load((ROOT / "cluster" / "kubernetes.yaml").read_text())
    spec["kubernetes"]["termination_grace_s"] = 300
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(spec))
    assert main(["cluster", "render", str(tmp_path / "short.yaml"), "--job", str(tmp_path / "my_job.yaml")]) == 2
    assert ("kubernetes.termination_grace_s: 300 s is shorter than the job's recovery.notice_grace_s (600 s)"
            in capsys.readouterr().err)
    *_, daskjob = rendered_daskjob(tmp_path, PLAIN_JOB, spec=str(tmp_path / "short.yaml"))
    assert daskjob["spec"]["cluster"]["spec"]["worker"]["spec"]["terminationGracePeriodSeconds"] == 300


def test_without_a_spec_a_command_uses_dask_scheduler_address(monkeypatch):
    import dask

    from daskgan.cluster import default_cluster_spec

    with dask.config.set({"scheduler-address": None}):
        assert default_cluster_spec().kind == "local"
    with dask.config.set({"scheduler-address": "tcp://daskgan-my-job-scheduler.gan-training.svc:8786"}):
        spec = default_cluster_spec()
    assert (spec.kind, spec.scheduler.address) == ("scheduler", "tcp://daskgan-my-job-scheduler.gan-training.svc:8786")


# --- network exposure: what listens where, and who may talk to the scheduler -----------------------------------------

def listening_sockets() -> set[tuple[str, int]]:
    """The (IP address, port) pairs this process and its children (a local cluster's workers) accept connections on."""
    import psutil

    me = psutil.Process()
    return {(connection.laddr.ip, connection.laddr.port) for process in [me, *me.children(recursive=True)]
            for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN}


def test_a_local_cluster_listens_on_loopback_only_dashboard_included():
    """Only what the cluster opened counts: other tests' servers (the session's cluster, S3, a torch store) stay."""
    from daskgan.cluster import ClusterSpec, LocalSpec, connect

    before = listening_sockets()
    with connect(ClusterSpec(local=LocalSpec(n_workers=1))) as client:
        assert client.dashboard_link
        opened = listening_sockets() - before
    assert opened, "the cluster's own sockets were found"
    assert {ip for ip, _ in opened} <= {"127.0.0.1", "::1"}, f"the cluster served every interface: {opened}"


def test_a_tls_local_cluster_runs_tasks_over_tls_and_refuses_plain_tcp(tmp_path):
    from distributed import Client

    from daskgan.cluster import connect

    path = tmp_path / "local.yaml"
    path.write_text("kind: local\nlocal:\n  n_workers: 1\n  tls: true\n")
    spec = load_cluster_spec(path)
    assert render(spec)["LocalCluster"]["security"] is True
    with connect(spec) as client:
        assert client.scheduler.address.startswith("tls://")
        assert all(worker.startswith("tls://") for worker in client.scheduler_info()["workers"])
        assert client.submit(sum, [1, 2, 3]).result() == 6
        plain = client.scheduler.address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=3)

        security = client.cluster.security  # its throwaway CA, as files a scheduler spec names
        files = {"tls_ca_file": security.tls_ca_file, "tls_cert": security.tls_client_cert,
                 "tls_key": security.tls_client_key}
        for name, pem in files.items():
            (tmp_path / name).write_text(pem)
        path.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {
            "address": client.scheduler.address, **{name: str(tmp_path / name) for name in files}}}))
        with connect(load_cluster_spec(path)) as other:
            assert other.submit(sum, [4, 5]).result() == 9


def test_a_tls_local_cluster_without_cryptography_names_the_package(monkeypatch):
    from daskgan.cluster import ClusterSpec, LocalSpec, connect

    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(MissingExtra, match=r"local\.tls: .*pip install cryptography"):
        with connect(ClusterSpec(local=LocalSpec(n_workers=1, tls=True))):
            pass


def kubernetes_objects(spec: str = "kubernetes.yaml", **changes) -> list[dict]:
    """``render`` of a Kubernetes spec from ``cluster/``, with ``changes`` to its ``kubernetes`` section."""
    import tempfile

    data = yaml.safe_load((ROOT / "cluster" / spec).read_text())
    data["kubernetes"].update(changes)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / spec
        path.write_text(yaml.safe_dump(data))
        rendered = render(load_cluster_spec(path))
    assert (rendered["apiVersion"], rendered["kind"]) == ("v1", "List"), "one document for kubectl apply -f"
    return rendered["items"]


def check_k8s_object(data: dict, type_name: str) -> None:
    """``data`` as the Kubernetes API type: every key a field (recursively), and every required field present with
    a value the kubernetes client's model accepts (it raises ValueError otherwise). No OpenAPI document of the
    Kubernetes API ships in an installed package, so the client's generated models stand in for it."""
    from kubernetes.client import ApiClient

    check_k8s_model(data, type_name, type_name)
    assert ApiClient()._ApiClient__deserialize(data, type_name).to_dict()


def check_network_policy(policy: dict, cluster: str, namespace: str) -> None:
    """The policy admits, on every port, only the pods of ``cluster`` (its scheduler, workers, job runner: the
    operator labels each ``dask.org/cluster-name``) to the pods of ``cluster``."""
    check_k8s_object(policy, "V1NetworkPolicy")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"] == {"name": cluster, "namespace": namespace}
    own = {"matchLabels": {"dask.org/cluster-name": cluster}}
    assert policy["spec"]["podSelector"] == own
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rule, = policy["spec"]["ingress"]
    assert "ports" not in rule, "workers, ranks and TCPStore use ports of their own choosing"
    assert rule["from"][0] == {"podSelector": own}


def tls_environment(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container["env"] if e["name"].startswith("DASK_DISTRIBUTED__COMM__")}


def test_kubernetes_objects_are_a_tls_daskcluster_and_a_network_policy():
    import jsonschema

    cluster, policy = kubernetes_objects()
    jsonschema.validate(cluster, operator_schema())
    check_network_policy(policy, "daskgan", "gan-training")
    scheduler_pod, worker_pod = cluster["spec"]["scheduler"]["spec"], cluster["spec"]["worker"]["spec"]
    scheduler, worker = scheduler_pod["containers"][0], worker_pod["containers"][0]
    assert scheduler["args"][-2:] == ["--protocol", "tls"]
    for pod, container in ((scheduler_pod, scheduler), (worker_pod, worker)):
        check_k8s_object(pod, "V1PodSpec")
        volume = {v["name"]: v for v in pod["volumes"]}["tls"]
        assert volume == {"name": "tls", "secret": {"secretName": "daskgan-tls"}}
        mount, = (m for m in container["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        assert dask_setting(container, "distributed.comm.require-encryption") is True, "no plain tcp:// in or out"
        assert dask_setting(container, "distributed.comm.tls.ca-file") == f"{mount['mountPath']}/ca.crt"
        for role in ("scheduler", "worker", "client"):
            assert dask_setting(container, f"distributed.comm.tls.{role}.cert") == f"{mount['mountPath']}/tls.crt"
            assert dask_setting(container, f"distributed.comm.tls.{role}.key") == f"{mount['mountPath']}/tls.key"
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["DASK_SCHEDULER_ADDRESS"] == "tls://daskgan-scheduler.gan-training.svc.cluster.local:8786", \
        "the operator would set tcp://"
    assert "secretKeyRef" not in str(tls_environment(worker)), "the certificate travels as files, not variables"


def dask_setting(container: dict, key: str):
    """The Dask setting ``key`` as a container's ``DASK_*`` variables give it (as Dask itself reads them)."""
    import dask

    return dask.config.get(key, config=dask.config.collect_env({e["name"]: e["value"] for e in container["env"]
                                                                 if "value" in e}))


def test_plain_tcp_on_kubernetes_is_an_explicit_choice_and_other_pods_can_be_admitted():
    cluster, policy = kubernetes_objects(tls_secret=None, client_pods={"app": "notebook"})
    scheduler = cluster["spec"]["scheduler"]
    assert "tls" not in str(scheduler) and "--protocol" not in scheduler["spec"]["containers"][0]["args"]
    assert "DASK_SCHEDULER_ADDRESS" not in str(cluster), "the operator's tcp:// address is right then"
    check_k8s_object(policy, "V1NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][1] == {"podSelector": {"matchLabels": {"app": "notebook"}}}


def test_kubeclusters_plain_tcp_to_its_scheduler_is_refused_with_tls(tmp_path):
    """dask-kubernetes' KubeCluster reaches its scheduler over tcp:// only: a TLS spec says what to do instead."""
    from daskgan.cluster import connect

    with pytest.raises(ConfigError, match=r"kubernetes\.tls_secret: .*tcp:// only.*DaskJob"):
        with connect(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml")):
            pass


@pytest.mark.parametrize("text, message", [
    ("kind: scheduler\nscheduler:\n  address: tcp://h:8786\n  tls_ca_file: ca.pem\n  tls_cert: c\n  tls_key: k\n",
     "scheduler.tls_ca_file: given, but scheduler.address is tcp://h:8786"),
    ("kind: scheduler\nscheduler:\n  address: tls://h:8786\n  tls_ca_file: ca.pem\n",
     "scheduler.tls_cert, tls_key: needed with scheduler.tls_ca_file"),
])
def test_bad_tls_combinations_name_the_key(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_cluster_spec(path)


def test_a_tls_scheduler_without_certificates_is_one_line(tmp_path):
    import dask

    from daskgan.cluster import connect

    path = tmp_path / "spec.yaml"
    path.write_text("kind: scheduler\nscheduler:\n  address: tls://127.0.0.1:9\n")
    with dask.config.set({"distributed.comm.tls.ca-file": None}):
        with pytest.raises(ConfigError, match=r"scheduler\.address: a tls:// scheduler needs .*tls_ca_file"):
            with connect(load_cluster_spec(path)):
                pass


def write_secret(folder: Path) -> Path:
    """A Secret's files as the pods see them (``ca.crt``, ``tls.crt``, ``tls.key``), from distributed's own
    throwaway CA: one certificate for every role, as ``Security.temporary()`` makes it."""
    from distributed.security import Security

    security = Security.temporary()
    folder.mkdir()
    for name, pem in (("ca.crt", security.tls_ca_file), ("tls.crt", security.tls_client_cert),
                      ("tls.key", security.tls_client_key)):
        (folder / name).write_text(pem)
    return folder


def test_rendered_pods_run_here_speak_tls_and_the_job_runner_connects(tmp_path):
    """The scheduler's and a worker's container of the rendered DaskJob, run as processes here with their own args
    and environment (the Secret's mount a folder here, the service name loopback), and the runner's environment as
    the client's: a task runs over tls://, and a plain tcp:// client is refused."""
    import copy
    import os
    import subprocess

    import dask
    from distributed import Client

    from daskgan.cluster import connect, default_cluster_spec
    from daskgan.cluster.daskjob import daskjob_manifests
    from daskgan.tools.sandbox import free_port

    job = tmp_path / "my_job.yaml"
    job.write_text(yaml.safe_dump(PLAIN_JOB))
    k8s = load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml").settings()
    config_map, policy, daskjob = daskjob_manifests(k8s, job)
    cluster, runner = daskjob["spec"]["cluster"]["spec"], daskjob["spec"]["job"]["spec"]
    secret = write_secret(tmp_path / "secret")
    port = free_port()
    service = "daskgan-my-job-scheduler.gan-training.svc.cluster.local:8786"

    def here(container: dict) -> dict:
        """The container's plain environment variables with the Secret's mount and the service moved here."""
        mount, = (m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
        return {e["name"]: e["value"].replace(mount, str(secret)).replace(service, f"127.0.0.1:{port}")
                for e in container["env"] if "value" in e}

    def start(container: dict, module: str, *local: str) -> subprocess.Popen:
        args = [arg.replace("0.0.0.0", "127.0.0.1") for arg in container["args"][1:]]
        env = {**os.environ, **here(container), "DASK_WORKER_NAME": "worker-0"}
        args = [arg.replace("$(DASK_WORKER_NAME)", "worker-0") for arg in args]
        return subprocess.Popen([sys.executable, "-m", module, *args, *local], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / f"{module}.log", "w"))

    scheduler = start(cluster["scheduler"]["spec"]["containers"][0], "distributed.cli.dask_scheduler",
                      "--port", str(port), "--dashboard-address", "127.0.0.1:0")
    worker = start(cluster["worker"]["spec"]["containers"][0], "distributed.cli.dask_worker",
                   "--dashboard-address", "127.0.0.1:0", "--host", "127.0.0.1")
    try:
        as_in_the_pod = dask.config.update(copy.deepcopy(dask.config.config),
                                           dask.config.collect_env(here(runner["containers"][0])))
        with dask.config.set(as_in_the_pod):
            spec = default_cluster_spec()
            assert spec.scheduler.address == f"tls://127.0.0.1:{port}"
            with connect(spec) as client:
                client.wait_for_workers(1, timeout=60)
                assert all(address.startswith("tls://") for address in client.scheduler_info()["workers"])
                assert client.submit(sum, [1, 2, 3]).result() == 6
        with pytest.raises((OSError, TimeoutError)):
            Client(f"tcp://127.0.0.1:{port}", timeout=3)
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait()


# --- looking at runs (runs, status, attach, stop): a running cluster is connected to, none is ever started ----------

LOOKING = [["runs"], ["status", "s3://bucket/run"], ["attach", "s3://bucket/run"], ["stop", "s3://bucket/run"]]


@pytest.fixture
def nothing_started(monkeypatch):
    """Every way a command could start a cluster fails loudly: KubeCluster, a DaskCluster's creation, LocalCluster."""
    import distributed
    from dask_kubernetes.operator import KubeCluster
    from dask_kubernetes.operator._objects import DaskCluster

    def refuse(*args, **kwargs):
        raise AssertionError("a command that looks at runs started a cluster")

    for owner, name in [(KubeCluster, "__init__"), (DaskCluster, "create"), (distributed, "LocalCluster")]:
        monkeypatch.setattr(owner, name, refuse)


def one_error_line(capsys, *names: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def kubernetes_spec(folder: Path, **changes) -> Path:
    """cluster/kubernetes.yaml with ``changes`` to its ``kubernetes`` section, written into ``folder``."""
    data = yaml.safe_load((ROOT / "cluster" / "kubernetes.yaml").read_text())
    data["kubernetes"].update(changes)
    path = folder / "kubernetes.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def kubernetes_with_daskclusters(monkeypatch, running: bool) -> list[tuple[str, str]]:
    """A Kubernetes API (kr8s') that answers whether a DaskCluster exists with ``running``; returns the
    (name, namespace) of each DaskCluster asked for."""
    import kr8s
    from dask_kubernetes.operator._objects import DaskCluster

    asked = []

    async def api(**kwargs):  # kr8s' Api, as far as a DaskCluster of a given namespace uses it
        return SimpleNamespace(namespace="default")

    async def exists(self, ensure=False):
        asked.append((self.name, self.namespace))
        return running

    monkeypatch.setattr(kr8s.asyncio, "api", api)
    monkeypatch.setattr(DaskCluster, "exists", exists)
    return asked


def dead_kubeconfig(folder: Path) -> Path:
    """A kubeconfig whose API server is a loopback port where nothing listens."""
    from daskgan.tools.sandbox import free_port

    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}]}))
    return path


@pytest.mark.parametrize("command", LOOKING, ids=lambda c: c[0])
def test_looking_without_kubernetes_credentials_is_one_line_and_starts_nothing(command, tmp_path, monkeypatch,
                                                                                capsys, nothing_started):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    assert main([*command, "--cluster", str(ROOT / "cluster" / "kubernetes.yaml")]) == 2
    one_error_line(capsys, "DaskCluster daskgan in namespace gan-training", "no Kubernetes API", "KUBECONFIG")


@pytest.mark.parametrize("command", LOOKING, ids=lambda c: c[0])
def test_looking_at_an_unreachable_kubernetes_api_is_one_line_and_starts_nothing(command, tmp_path, monkeypatch,
                                                                                  capsys, nothing_started):
    """A plain-TCP spec, which KubeCluster would have created the cluster of."""
    monkeypatch.setenv("KUBECONFIG", str(dead_kubeconfig(tmp_path)))
    assert main([*command, "--cluster", str(kubernetes_spec(tmp_path, tls_secret=None))]) == 2
    one_error_line(capsys, "no Kubernetes API", "All connection attempts failed")


def test_a_daskjobs_cluster_that_is_not_running_is_one_line(tmp_path, monkeypatch, capsys, nothing_started):
    asked = kubernetes_with_daskclusters(monkeypatch, running=False)
    job = tmp_path / "my_job.yaml"
    job.write_text(yaml.safe_dump(PLAIN_JOB))
    assert main(["runs", "--cluster", str(ROOT / "cluster" / "kubernetes.yaml"), "--job", str(job)]) == 2
    one_error_line(capsys, "no running DaskCluster daskgan-my-job in namespace gan-training")
    assert asked == [("daskgan-my-job", "gan-training")], "the name `cluster render --job` gives the DaskJob"


def test_a_running_daskcluster_is_reached_through_its_scheduler_service(dask_client, tmp_path, monkeypatch, capsys,
                                                                         nothing_started):
    from dask_kubernetes.operator import networking

    services = []

    async def scheduler_address(service_name, namespace, **kwargs):  # a port-forward, from outside the cluster
        services.append((service_name, namespace))
        return dask_client.scheduler.address

    asked = kubernetes_with_daskclusters(monkeypatch, running=True)
    monkeypatch.setattr(networking, "get_scheduler_address", scheduler_address)
    assert main(["runs", "--cluster", str(kubernetes_spec(tmp_path, tls_secret=None))]) == 0
    assert "0 run(s) with a live driver on this cluster" in capsys.readouterr().out
    assert asked == [("daskgan", "gan-training")] and services == [("daskgan-scheduler", "gan-training")]


def test_a_running_tls_daskcluster_needs_the_secrets_files_said_in_one_line(monkeypatch, capsys, nothing_started):
    import dask
    from dask_kubernetes.operator import networking

    async def scheduler_address(service_name, namespace, **kwargs):
        return "tcp://localhost:8786"

    kubernetes_with_daskclusters(monkeypatch, running=True)
    monkeypatch.setattr(networking, "get_scheduler_address", scheduler_address)
    with dask.config.set({"distributed.comm.tls.ca-file": None}):
        assert main(["runs", "--cluster", str(ROOT / "cluster" / "kubernetes.yaml")]) == 2
    one_error_line(capsys, "kubernetes.tls_secret", "Secret daskgan-tls", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE")


@pytest.mark.parametrize("command", LOOKING, ids=lambda c: c[0])
def test_looking_at_a_local_spec_is_one_line_and_starts_nothing(command, capsys, nothing_started):
    assert main([*command, "--cluster", str(ROOT / "cluster" / "local.yaml")]) == 2
    one_error_line(capsys, "kind: local", "kind: scheduler")


def test_looking_at_an_ec2_spec_asks_for_the_schedulers_address(capsys, nothing_started):
    assert main(["runs", "--cluster", str(ROOT / "cluster" / "aws-ec2.yaml")]) == 2
    one_error_line(capsys, "kind: ec2", "`kind: scheduler` spec with the address of its scheduler")


def test_a_daskjob_is_found_through_a_kubernetes_spec_only(tmp_path, capsys, nothing_started):
    job = tmp_path / "my_job.yaml"
    job.write_text(yaml.safe_dump(PLAIN_JOB))
    assert main(["runs", "--cluster", str(ROOT / "cluster" / "local.yaml"), "--job", str(job)]) == 2
    one_error_line(capsys, "--job", "kind: local")
