"""Shared fixtures: one moto S3 server process on loopback and one 2-worker Dask cluster for the session."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch
from own_cluster import OwnCluster

from daskgan.tools.sandbox import LoopbackS3, free_port

# One intra-op thread, as distributed's nannies give each worker (OMP_NUM_THREADS=1), here and in the processes the
# tests start: with one per core, what trains in this process spun for cores that the cluster's workers (and a
# loaded machine) held, 20 to 50 times slower at random (test_host_syncs' BigGAN: 139 s, 2.7 s with one thread).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def daskgan_cache(tmp_path_factory):
    """Downloaded extractor files go to a folder of the session, not the user's ~/.cache (exported before any
    worker starts, so workers and command-line runs inherit it)."""
    saved = os.environ.get("DASKGAN_CACHE")
    os.environ["DASKGAN_CACHE"] = str(tmp_path_factory.mktemp("daskgan-cache"))
    yield
    if saved is None:
        os.environ.pop("DASKGAN_CACHE")
    else:
        os.environ["DASKGAN_CACHE"] = saved


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on 127.0.0.1; its environment is exported so worker processes inherit it."""
    with LoopbackS3() as server:
        saved = {k: os.environ.get(k) for k in server.environment()}
        os.environ.update(server.environment())
        yield server
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def credential_checking_s3():
    """An S3 server that checks credentials as S3 does (moto, once its first unauthenticated calls are used up)
    and a user allowed everything; yields (server, an IAM client acting as that user, the user's credentials as
    environment variables)."""
    import boto3
    from botocore.exceptions import ClientError

    with LoopbackS3(server_environment={"INITIAL_NO_AUTH_ACTION_COUNT": "20"}) as server:
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        arn = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="trainer", PolicyArn=arn)
        for _ in range(20):  # use up the unauthenticated calls left (start-up probes count too)
            try:
                iam.list_users()
            except ClientError:
                break
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, region_name="us-east-1",
                           aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        yield server, iam, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns (s3:// URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": s3_server.endpoint_url}
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}", options


@pytest.fixture
def shapes_in_bucket(s3_bucket):
    """Factory: upload a synthetic shapes dataset under <bucket>/data; returns (bucket URL, storage_options)."""
    from daskgan.data import synthetic

    def make(images: int, resolution: int = 16):
        url, options = s3_bucket
        synthetic.write_dataset(f"{url}/data", images=images, resolution=resolution, storage_options=options)
        return url, options

    return make


@pytest.fixture(scope="session")
def dask_client(s3_server):
    """Two single-threaded worker processes, started after the S3 environment is set so they inherit it."""
    from daskgan.cluster import ClusterSpec, LocalSpec, connect

    with connect(ClusterSpec(local=LocalSpec(n_workers=2))) as client:
        yield client


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo process group in the test process, for DDP-wrapped modules in unit tests."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def own_cluster(s3_server, tmp_path):
    """``OwnCluster`` (after the S3 environment is set, so its processes inherit it); ended after the test."""
    cluster = OwnCluster(tmp_path / "cluster.log")
    yield cluster
    cluster.close()
