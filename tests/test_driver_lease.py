"""A run outlives (or not) its client: the CLI driver killed mid-run leaves no orphans, a second driver for an active
run is refused, and `daskgan stop` ends a run after a checkpoint. The client is `daskgan train` as its own process
against the session's scheduler and two worker processes."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from daskgan import dispatch
from daskgan.cluster.status import run_status
from daskgan.lease import metadata_key
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

    def write_job(iterations: int, driver_timeout_s: float = DRIVER_TIMEOUT_S) -> Path:
        job = {"name": "lease", "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16,
                                         "batch_size": 4},
               "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": iterations},
               "recovery": {"driver_timeout_s": driver_timeout_s},
               "output": {"run_url": run_url, "storage_options": options, "flush_every": 10,
                          "checkpoint_every": 10_000, "grid_every": 10_000}}
        path = tmp_path / f"job-{iterations}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    def start(iterations: int, driver_timeout_s: float = DRIVER_TIMEOUT_S) -> subprocess.Popen:
        return daskgan_process("train", str(write_job(iterations, driver_timeout_s)), "--cluster", str(spec),
                               "--no-progress")

    start.write_job = write_job
    return start, run_url, options, spec


def ended(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The process's (stdout, stderr) once it ends; one still running after ``timeout`` fails the test showing
    where its output stopped (the driver's log says what it was waiting for)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{' '.join(process.args[2:4])} still running after {timeout}s; its output ended with:\n"
                    f"{out[-2000:]}\n{err[-2000:]}")


def daskgan_process(*args: str) -> subprocess.Popen:
    """`daskgan` as a terminal starts it, Ctrl-C included: a suite started in the background (`make test &`, a CI
    step) ignores SIGINT, which its children would inherit, and Python leaves an ignored SIGINT ignored."""
    return subprocess.Popen([sys.executable, "-m", "daskgan.tools.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ}, preexec_fn=_sigint_as_a_terminal)


def _sigint_as_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    out, err = ended(second, 60)
    assert second.returncode == 2 and err.count("\n") == 1, err
    assert "is being trained by" in err and run_url in err
    running = run_status(run_url, options, dask_client)
    assert running["state"] == "running" and running["driver"].endswith(f":{first.pid}")
    assert running["workers"] == sorted(dispatch.worker_addresses(dask_client)) and len(running["workers"]) == 2
    shown = daskgan_process("status", run_url, "--cluster", str(cli_run[3]), "--endpoint-url", options["endpoint_url"])
    out, err = ended(shown, 60)
    assert shown.returncode == 0 and f"driver {running['driver']}; 2 workers: " in out, err
    listed = daskgan_process("runs", "--cluster", str(cli_run[3]))
    out, err = ended(listed, 60)
    assert listed.returncode == 0 and f"{run_url}: iteration " in out and "of 100000, driven by" in out, err
    assert "kimg " in out and "loss_G " in out and " left at that rate" in out, f"the driver's view: losses, ETA\n{out}"

    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    listed = daskgan_process("runs", "--cluster", str(cli_run[3]))
    follower = daskgan_process("attach", run_url, "--cluster", str(cli_run[3]))
    out, err = ended(listed, 60)
    assert listed.returncode == 0 and f"stale: its driver {running['driver']} stopped beating" in out, err
    assert "0 run(s) with a live driver on this cluster, 1 stale" in out
    out, err = ended(follower, 60)  # it waited forever on the dead driver's lease
    assert follower.returncode == 0 and f"driver {running['driver']} stopped beating" in out, err
    stopped_at = wait_for(lambda: newest_checkpoint(run_url, options), DRIVER_TIMEOUT_S + 60,
                          "a checkpoint after the driver died")
    wait_for(lambda: not any(dask_client.processing().values()), 30, "idle workers")
    assert time.monotonic() - killed_at < DRIVER_TIMEOUT_S + 60
    stopped = run_status(run_url, options, dask_client)
    assert (stopped["state"], stopped["iteration"]) == ("stopped", stopped_at)

    resumed = start(stopped_at + 15)
    out, err = ended(resumed, 180)
    assert resumed.returncode == 0, err
    iterations = load(run_url, options)["iteration"].tolist()
    assert iterations == list(range(1, stopped_at + 16)), "none duplicated, none missing"
    shown = daskgan_process("status", run_url, "--endpoint-url", options["endpoint_url"])
    out, err = ended(shown, 60)
    assert shown.returncode == 0 and f"finished, iteration {stopped_at + 15} of {stopped_at + 15}" in out, err
    listed = daskgan_process("runs", "--cluster", str(cli_run[3]))
    out, err = ended(listed, 60)
    assert f"{run_url}: ended " in out and f", finished, at iteration {stopped_at + 15} of {stopped_at + 15}" in out, \
        out + err


def test_a_new_driver_right_after_a_killed_one_takes_over_from_its_ranks(cli_run, dask_client):
    """Restarted before the dead driver's ranks noticed (within driver_timeout_s): the new driver's heartbeat must
    not keep the old ranks going; they checkpoint and stop, and the new dispatch resumes from that checkpoint."""
    from daskgan.lease import request_stop

    start, run_url, options, _ = cli_run
    # Left alone, the dead driver's ranks would hold the workers for 600 s: within the minutes given here only a
    # takeover gives the new driver its checkpoint and its own iterations, however slow the machine.
    first = start(100_000, driver_timeout_s=600)
    wait_for(lambda: storage.exists(f"{run_url}/records", options) and load(run_url, options) is not None
             and len(load(run_url, options)) >= 10, 90, "records of the first client")
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = start(100_000, driver_timeout_s=600)
    try:
        taken_over_at = wait_for(lambda: newest_checkpoint(run_url, options), 150, "the old ranks' checkpoint")
        wait_for(lambda: load(run_url, options)["iteration"].max() >= taken_over_at + 20, 150,
                 "the new driver's iterations")
        request_stop(dask_client, run_url)
        out, err = ended(resumed, 120)
    finally:  # without the takeover the old ranks train on: end them, or they block the session's cluster
        resumed.kill()
        request_stop(dask_client, run_url, now=True)
        wait_for(lambda: not any(dask_client.processing().values()), 60, "idle workers")
    assert resumed.returncode == 0, err
    iterations = load(run_url, options)["iteration"].tolist()
    assert iterations == list(range(1, len(iterations) + 1)), "none duplicated or missing"
    assert newest_checkpoint(run_url, options) == iterations[-1] > taken_over_at + 20


def test_ctrl_c_on_the_driver_stops_its_ranks_after_a_checkpoint_and_the_next_train_resumes(cli_run, dask_client):
    """Interrupted, the driver released its lease, and the ranks took the missing lease for "dispatched without a
    driver": they trained on, unwatched, to the last iteration."""
    from daskgan.lease import request_stop

    start, run_url, options, _ = cli_run
    running = start(100_000)
    try:
        wait_for(lambda: storage.exists(f"{run_url}/records", options) and len(load(run_url, options)) >= 10, 90,
                 "records")
        running.send_signal(signal.SIGINT)
        out, err = ended(running, 60)
        stopped_at = wait_for(lambda: newest_checkpoint(run_url, options), 30, "the ranks' checkpoint after Ctrl-C")
        wait_for(lambda: run_status(run_url, options)["state"] == "stopped", 30, "the ranks stopping")
        written = storage.list_names(f"{run_url}/records", options)
        time.sleep(3)
    finally:  # ranks that train on would hold the session's workers: end them
        request_stop(dask_client, run_url, now=True)
    assert running.returncode == 130 and err.endswith("daskgan: interrupted\n"), err
    assert storage.list_names(f"{run_url}/records", options) == written, "no record written after the stop"
    assert load(run_url, options)["iteration"].max() == stopped_at

    resumed = start(stopped_at + 15)
    out, err = ended(resumed, 180)
    assert resumed.returncode == 0, err
    assert load(run_url, options)["iteration"].tolist() == list(range(1, stopped_at + 16)), "none duplicated or missing"


