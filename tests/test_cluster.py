"""Cluster specs: every example renders, and the Kubernetes manifest is what dask-kubernetes' CRD accepts."""

import inspect
import sys
from pathlib import Path

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
    local = lambda text: text.replace("python://dask_kubernetes/operator/customresources/templates.yaml#", "#")
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

    manifest = render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))
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
    worker_pod = render(load_cluster_spec(path))["spec"]["worker"]["spec"]
    assert worker_pod["serviceAccountName"] == "daskgan-irsa"
    assert "secretKeyRef" not in str(worker_pod)


def test_ec2_arguments_are_ones_ec2cluster_takes():
    from dask_cloudprovider.aws import EC2Cluster
    from dask_cloudprovider.generic.vmcluster import VMCluster

    accepted = set(inspect.signature(EC2Cluster.__init__).parameters) | set(inspect.signature(VMCluster.__init__).parameters)
    arguments = render(load_cluster_spec(ROOT / "cluster" / "aws-ec2.yaml"))["EC2Cluster"]
    assert set(arguments) <= accepted
    assert arguments["iam_instance_profile"] == {"Name": "daskgan-s3-access"}
    assert arguments["worker_instance_type"] == "g5.xlarge" and arguments["spot"] is True
    assert arguments["docker_args"] == "--shm-size=2g", "Docker's /dev/shm is 64 MB"


@pytest.mark.parametrize("text, message", [
    ("kind: kubernetes\nkubernetes:\n  image: x\n  imagee: y\n", "kubernetes.imagee: unknown key"),
    ("kind: kubernetes\n", "kubernetes: required for kind: kubernetes"),
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
    with pytest.raises(MissingExtra, match=r"pip install 'daskgan\[k8s\]'"):
        render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml")]) == 2
    assert "daskgan[k8s]" in capsys.readouterr().err


def test_cli_render_prints_the_manifest(capsys):
    assert main(["cluster", "render", str(ROOT / "cluster" / "kubernetes.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))


def rendered_daskjob(tmp_path, job: dict, spec: str = "kubernetes.yaml") -> list[dict]:
    """``daskgan cluster render <spec> --job <job>`` as the YAML documents it prints."""
    import contextlib
    import io

    path = tmp_path / "my_job.yaml"
    path.write_text(yaml.safe_dump(job))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["cluster", "render", str(ROOT / "cluster" / spec), "--job", str(path)]) == 0
    return list(yaml.safe_load_all(printed.getvalue()))


PLAIN_JOB = {"data": {"url": "s3://datasets/shapes", "resolution": 16}, "output": {"run_url": "s3://runs/shapes"}}


def test_a_job_renders_as_a_daskjob_the_operator_accepts(tmp_path):
    import jsonschema

    from daskgan.config import load_job

    config_map, daskjob = rendered_daskjob(tmp_path, PLAIN_JOB)
    jsonschema.validate(daskjob, operator_schema("daskjob.yaml"))
    runner = daskjob["spec"]["job"]["spec"]
    check_k8s_model(runner, "V1PodSpec", "job.spec")
    check_k8s_model(daskjob["spec"]["cluster"]["spec"]["worker"]["spec"], "V1PodSpec", "cluster.worker.spec")
    check_k8s_model(config_map, "V1ConfigMap", "configmap")
    assert daskjob["metadata"] == config_map["metadata"] == {"name": "daskgan-my-job", "namespace": "gan-training"}
    assert daskjob["spec"]["cluster"]["spec"] == render(load_cluster_spec(ROOT / "cluster" / "kubernetes.yaml"))["spec"]

    driver = runner["containers"][0]
    assert runner["restartPolicy"] == "OnFailure"
    mount, = driver["volumeMounts"]
    assert runner["volumes"] == [{"name": mount["name"], "configMap": {"name": config_map["metadata"]["name"]}}]
    job_file, = config_map["data"]
    assert driver["args"][:3] == ["daskgan", "train", f"{mount['mountPath']}/{job_file}"]
    assert "DASK_SCHEDULER_ADDRESS" not in str(driver), "the operator sets it to the job's own scheduler"
    assert "secretKeyRef" not in str(runner), "the driver never touches storage: it gets no credentials"

    mounted = tmp_path / "mounted" / job_file
    mounted.parent.mkdir()
    mounted.write_text(config_map["data"][job_file])
    assert load_job(mounted) == load_job(tmp_path / "my_job.yaml"), "the pod trains the same job, under its name"


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


def test_without_a_spec_a_command_uses_dask_scheduler_address(monkeypatch):
    import dask

    from daskgan.cluster import default_cluster_spec

    with dask.config.set({"scheduler-address": None}):
        assert default_cluster_spec().kind == "local"
    with dask.config.set({"scheduler-address": "tcp://daskgan-my-job-scheduler.gan-training.svc:8786"}):
        spec = default_cluster_spec()
    assert (spec.kind, spec.scheduler.address) == ("scheduler", "tcp://daskgan-my-job-scheduler.gan-training.svc:8786")
