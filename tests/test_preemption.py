"""Preemptible workers: a `dask worker` process sent SIGTERM (what Kubernetes sends a pod it evicts, and what a
spot reclaim ends in) leaves only after its run's checkpoint is durable, and the run loses no iteration."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from distributed import Client
from own_cluster import process_of_rank

from daskgan.cluster.driver import GraceCheck, run_job
from daskgan.cluster.status import format_status, run_status
from daskgan.config import JobConfig
from daskgan.preemption import SpotInterruptionWatch
from daskgan.run import checkpoint, layout
from daskgan.run.records import load

pytestmark = pytest.mark.slow

# the notice is given once the client saw this iteration; at ITERATION_S each, the ranks then have at least 30 of
# them (6 s) to learn of it: tiny networks on a loaded CPU left so little that the notice came at the run's end
NOTICE_AT, ITERATION_S = 5, 0.2


def preemptible_job(bucket_url: str, options: dict, iterations: int) -> JobConfig:
    """Snapshots far apart (as a multi-hour snapshot interval is): none falls inside the run."""
    return JobConfig.from_dict({
        "name": "preempted",
        "data": {"url": f"{bucket_url}/data", "storage_options": options, "resolution": 16, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4},
        "train": {"iterations": iterations},
        "output": {"run_url": f"{bucket_url}/run", "storage_options": options, "flush_every": 5,
                   "grid_every": 10_000, "checkpoint_every": 10_000},
        "recovery": {"wait_for_workers_s": 120},
    })


def durable_checkpoint(run_url: str, options: dict) -> int:
    """The iteration of the checkpoint the run's pointer names (0: none yet)."""
    url = checkpoint.latest(run_url, options)
    return layout.checkpoint_iteration(Path(url).name) if url else 0


def test_a_worker_sent_sigterm_leaves_after_the_checkpoint_and_the_run_redoes_no_iteration(own_cluster,
                                                                                            shapes_in_bucket):
    url, options = shapes_in_bucket(images=48)
    config = preemptible_job(url, options, iterations=40)
    own_cluster.pace_iterations(ITERATION_S)
    address, (_, *workers) = own_cluster.start()
    seen: dict[str, int] = {}

    def replace_once_gone() -> None:
        victim.wait()
        seen["durable_at_exit"] = durable_checkpoint(config.output.run_url, options)
        own_cluster.add_worker()

    def preempt(record: dict) -> None:
        if record["iteration"] >= NOTICE_AT and "signalled_at" not in seen:
            seen["signalled_at"] = record["iteration"]
            victim.send_signal(signal.SIGTERM)
            threading.Thread(target=replace_once_gone, daemon=True).start()

    with Client(address, timeout=60) as client:
        victim = process_of_rank(client, workers, 0)  # rank 0's worker holds the summary the driver reads
        summary = run_job(client, config, on_record=preempt)

    assert seen["durable_at_exit"] >= seen["signalled_at"], "the worker left before the run's checkpoint"
    assert summary["iterations"] == 40 and not summary.get("stopped")
    records = load(config.output.run_url, options)
    assert records["iteration"].tolist() == list(range(1, 41)), "every iteration recorded exactly once"
    restarts = records[records["restart_cause"].notna()]
    assert len(restarts) == 1 and restarts["restart_cause"].iloc[0].startswith("preempted: worker "), restarts
    assert restarts["redone_iterations"].iloc[0] == 0
    assert 0 < restarts["notice_to_checkpoint_s"].iloc[0] < config.recovery.notice_grace_s
    status = run_status(config.output.run_url, options)
    assert status["preemptions"] == 1 and status["world_sizes"] == [(1, 2)], status
    assert "preemptions 1, the newest checkpointed " in format_status(status)