def test_two_drivers_starting_together_never_both_take_the_run(dask_client):
    """``acquire`` checked for a live driver, then wrote its lease: both drivers of a race took the run."""
    from daskgan.lease import DriverLease, RunActive

    def take(lease: DriverLease) -> DriverLease | None:
        together.wait()
        try:
            lease.acquire()
            return lease
        except RunActive:
            return None

    for attempt in range(5):
        together = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            taken = [lease for lease in pool.map(take, [DriverLease(dask_client, f"memory://race-{attempt}", 2.0)
                                                        for _ in range(2)]) if lease]
        for lease in taken:
            lease.release()
        assert len(taken) == 1, f"try {attempt}: {len(taken)} drivers took the run"


class StallingClient:
    """A driver's client whose calls stall while ``awake`` is clear: the driver's process asleep (a laptop lid
    closed, a network cut) while the scheduler and the other clients go on."""

    def __init__(self, client):
        self.client, self.awake, self.returned = client, threading.Event(), 0
        self.awake.set()

    def __getattr__(self, name: str):
        attribute = getattr(self.client, name)
        if not inspect.ismethod(attribute):
            return attribute

        def stalled(*args, **kwargs):
            self.awake.wait()
            try:
                return attribute(*args, **kwargs)
            finally:
                self.returned += 1

        return stalled


