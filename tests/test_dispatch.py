"""dispatch.run on a 2-worker LocalCluster over gloo."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from daskgan import dispatch


def all_reduce_rank(offset, *, scale):
    value = torch.tensor([float(dist.get_rank() + offset) * scale])
    dist.all_reduce(value)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return value.item(), env, dist.get_backend()


def fail_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(0.5)
        raise ValueError("bad shard")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone
    return "unreachable"


def test_every_rank_joins_one_process_group(dask_client):
    futures = dispatch.run(dask_client, all_reduce_rank, 10, scale=2.0)  # positional args do not collide
    results = dispatch.results(futures, timeout=120)
    assert [r[0] for r in results] == [(10 + 11) * 2.0] * 2
    envs = [r[1] for r in results]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"], "both workers share one host"
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"] == "127.0.0.1"
    assert {r[2] for r in results} == {"gloo"}


def test_back_to_back_runs_use_fresh_ports(dask_client):
    ports = set()
    for _ in range(3):
        results = dispatch.results(dispatch.run(dask_client, all_reduce_rank, 0, scale=1.0), timeout=120)
        ports.add(results[0][1]["MASTER_PORT"])
        assert results[0][0] == 1.0
    assert len(ports) == 3


def test_failing_rank_surfaces_with_its_rank_quickly(dask_client):
    started = time.monotonic()
    futures = dispatch.run(dask_client, fail_on_rank_one, timeout=60)
    with pytest.raises(ValueError, match="bad shard") as caught:
        dispatch.results(futures)
    assert caught.value.rank == 1
    assert any("rank 1 of 2" in note for note in caught.value.__notes__)
    assert time.monotonic() - started < 45, "the surviving rank must not wait for the full timeout"
    # the workers are usable again straight away
    assert dispatch.results(dispatch.run(dask_client, all_reduce_rank, 0, scale=1.0), timeout=120)[0][0] == 1.0


def fresh_token():
    import uuid

    dist.barrier()
    return uuid.uuid4().hex


def test_a_reused_rendezvous_port_does_not_alias_an_earlier_dispatch(dask_client, monkeypatch):
    port = dask_client.run(dispatch.free_port, workers=[sorted(dask_client.scheduler_info()["workers"])[0]])
    monkeypatch.setattr(dispatch, "_rendezvous_port", lambda client, address: next(iter(port.values())))
    earlier = dispatch.run(dask_client, fresh_token)  # still held, as a monitor or a cancelled run would hold it
    first = dispatch.results(earlier, timeout=120)
    second = dispatch.results(dispatch.run(dask_client, fresh_token), timeout=120)
    assert set(first).isdisjoint(second), "the second dispatch ran, rather than returning the first's results"
