"""Runs that share a cluster (issue #27): a scheduler and two workers as processes of their own; three
`daskgan train --workers 1` drivers: two train at once, the third waits in the scheduler's queue (`daskgan runs`
shows it, position 1) and starts when the first finishes; killing one driver leaves the others training; every run
completes with each iteration recorded once."""

from __future__ import annotations

import signal
import threading

import pytest
import yaml
from distributed import Client
from test_driver_lease import daskgan_process, ended, newest_checkpoint, wait_for

from daskgan.cluster.status import cluster_runs
from daskgan.run.records import load, topic

pytestmark = pytest.mark.slow

DRIVER_TIMEOUT_S = 4
SHORT = 300  # iterations of the runs that end while another trains on: the first outlasts the third's start-up


class Arrivals:
    """Every record published by the runs, in the order the test's client received them: (run, iteration)."""

    def __init__(self, client: Client, runs: list[str]):
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        for run in runs:
            client.subscribe_topic(topic(run), lambda event, run=run: self._add(run, event[1]["iteration"]))

    def _add(self, run: str, iteration: int) -> None:
        with self._lock:
            self.seen.append((run, iteration))

    def of(self, run: str) -> list[int]:
        """Indexes into ``seen`` of the run's records."""
        with self._lock:
            return [i for i, (name, _) in enumerate(self.seen) if name == run]


@pytest.fixture
def shared(own_cluster, shapes_in_bucket, tmp_path):
    """(start(name, iterations, *overrides) -> Popen of `daskgan train --workers 1` for run ``<bucket>/<name>``,
    the run URL of a name, storage options, cluster spec path, a client of the cluster)."""
    bucket, options = shapes_in_bucket(16)
    address, _ = own_cluster.start(workers=2)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": address}}))

    def start(name: str, iterations: int, *overrides: str):
        job = {"name": name, "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16,
                                      "batch_size": 4},
               "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": iterations},
               "recovery": {"driver_timeout_s": DRIVER_TIMEOUT_S},
               "output": {"run_url": f"{bucket}/{name}", "storage_options": options, "flush_every": 10,
                          "checkpoint_every": 10_000, "grid_every": 10_000}}
        path = tmp_path / f"{name}-{iterations}.yaml"
        path.write_text(yaml.safe_dump(job))
        return daskgan_process("train", str(path), *overrides, "--cluster", str(spec), "--workers", "1",
                               "--no-progress")

    with Client(address, timeout=60) as client:
        yield start, lambda name: f"{bucket}/{name}", options, spec, client


def test_runs_share_the_cluster_queue_and_survive_a_killed_driver(shared):
    start, url, options, spec, client = shared
    arrivals = Arrivals(client, [url("a"), url("b"), url("c")])
    first, long = start("a", SHORT), start("b", 100_000)
    wait_for(lambda: len(cluster_runs(client)["running"]) == 2, 120, "both runs granted a worker")
    queued = start("c", SHORT)
    runs = wait_for(lambda: (runs := cluster_runs(client))["queued"] and runs, 60, "the third run queued")
    assert [(run["run_url"], run["position"], run["asked"]) for run in runs["queued"]] == [(url("c"), 1, 1)]
    running = {run["run_url"]: run["workers"] for run in runs["running"]}
    assert set(running) == {url("a"), url("b")} and len({*running[url("a")], *running[url("b")]}) == 2, running
    listed = daskgan_process("runs", "--cluster", str(spec))
    out, err = ended(listed, 60)
    assert listed.returncode == 0 and f"{url('c')}: queued, position 1, 1 worker(s) asked" in out, err
    assert "2 run(s) with a live driver on this cluster, 0 stale, 1 queued" in out, out

    out, err = ended(first, 180)
    assert first.returncode == 0 and f"trained {SHORT} iterations" in out, err
    a, b = arrivals.of(url("a")), arrivals.of(url("b"))
    assert any(a[0] < i < a[-1] for i in b), "the records of both runs advanced together"
    wait_for(lambda: arrivals.of(url("c")), 120, "the queued run training")
    assert arrivals.of(url("c"))[0] > a[-1], "the queued run started once the first had finished"

    long.send_signal(signal.SIGKILL)  # the driver of b, while c trains
    long.wait()
    killed_at = len(arrivals.seen)
    out, err = ended(queued, 180)
    assert queued.returncode == 0 and f"trained {SHORT} iterations" in out, err
    assert arrivals.of(url("c"))[-1] > killed_at, "c trained on after b's driver was killed"
    stopped_at = wait_for(lambda: newest_checkpoint(url("b"), options), DRIVER_TIMEOUT_S + 60,
                          "b's ranks at a checkpoint after its driver died")
    resumed = start("b", stopped_at + 15)
    out, err = ended(resumed, 180)
    assert resumed.returncode == 0, err
    for run, iterations in (("a", SHORT), ("b", stopped_at + 15), ("c", SHORT)):
        records = load(url(run), options)
        assert records["iteration"].tolist() == list(range(1, iterations + 1)), f"{run}: none duplicated or missing"
    assert "restart_cause" not in load(url("c"), options).columns, "c never restarted"