def test_a_driver_taken_over_while_asleep_neither_beats_nor_releases_the_new_drivers_lease(dask_client, caplog):
    """Its heartbeat, sent on waking, overwrote the new driver's lease (both drivers' ranks then saw a foreign token
    and stopped), and its release erased the lease of the driver that had taken the run."""
    from daskgan.lease import DriverLease, RunActive, held_lease

    run_url = "memory://taken-over-while-asleep"
    asleep = StallingClient(dask_client)
    first = DriverLease(asleep, run_url, 2.0)  # beats every 0.5 s: stale 1 s after it falls asleep
    first.acquire()
    asleep.awake.clear()
    second = DriverLease(dask_client, run_url, 40.0)  # beats every 10 s: none while the first wakes
    second.acquire()
    assert held_lease(dask_client, run_url)["token"] == second.token
    try:
        try:
            returned = asleep.returned
            asleep.awake.set()
            wait_for(lambda: asleep.returned > returned, 30, "the first driver's heartbeat sent on waking")
            assert held_lease(dask_client, run_url)["token"] == second.token, "the woken driver overwrote the lease"
        finally:
            first.release()
        assert held_lease(dask_client, run_url)["token"] == second.token, "the woken driver erased the lease"
        with pytest.raises(RunActive, match=f"{run_url} was taken over by driver {second.driver}"):
            first.ensure_held()
        assert [r.getMessage() for r in caplog.records if "took over" in r.getMessage()] == [
            f"driver {second.driver} took over {run_url}: this driver stops its heartbeat"]
    finally:
        second.release()
    assert held_lease(dask_client, run_url) is None


def test_a_driver_whose_ranks_ended_stops_following_while_another_drivers_records_stream_in(dask_client):
    """A driver woken after another took its run over found its own ranks done, yet followed the records its
    successor's ranks published on the run's topic for as long as they came faster than its poll."""
    from daskgan.cluster.monitor import RunMonitor
    from daskgan.run.records import topic

    run_url = "memory://followed-by-two-drivers"
    monitor = RunMonitor(dask_client, run_url)
    ended = dask_client.submit(int, 0, pure=False)
    ended.result()
    futures = dispatch.RankFutures([ended], dispatch.worker_addresses(dask_client)[:1])
    successor = threading.Event()

    def successor_ranks() -> None:
        iteration = 0
        while not successor.wait(0.05):
            iteration += 1
            dask_client.log_event(topic(run_url), {"iteration": iteration})

    threading.Thread(target=successor_ranks, daemon=True).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            followed = pool.submit(lambda: sum(1 for _ in monitor.records(futures)))
            try:
                followed.result(timeout=30)
            finally:
                successor.set()
    finally:
        monitor.close()


