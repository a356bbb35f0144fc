"""Credentials reach the workers by reference only: never in task graphs, logs, checkpoints, TensorBoard or records."""

import logging

import pytest

from daskgan.cluster import ClusterSpec, LocalSpec, connect
from daskgan.cluster.driver import run_job
from daskgan.config import JobConfig
from daskgan.run import storage
from daskgan.tools import sandbox

pytestmark = pytest.mark.slow

SECRETS = {"DASKGAN_LEAK_KEY": "AKIALEAKCHECK00000001", "DASKGAN_LEAK_SECRET": "leak-check-secret-9f8e7d6c5b4a"}


def pickled_scheduler_tasks(dask_scheduler):
    from distributed.protocol import pickle

    return b"".join(pickle.dumps(ts.run_spec) for ts in dask_scheduler.tasks.values() if ts.run_spec is not None)


def test_secret_keys_appear_nowhere(shapes_in_bucket, caplog):
    url, options = shapes_in_bucket(images=16, resolution=8)
    secret_options = {**options, "key": "${DASKGAN_LEAK_KEY}", "secret": "${DASKGAN_LEAK_SECRET}"}
    config = JobConfig.from_dict({
        "name": "leak-check",
        "data": {"url": f"{url}/data", "storage_options": secret_options, "resolution": 8, "batch_size": 4},
        "model": {"z_dim": 4, "g_channels": 2, "d_channels": 2},
        "train": {"iterations": 4},
        "output": {"run_url": f"{url}/run", "storage_options": secret_options, "grid_every": 2,
                   "checkpoint_every": 2, "flush_every": 2},
    })
    captured = {}
    with sandbox.environment(SECRETS), caplog.at_level(logging.DEBUG):
        with connect(ClusterSpec(local=LocalSpec(n_workers=2))) as client:
            def capture_tasks(record):
                if "tasks" not in captured:
                    captured["tasks"] = client.run_on_scheduler(pickled_scheduler_tasks)

            run_job(client, config, on_record=capture_tasks)
            worker_env = client.run(lambda: __import__("os").environ.get("DASKGAN_LEAK_SECRET"))
            logs = [str(client.get_scheduler_logs()), str(client.get_worker_logs())]

    assert set(worker_env.values()) == {SECRETS["DASKGAN_LEAK_SECRET"]}, "the workers did hold the secret"
    assert b"${DASKGAN_LEAK_SECRET}" in captured["tasks"], "the captured tasks do carry the storage options"

    fs, _ = storage.filesystem(url, options)
    bucket = url.removeprefix("s3://")
    objects = fs.cat([p for p in fs.find(bucket) if "/data/" not in p])
    assert any(p.endswith(".pt") for p in objects) and any("tfevents" in p for p in objects)
    assert any(p.endswith(".jsonl") for p in objects) and any(p.endswith("config.yaml") for p in objects)

    haystacks = {"pickled tasks": captured["tasks"], "client logs": caplog.text.encode(),
                 "cluster logs": "\n".join(logs).encode(), **objects}
    for secret in SECRETS.values():
        for where, data in haystacks.items():
            assert secret.encode() not in data, f"secret found in {where}"
