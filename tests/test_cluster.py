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


def daskcluster_schema():
    """dask-kubernetes' DaskCluster schema, its internal references made local; k8s PodSpec/ServiceSpec references
    (resolved from a package not available here) are checked separately against the kubernetes client's models."""
    import dask_kubernetes

    path = Path(dask_kubernetes.__file__).parent / "operator" / "customresources" / "templates.yaml"
    text = path.read_text()
    text = text.replace("python://dask_kubernetes/operator/customresources/templates.yaml#", "#")
    definitions = yaml.safe_load(text)["definitions"]

    def local_refs(node):
        if isinstance(node, dict):
            if str(node.get("$ref", "")).startswith("python://k8s_crd_resolver"):
                return {"type": "object"}
            return {k: local_refs(v) for k, v in node.items()}
        return [local_refs(v) for v in node] if isinstance(node, list) else node

    definitions = local_refs(definitions)
    return {**definitions["dask.k8s.api.v1.DaskCluster"], "definitions": definitions}


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
    jsonschema.validate(manifest, daskcluster_schema())
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