def test_a_driver_asleep_while_another_took_its_run_exits_with_one_line_on_waking(cli_run, dask_client):
    """Woken, its heartbeat took the lease back from the driver that had taken the run over: that driver's ranks
    then stopped too, and the woken driver ended as if its run had merely stopped."""
    from daskgan.lease import held_lease, request_stop

    start, run_url, options, _ = cli_run
    first = start(100_000)
    second = None
    try:
        wait_for(lambda: storage.exists(f"{run_url}/records", options) and load(run_url, options) is not None
                 and len(load(run_url, options)) >= 10, 90, "records of the first client")
        first.send_signal(signal.SIGSTOP)  # a laptop asleep: its ranks checkpoint and stop once it is silent
        second = start(100_000)
        wait_for(lambda: (held_lease(dask_client, run_url) or {}).get("driver", "").endswith(f":{second.pid}"), 90,
                 "the second client taking the run")
        first.send_signal(signal.SIGCONT)
        out, err = ended(first, 90)
        assert first.returncode == 2, err
        assert err.splitlines()[-1].startswith(f"daskgan: {run_url} was taken over by driver "), err
        assert err.splitlines()[-1].split(" while ")[0].endswith(f":{second.pid}"), err
        taken_over_at = wait_for(lambda: newest_checkpoint(run_url, options), 60, "the first ranks' checkpoint")
        wait_for(lambda: load(run_url, options)["iteration"].max() >= taken_over_at + 10, 150,
                 "the second client's iterations")
        assert held_lease(dask_client, run_url)["driver"].endswith(f":{second.pid}")
        request_stop(dask_client, run_url)
        out, err = ended(second, 120)
        assert second.returncode == 0, err
    finally:  # drivers or ranks left running would hold the session's workers: end them
        for driver in (first, second):
            if driver is not None:
                driver.send_signal(signal.SIGCONT)
                driver.kill()
        request_stop(dask_client, run_url, now=True)
        wait_for(lambda: not any(dask_client.processing().values()), 60, "idle workers")
    iterations = load(run_url, options)["iteration"].tolist()
    assert iterations == list(range(1, len(iterations) + 1)), "none duplicated or missing"


def test_stop_ends_a_run_after_a_checkpoint(cli_run):
    start, run_url, options, spec = cli_run
    running = start(100_000)
    wait_for(lambda: storage.exists(f"{run_url}/records", options), 90, "records")
    stop = daskgan_process("stop", run_url, "--cluster", str(spec))
    assert stop.wait(timeout=60) == 0
    out, err = ended(running, 90)
    assert running.returncode == 0, err
    assert "stopped at iteration" in out and "(checkpoint)" in out
    assert newest_checkpoint(run_url, options) == load(run_url, options)["iteration"].max() > 0
    assert run_status(run_url, options)["state"] == "stopped"


def test_attach_follows_a_run_live_until_its_driver_lets_go(cli_run):
    start, run_url, options, spec = cli_run
    running = start(100_000)
    wait_for(lambda: storage.exists(f"{run_url}/records", options), 90, "records")
    follower = daskgan_process("attach", run_url, "--cluster", str(spec))
    first = follower.stdout.readline()  # the follower is live (its start-up takes seconds on a busy machine)
    while first and not first.startswith("iteration "):
        first = follower.stdout.readline()
    time.sleep(2)
    assert daskgan_process("stop", run_url, "--cluster", str(spec)).wait(timeout=60) == 0
    out, err = ended(running, 90)
    assert running.returncode == 0, err
    followed, err = ended(follower, 60)
    followed = first + followed
    assert follower.returncode == 0, err
    lines = [line for line in followed.splitlines() if line.startswith("iteration ")]
    assert len(lines) >= 2 and all(" of 100000: loss_G " in line for line in lines), followed
    assert "driver let go after iteration" in followed
    shown = [int(line.split()[1]) for line in lines]
    assert shown == sorted(shown) and shown[-1] <= load(run_url, options)["iteration"].max()


def test_attach_to_a_run_without_a_driver_is_one_clear_error(cli_run):
    _, run_url, _, spec = cli_run
    follower = daskgan_process("attach", run_url, "--cluster", str(spec))
    out, err = ended(follower, 60)
    assert follower.returncode == 2 and "has no live driver on this cluster" in err and err.count("\n") == 1