def test_a_notice_seen_at_the_runs_last_iteration_ends_it_finished_not_preempted(process_group, dask_client,
                                                                                   tmp_path, monkeypatch):
    """The last iteration's checkpoint is the run's end: a notice the ranks learn there leaves nothing to redo,
    so the driver must not re-dispatch a finished run (it did, and its restart was recorded nowhere)."""
    from daskgan import train_gan
    from daskgan.data import synthetic
    from daskgan.preemption import NOTICE_KEY
    from daskgan.training import loop

    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=8, resolution=16)
    config = JobConfig.from_dict({
        "name": "noticed-last", "data": {"url": data, "resolution": 16, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 6},
        "output": {"run_url": tmp_path.as_uri() + "/run", "flush_every": 3, "grid_every": 10_000,
                   "checkpoint_every": 3}})
    leaving = "tcp://127.0.0.1:1"  # the worker given notice, as the ranks gathered it
    monkeypatch.setattr(loop, "_run_workers", lambda: [leaving])
    monkeypatch.setattr("daskgan.preemption.CHECK_EVERY_S", 0.0)
    train_iteration = loop.train_iteration

    def notice_at_the_last(config, gan, stream, noise, iteration):
        if iteration == config.train.iterations:
            dask_client.set_metadata([*NOTICE_KEY, leaving], {"at": time.time()})
        return train_iteration(config, gan, stream, noise, iteration)

    monkeypatch.setattr(loop, "train_iteration", notice_at_the_last)
    try:
        summary = train_gan(config)
    finally:
        dask_client.set_metadata([*NOTICE_KEY, leaving], None)
    assert summary["preempted"] is None and summary["stopped"] is None, summary
    assert durable_checkpoint(config.output.run_url, {}) == 6
    assert load(config.output.run_url)["iteration"].tolist() == list(range(1, 7))


