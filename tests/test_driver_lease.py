"""A run outlives (or not) its client: the CLI driver killed mid-run leaves no orphans, a second driver for an active
run is refused, and `daskgan stop` ends a run after a checkpoint. The client is `daskgan train` as its own process
against the session's scheduler and two worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daskgan.cluster.status import run_status
from daskgan.run import checkpoint, storage
from daskgan.run.records import load

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER_TIMEOUT_S = 4


@pytest.fixture
def cli_run(dask_client, shapes_in_bucket, tmp_path):
    """(start(iterations) -> Popen of `daskgan train` (``start.write_job(iterations)`` only writes the job file),
    run URL, storage options, cluster spec path)."""
    bucket, options = shapes_in_bucket(16)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": dask_client.scheduler.address}}))
    run_url = f"{bucket}/run"

    def write_job(iterations: int) -> Path:
        job = {"name": "lease", "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16,
                                         "batch_size": 4},
               "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": iterations},
               "recovery": {"driver_timeout_s": DRIVER_TIMEOUT_S},
               "output": {"run_url": run_url, "storage_options": options, "flush_every": 10,
                          "checkpoint_every": 10_000, "grid_every": 10_000}}
        path = tmp_path / f"job-{iterations}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    def start(iterations: int) -> subprocess.Popen:
        return daskgan_process("train", str(write_job(iterations)), "--cluster", str(spec), "--no-progress")

    start.write_job = write_job
    return start, run_url, options, spec


def daskgan_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daskgan.tools.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {seconds} s")


def newest_checkpoint(run_url: str, options: dict) -> int:
    listed = checkpoint.list_checkpoints(run_url, options)
    return listed[-1][0] if listed else 0


def test_a_killed_client_leaves_no_orphans_and_a_second_driver_is_refused(cli_run, dask_client):
    start, run_url, options, _ = cli_run
    first = start(100_000)
    wait_for(lambda: storage.exists(f"{run_url}/records", options) and load(run_url, options) is not None
             and len(load(run_url, options)) >= 10, 90, "records of the first client")
    second = start(100_000)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 2 and err.count("\n") == 1, err
    assert "is being trained by" in err and run_url in err
    assert run_status(run_url, options, dask_client)["state"] == "running"
    listed = daskgan_process("runs", "--cluster", str(cli_run[3]))
    out, err = listed.communicate(timeout=60)
    assert listed.returncode == 0 and f"{run_url}: iteration " in out and "of 100000, driven by" in out, err

    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    stopped_at = wait_for(lambda: newest_checkpoint(run_url, options), DRIVER_TIMEOUT_S + 60,
                          "a checkpoint after the driver died")
    wait_for(lambda: not any(dask_client.processing().values()), 30, "idle workers")
    assert time.monotonic() - killed_at < DRIVER_TIMEOUT_S + 60
    stopped = run_status(run_url, options, dask_client)
    assert (stopped["state"], stopped["iteration"]) == ("stopped", stopped_at)

    resumed = start(stopped_at + 15)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    iterations = load(run_url, options)["iteration"].tolist()
    assert iterations == list(range(1, stopped_at + 16)), "none duplicated, none missing"
    shown = daskgan_process("status", run_url, "--endpoint-url", options["endpoint_url"])
    out, err = shown.communicate(timeout=60)
    assert shown.returncode == 0 and f"finished, iteration {stopped_at + 15} of {stopped_at + 15}" in out, err


def test_stop_ends_a_run_after_a_checkpoint(cli_run):
    start, run_url, options, spec = cli_run
    running = start(100_000)
    wait_for(lambda: storage.exists(f"{run_url}/records", options), 90, "records")
    stop = daskgan_process("stop", run_url, "--cluster", str(spec))
    assert stop.wait(timeout=60) == 0
    out, err = running.communicate(timeout=90)
    assert running.returncode == 0, err
    assert "stopped at iteration" in out and "(checkpoint)" in out
    assert newest_checkpoint(run_url, options) == load(run_url, options)["iteration"].max() > 0
    assert run_status(run_url, options)["state"] == "stopped"


def test_attach_follows_a_run_live_until_its_driver_lets_go(cli_run):
    start, run_url, options, spec = cli_run
    running = start(100_000)
    wait_for(lambda: storage.exists(f"{run_url}/records", options), 90, "records")
    follower = daskgan_process("attach", run_url, "--cluster", str(spec))
    time.sleep(4)
    assert daskgan_process("stop", run_url, "--cluster", str(spec)).wait(timeout=60) == 0
    out, err = running.communicate(timeout=90)
    assert running.returncode == 0, err
    followed, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    lines = [line for line in followed.splitlines() if line.startswith("iteration ")]
    assert len(lines) >= 2 and all(" of 100000: loss_G " in line for line in lines), followed
    assert "driver let go after iteration" in followed
    shown = [int(line.split()[1]) for line in lines]
    assert shown == sorted(shown) and shown[-1] <= load(run_url, options)["iteration"].max()


def test_attach_to_a_run_without_a_driver_is_one_clear_error(cli_run):
    _, run_url, _, spec = cli_run
    follower = daskgan_process("attach", run_url, "--cluster", str(spec))
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 2 and "has no live driver on this cluster" in err and err.count("\n") == 1


def test_a_detached_run_outlives_its_client(cli_run, tmp_path, dask_client):
    start, run_url, options, spec = cli_run
    detached = daskgan_process("train", str(start.write_job(30)), "--cluster", str(spec), "--detach")
    out, err = detached.communicate(timeout=60)
    assert detached.returncode == 0 and "is driven from the scheduler" in out, err
    wait_for(lambda: storage.exists(f"{run_url}/config.yaml", options), 60, "the detached run starting")
    wait_for(lambda: run_status(run_url, options)["state"] == "finished", 120, "the detached run finishing")
    assert load(run_url, options)["iteration"].tolist() == list(range(1, 31))


def test_detach_needs_a_cluster_that_outlives_the_command(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"data": {"url": "memory://d"}, "output": {"run_url": "memory://r"}}))
    refused = daskgan_process("train", str(job), "--detach")
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "--detach: needs a cluster that outlives this command" in err