def test_attach_calls_a_driver_gone_only_once_its_ranks_would_stop(dask_client):
    """Attach said "stopped beating; its ranks checkpoint and stop" after two heartbeat intervals of silence (2 s
    with a 4 s timeout), while the ranks wait the whole ``driver_timeout_s``: a loaded fresh clone's attach left a
    detached run that went on to its end."""
    from daskgan.cluster.attach import follow
    from daskgan.lease import DriverLease

    lease = DriverLease(dask_client, "memory://attach-silent", timeout_s=4.0)  # beats every 1 s
    lease.acquire()
    lease.release()  # its last beat stays on the scheduler, as a killed driver's would
    dask_client.set_metadata(metadata_key("memory://attach-silent", "driver"), lease.lease(beat=1))
    followed_from = time.monotonic()
    ended = list(_ended_follow(follow(dask_client, "memory://attach-silent")))
    assert ended == ["stale"] and time.monotonic() - followed_from >= lease.timeout_s


def _ended_follow(records):
    try:
        while True:
            next(records)
    except StopIteration as end:
        yield end.value


def test_a_detached_run_outlives_its_client(cli_run, tmp_path, dask_client):
    start, run_url, options, spec = cli_run
    detached = daskgan_process("train", str(start.write_job(600)), "--cluster", str(spec), "--detach")
    out, err = ended(detached, 60)
    assert detached.returncode == 0 and "is driven from the scheduler" in out, err
    wait_for(lambda: storage.exists(f"{run_url}/records", options), 60, "the detached run's first records")
    assert run_status(run_url, options, dask_client)["state"] == "running"
    follower = daskgan_process("attach", run_url, "--cluster", str(spec))
    followed, err = ended(follower, 180)
    assert follower.returncode == 0, err
    lines = [line for line in followed.splitlines() if line.startswith("iteration ")]
    assert len(lines) >= 2 and "driver let go after iteration 600" in followed, followed
    wait_for(lambda: run_status(run_url, options)["state"] == "finished", 60, "the detached run finishing")
    assert load(run_url, options)["iteration"].tolist() == list(range(1, 601))


def test_detach_needs_a_cluster_that_outlives_the_command(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"data": {"url": "memory://d"}, "output": {"run_url": "memory://r"}}))
    refused = daskgan_process("train", str(job), "--detach")
    out, err = ended(refused, 120)
    assert refused.returncode == 2 and "--detach: needs a cluster that outlives this command" in err


def test_a_driver_attempts_again_when_storage_is_down_but_not_after_an_error_of_the_jobs_own(cli_run):
    """A DaskJob's runner drives with --attempts: Kubernetes' OnFailure restarted a permanent error forever."""
    from daskgan.tools.sandbox import free_port

    start, _, options, spec = cli_run
    job_path = start.write_job(10)
    job = yaml.safe_load(job_path.read_text())
    job["data"]["storage_options"] = {**options, "endpoint_url": f"http://127.0.0.1:{free_port()}",  # none there
                                      "config_kwargs": {"retries": {"max_attempts": 1}}}
    job["data"]["retry_tries"], job["data"]["retry_seconds"] = 1, 0.1
    job["recovery"]["wait_for_workers_s"] = 1  # the wait between attempts
    job_path.write_text(yaml.safe_dump(job))
    down = daskgan_process("train", str(job_path), "--cluster", str(spec), "--no-progress", "--attempts", "2")
    _, err = ended(down, 180)
    assert down.returncode == 1, err
    assert "attempt 2 of 2 in 1 s" in err and "attempt 3" not in err, err

    job["data"]["storage_options"] = options
    job["data"]["url"] = job["data"]["url"].rsplit("/", 1)[0] + "/no-such-dataset"  # the job's own error
    job_path.write_text(yaml.safe_dump(job))
    wrong = daskgan_process("train", str(job_path), "--cluster", str(spec), "--no-progress", "--attempts", "2")
    _, err = ended(wrong, 180)
    assert wrong.returncode == 2 and "attempt 2" not in err, err