def test_a_checkpoint_slower_than_the_notice_grace_is_warned_about_once(caplog):
    grace = GraceCheck(grace_s=30)
    for record in ({"iteration": 1}, {"iteration": 2, "checkpoint_s": 12.0}, {"iteration": 3, "checkpoint_s": 40.0},
                   {"iteration": 4, "checkpoint_s": 45.0}):
        grace.check(record)
    warned = [r.getMessage() for r in caplog.records if "notice_grace_s" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("a checkpoint took 40.0 s"), warned


def kill_for_good(process: subprocess.Popen) -> None:
    """A node gone: the `dask worker` process and its worker process killed, nothing restarts them."""
    nanny = psutil.Process(process.pid)
    for worker in nanny.children(recursive=True):
        worker.kill()
    nanny.kill()


def test_a_run_that_lost_a_worker_goes_on_with_one_and_grows_back_when_another_joins(own_cluster, shapes_in_bucket):
    url, options = shapes_in_bucket(images=48)
    config = preemptible_job(url, options, iterations=150)
    config.output.checkpoint_every, config.recovery.min_workers = 25, 1
    address, (_, *workers) = own_cluster.start()
    seen: dict[str, int] = {}

    def join_once_alone(client: Client) -> None:
        own_cluster.add_worker()
        client.wait_for_workers(2, timeout=120)
        seen["joined_at"] = seen["latest"]

    def lose_then_replace(record: dict) -> None:
        seen["latest"] = record["iteration"]
        if record["iteration"] >= 30 and "killed_at" not in seen:  # after the first checkpoint
            seen["killed_at"] = record["iteration"]
            kill_for_good(victim)
        elif record["world_size"] == 1 and "alone_at" not in seen:
            seen["alone_at"] = record["iteration"]
            threading.Thread(target=join_once_alone, args=(client,), daemon=True).start()

    with Client(address, timeout=60) as client:
        victim = process_of_rank(client, workers, 1)
        summary = run_job(client, config, on_record=lose_then_replace)

    assert summary["iterations"] == 150
    records = load(config.output.run_url, options).set_index("iteration")
    assert records.index.tolist() == list(range(1, 151)), "every iteration recorded exactly once"
    sizes = records["world_size"]
    back = sizes[(sizes.index > seen["joined_at"]) & (sizes == 2)].index.min()
    assert sizes.loc[seen["alone_at"]:back - 1].eq(1).all() and sizes.loc[back:].eq(2).all()
    # at a checkpoint, the first after the ranks learn of the join: the client's newest record lags the ranks, and
    # they look for a request every CHECK_EVERY_S, so that may be the one after the checkpoint the client saw next
    assert (back - 1) % 25 == 0 and back - 1 - seen["joined_at"] <= 2 * 25, "back on 2 at a checkpoint after the join"
    causes = records["restart_cause"].dropna().tolist()
    assert causes[-1] == "grown back to 2 workers" and "lost" in causes[0], causes
    assert run_status(config.output.run_url, options)["world_sizes"] == [(1, 2), (26, 1), (back, 2)]


class FakeInstanceMetadata(ThreadingHTTPServer):
    """EC2's instance metadata service as a spot instance sees it, on loopback: IMDSv2 tokens, and an interruption
    notice (``spot/instance-action``) once ``announce()`` was called, given to the first nanny that asks."""

    def __init__(self):
        self.pending = False
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def announce(self) -> None:
        self.pending = True

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            self._answer(200, b"token-1") if self.path == "/latest/api/token" else self._answer(404)

        def do_GET(self):
            if self.path != "/latest/meta-data/spot/instance-action" or self.headers["X-aws-ec2-metadata-token"] != \
                    "token-1":
                return self._answer(401 if self.path.endswith("instance-action") else 404)
            if not self.server.pending:
                return self._answer(404)
            self.server.pending = False
            self._answer(200, b'{"action": "terminate", "time": "2026-12-05T02:00:00Z"}')

        def _answer(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass


def test_a_spot_interruption_notice_makes_a_worker_leave_after_its_runs_checkpoint(own_cluster, shapes_in_bucket):
    url, options = shapes_in_bucket(images=48)
    config = preemptible_job(url, options, iterations=40)
    own_cluster.pace_iterations(ITERATION_S)
    address, (_, *workers) = own_cluster.start()
    metadata = FakeInstanceMetadata()
    seen: dict[str, int] = {}

    def replace_the_leaver() -> None:
        leaver = wait_for_any_exit(workers)
        seen["durable_at_exit"] = durable_checkpoint(config.output.run_url, options)
        seen["leaver_exit"] = leaver.returncode
        own_cluster.add_worker()

    def announce(record: dict) -> None:
        if record["iteration"] >= NOTICE_AT and "announced_at" not in seen:
            seen["announced_at"] = record["iteration"]
            metadata.announce()
            threading.Thread(target=replace_the_leaver, daemon=True).start()

    with Client(address, timeout=60) as client:
        client.register_plugin(SpotInterruptionWatch(metadata.url, every_s=0.5))
        summary = run_job(client, config, on_record=announce)
    metadata.shutdown()

    assert seen["durable_at_exit"] >= seen["announced_at"], "the worker left before the run's checkpoint"
    assert summary["iterations"] == 40
    records = load(config.output.run_url, options)
    assert records["iteration"].tolist() == list(range(1, 41)), "every iteration recorded exactly once"
    restarts = records[records["restart_cause"].notna()]
    assert len(restarts) == 1 and restarts["restart_cause"].iloc[0].startswith("preempted: worker "), restarts
    assert restarts["redone_iterations"].iloc[0] == 0


def wait_for_any_exit(processes: list[subprocess.Popen], seconds: float = 120) -> subprocess.Popen:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                return process
        time.sleep(0.2)
    raise AssertionError(f"no worker process left within {seconds} s")


def test_a_run_takes_at_most_max_workers_of_the_cluster(dask_client, shapes_in_bucket):
    url, options = shapes_in_bucket(images=16)
    config = preemptible_job(url, options, iterations=4)
    config.recovery.max_workers = 1
    summary = run_job(dask_client, config)
    assert summary["iterations"] == 4
    assert load(config.output.run_url, options)["world_size"].tolist() == [1, 1, 1, 1], "one of the two workers"
