"""The reservation book: runs sharing a cluster get workers of their own or wait in a queue, in order; workers go
back to the pool when a run ends, its driver goes silent or a worker leaves. The rules on their own (``Book``), then
the book on a real scheduler, where two drivers asking at once never get the same worker."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import yaml
from test_driver_lease import wait_for

from daskgan import dispatch
from daskgan.cluster.driver import run_job
from daskgan.cluster.reservations import Book, Removed, Reservation, listing, remove_queued, waiting_line
from daskgan.cluster.status import stop_run
from daskgan.config import JobConfig
from daskgan.lease import DriverLease
from daskgan.tools.cli import main

WORKERS = {"tcp://127.0.0.1:1", "tcp://127.0.0.1:2"}


def test_two_runs_get_a_worker_each_and_a_third_waits_for_the_first_to_end():
    book = Book()
    a = book.reserve("a", 1, "ta", 0, WORKERS)
    b = book.reserve("b", 1, "tb", 0, WORKERS)
    assert a["state"] == b["state"] == "granted" and set(a["workers"] + b["workers"]) == WORKERS
    c = book.reserve("c", 1, "tc", 0, WORKERS)
    assert c == {"state": "queued", "position": 1, "asked": 1, "free": 0, "cluster": 2,
                 "holders": {"a": a["workers"], "b": b["workers"]}}
    assert book.reserve("c", 1, "tc", 0, WORKERS)["position"] == 1, "asking again is a poll, not a second place"
    book.release("a", "ta", WORKERS)
    assert book.reserve("c", 1, "tc", 0, WORKERS) == {"state": "granted", "workers": a["workers"]}


def test_the_queue_is_first_come_first_served_within_a_priority_and_the_head_is_not_overtaken():
    book = Book()
    book.reserve("running", 2, "t0", 0, WORKERS)
    book.reserve("big", 2, "t1", 0, WORKERS)
    book.reserve("small", 1, "t2", 0, WORKERS)
    book.reserve("urgent", 1, "t3", 5, WORKERS)
    assert [(run["run_url"], run["position"]) for run in book.listing()["queued"]] == [
        ("urgent", 1), ("big", 2), ("small", 3)]
    book.release("running", "t0", WORKERS)
    listed = book.listing()
    assert [run["run_url"] for run in listed["granted"]] == ["urgent"]
    assert [run["run_url"] for run in listed["queued"]] == ["big", "small"], "small waits behind big, though 1 is free"


def test_a_worker_that_leaves_frees_its_slot_and_its_run_is_topped_up_before_the_queue():
    book = Book()
    held = book.reserve("a", 1, "ta", 0, WORKERS)["workers"]
    book.reserve("b", 2, "tb", 0, WORKERS)
    book.worker_left(held[0])
    book.advance(WORKERS - set(held))
    assert book.reserve("a", 1, "ta", 0, WORKERS - set(held))["state"] == "granted"
    assert book.listing()["granted"][0]["workers"] == sorted(WORKERS - set(held)), "a lost its worker, got the other"
    joined = WORKERS - set(held) | {"tcp://127.0.0.1:3"}
    book.advance(joined)
    assert [run["run_url"] for run in book.listing()["queued"]] == ["b"], "b asks 2: one free is not enough"


def test_a_run_short_of_workers_leaves_out_the_lost_ones_that_linger():
    book = Book()
    lost = book.reserve("a", 1, "ta", 0, WORKERS)["workers"][0]
    assert book.reserve("a", 1, "ta", 0, WORKERS, excluded=(lost,)) == {
        "state": "granted", "workers": sorted(WORKERS - {lost})}


def test_a_run_whose_driver_let_go_or_went_silent_frees_its_workers():
    book = Book()
    book.reserve("gone", 1, "t1", 0, WORKERS)
    book.reserve("silent", 1, "t2", 0, WORKERS)
    book.reserve("queued", 1, "t3", 0, WORKERS)
    lease = {"token": "t2", "beat": 1, "interval_s": 0.05, "timeout_s": 0.1}
    late = {"token": "t3", "beat": 1, "interval_s": 0.05, "timeout_s": 60}
    book.expire({"silent": lease, "queued": late}, WORKERS)
    assert [run["run_url"] for run in book.listing()["granted"]] == ["queued", "silent"], "gone's lease is released"
    time.sleep(0.2)  # past silent's driver_timeout_s, its beat still; within late's, though past its intervals
    book.expire({"silent": lease, "queued": late}, WORKERS)
    assert [run["run_url"] for run in book.listing()["granted"]] == ["queued"], "late's ranks still train: kept"


def test_a_queued_run_can_be_removed_but_not_a_running_one():
    book = Book()
    book.reserve("a", 2, "ta", 0, WORKERS)
    book.reserve("b", 1, "tb", 0, WORKERS)
    assert not book.remove_queued("a") and book.remove_queued("b")
    assert book.listing()["queued"] == []
    assert book.reserve("b", 1, "tb", 0, WORKERS) == {"state": "removed"}, "its driver learns it at its next poll"


def test_the_waiting_line_says_the_position_and_what_holds_the_workers():
    answer = {"state": "queued", "position": 1, "asked": 3, "free": 0, "cluster": 2, "holders": {"a": ["w1", "w2"]}}
    assert waiting_line("c", answer) == ("c queued at position 1 for 3 workers (the cluster has only 2 workers: more "
                                         "must join): 0 of 2 free; a has 2")


@contextmanager
def drivers(client, asked: list[int]):
    """Drivers with a lease each and a reservation of ``asked[i]`` workers (registering the book); they end after."""
    leases = [DriverLease(client, f"memory://book/{uuid.uuid4().hex[:6]}", 30.0) for _ in asked]
    for lease in leases:
        lease.acquire()
    reservations = [Reservation(client, lease.run_url, n, lease.token) for lease, n in zip(leases, asked)]
    try:
        yield leases, reservations
    finally:
        for lease, reservation in zip(leases, reservations):
            reservation.release()
            lease.release()


def test_drivers_asking_at_once_on_a_scheduler_never_share_a_worker(dask_client):
    with drivers(dask_client, [1, 1, 1]) as (leases, reservations):
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(Reservation.ask, reservations))
        granted = [answer["workers"][0] for answer in answers if answer["state"] == "granted"]
        assert sorted(granted) == sorted(dispatch.worker_addresses(dask_client)), "one worker each, none shared"
        queued = next(r for r, answer in zip(reservations, answers) if answer["state"] == "queued")
        assert [run["position"] for run in listing(dask_client)["queued"]] == [1]
        first = reservations.index(next(r for r, answer in zip(reservations, answers) if answer["state"] == "granted"))
        freed = reservations[first].ask()["workers"]
        leases[first].release()  # its driver let go of the run, without a word to the book
        assert queued.wait() == freed, "the queued run gets the worker freed by the run whose lease ended"


def test_stop_takes_a_queued_run_out_and_its_waiting_driver_ends(dask_client):
    with drivers(dask_client, [2, 2]) as (_, (big, queued)):
        assert big.ask()["state"] == "granted" and queued.ask()["state"] == "queued"
        assert remove_queued(dask_client, queued.run_url) and not remove_queued(dask_client, big.run_url)
        with pytest.raises(Removed, match="taken out of the queue"):
            queued.wait()


def test_runs_lists_a_queued_driver_and_stop_takes_it_out_before_it_trains(dask_client, tmp_path, capsys):
    """The driver of a run with ``recovery.workers`` waits in the queue while another run holds every worker;
    `daskgan runs` lists it (position, workers asked), `daskgan stop` takes it out, and its driver returns
    ``stopped: queued`` without dispatching anything."""
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": dask_client.scheduler.address}}))
    job = JobConfig.from_dict({"name": "q", "data": {"url": "memory://data"}, "recovery": {"workers": 1},
                               "output": {"run_url": "memory://book/queued-driver"}})
    with drivers(dask_client, [2]) as (_, (holder,)), ThreadPoolExecutor(1) as pool:
        assert holder.ask()["state"] == "granted"
        driven = pool.submit(run_job, dask_client, job)
        wait_for(lambda: listing(dask_client)["queued"], 60, "the driver queued")
        assert main(["runs", "--cluster", str(spec)]) == 0
        listed = capsys.readouterr().out
        assert f"{job.output.run_url}: queued, position 1, 1 worker(s) asked, waiting since " in listed, listed
        assert f"{holder.run_url}: iteration 0 of 0, driven by " in listed and "1 queued" in listed, listed
        assert main(["stop", job.output.run_url, "--cluster", str(spec)]) == 0
        assert f"took {job.output.run_url} out of the cluster's queue" in capsys.readouterr().out
        assert driven.result(timeout=60)["stopped"] == "queued"
    assert stop_run(dask_client, job.output.run_url) == {"run_url": job.output.run_url, "stopped": "checkpoint"}, \
        "a run not queued is asked to stop, as before"