def test_a_daskjob_runner_trains_on_the_scheduler_the_operator_names(cli_run, dask_client, tmp_path):
    """The rendered DaskJob's runner container, run as the operator would run it: its args, its env, the job file
    where the ConfigMap is mounted, and DASK_SCHEDULER_ADDRESS (the operator's) pointing at a scheduler."""
    from daskgan.cluster import KubernetesSpec
    from daskgan.cluster.daskjob import daskjob_manifests

    start, run_url, options, _ = cli_run
    plain = KubernetesSpec(image="daskgan:test", n_workers=2, tls_secret=None)  # its TLS: tests/test_cluster.py
    config_map, _, daskjob = daskjob_manifests(plain, start.write_job(12))
    driver = daskjob["spec"]["job"]["spec"]["containers"][0]
    mount = tmp_path / "mount"  # stands in for the ConfigMap volume at driver["volumeMounts"][0]["mountPath"]
    mount.mkdir()
    for name, text in config_map["data"].items():
        (mount / name).write_text(text)
    args = [arg.replace(driver["volumeMounts"][0]["mountPath"], str(mount)) for arg in driver["args"]]
    assert args[0] == "daskgan"
    env = {**os.environ, **{e["name"]: e["value"] for e in driver["env"]},
           "DASK_SCHEDULER_ADDRESS": dask_client.scheduler.address}
    runner = subprocess.run([sys.executable, "-m", "daskgan.tools.cli", *args[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert runner.returncode == 0, runner.stderr
    assert "cluster: 2 workers" in runner.stdout and "trained 12 iterations" in runner.stdout
    assert load(run_url, options)["iteration"].tolist() == list(range(1, 13))


def test_a_detached_run_whose_scheduler_dies_stays_at_its_checkpoint_and_resumes(cli_run, own_cluster, tmp_path):
    """README: the detached driver lives in the scheduler; if it dies, the workers lose the cluster too (no orphans)
    and the run stays at its last checkpoint; the next `daskgan train` resumes it."""
    start, run_url, options, _ = cli_run
    address, processes = own_cluster.start()
    spec = tmp_path / "own.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": address}}))
    job = start.write_job(100_000)
    job_data = yaml.safe_load(job.read_text())
    job_data["output"]["checkpoint_every"] = 20
    job.write_text(yaml.safe_dump(job_data))
    detached = daskgan_process("train", str(job), "--cluster", str(spec), "--detach")
    assert detached.wait(timeout=60) == 0
    wait_for(lambda: newest_checkpoint(run_url, options) >= 40, 120, "two checkpoints of the detached run")

    scheduler, *workers = processes
    scheduler.send_signal(signal.SIGKILL)
    scheduler.wait()
    wait_for(lambda: all(worker.poll() is not None for worker in workers), 60, "the workers leaving with it")
    kept = newest_checkpoint(run_url, options)
    time.sleep(2)
    assert newest_checkpoint(run_url, options) == kept, "nothing trains on once the workers are gone"
    interrupted = run_status(run_url, options)
    assert interrupted["state"] == "interrupted" and interrupted["iteration"] >= kept, interrupted

    address, _ = own_cluster.start()
    resumed = daskgan_process("train", str(start.write_job(kept + 15)), "--cluster", str(spec), "--no-progress")
    out, err = ended(resumed, 180)
    assert resumed.returncode == 0, err
    assert load(run_url, options)["iteration"].tolist() == list(range(1, kept + 16)), "none duplicated or missing"


def test_a_drivers_progress_shows_its_newest_values_its_metrics_and_the_time_left():
    """What ``daskgan runs`` prints of a running run comes from the records its driver followed."""
    from daskgan.cluster.status import LiveProgress
    from daskgan.tools.cli import format_progress

    progress = LiveProgress(iterations=100)
    assert format_progress(progress.summary()) == "", "nothing seen, nothing shown"
    for iteration in range(1, 11):  # 8 images an iteration at 80 images/s: 10 it/s
        progress.see({"iteration": iteration, "kimg": iteration * 0.008, "images_per_s": 80.0, "loss_G": 1.5,
                      "loss_D_real": 0.25, "loss_D_fake": 0.5, "ada_p": 0.125,
                      **({"fid": 12.5} if iteration == 5 else {})})
    shown = format_progress(progress.summary())
    assert shown == ("kimg 0.08, loss_G 1.5, loss_D_real 0.25, loss_D_fake 0.5, ada_p 0.125; fid 12.5 at iteration 5; "
                     "10.00 it/s, 00:00:09 left at that rate"), shown
