"""Whose failure a rank's exception is (``daskgan.errors.failure_kind``): the exceptions are the real ones where
they are cheap to make, else built with the message their source writes."""

from __future__ import annotations

import asyncio
import datetime
import errno
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import daskgan
from daskgan.errors import FailureKind, StorageUnavailable, failure_kind
from daskgan.tools.sandbox import free_port

PEER, CLUSTER, RUN = FailureKind.PEER, FailureKind.CLUSTER, FailureKind.RUN


def raised(make: Callable[[], object]) -> BaseException:
    """The exception ``make()`` raises."""
    try:
        make()
    except BaseException as error:
        return error
    raise AssertionError(f"{make.__name__} raised nothing")


def throw(error: BaseException) -> Callable[[], None]:
    """A function that raises ``error`` (so that it has a traceback, as a rank's exception does)."""
    def make() -> None:
        raise error
    return make


def torch_store_unreachable() -> None:
    """torch's TCPStore client with no store to reach: a real ``DistNetworkError``."""
    import torch.distributed as dist

    dist.TCPStore("127.0.0.1", free_port(), is_master=False, timeout=datetime.timedelta(seconds=0.1))


def scheduler_connection_closed() -> None:
    """Reading from a Dask comm whose other end closed: distributed's real ``CommClosedError``."""
    from distributed.comm import connect, listen

    async def closed() -> None:
        async def hang_up(comm) -> None:
            await comm.close()

        listener = listen("tcp://127.0.0.1:0", hang_up)
        await listener.start()
        try:
            comm = await connect(listener.contact_address)
            await comm.read()
        finally:
            listener.stop()

    asyncio.run(closed())


def socket_reset_by_peer() -> None:
    """A loopback TCP peer that aborts its connection: the OS's ``ConnectionResetError``."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
        accepted.close()
        client.recv(1)


def pipe_to_a_closed_peer() -> None:
    """Writing to a socket whose peer closed: the OS's ``BrokenPipeError``."""
    mine, theirs = socket.socketpair()
    theirs.close()
    with mine:
        mine.send(b"x")


def disk_full() -> None:
    """A write the disk cannot take: the OS's ``OSError`` ENOSPC (``/dev/full``), the rank's own."""
    with open("/dev/full", "wb", buffering=0) as full:
        full.write(b"x")


def dist_backend_error(message: str) -> Callable[[], None]:
    """torch's ``DistBackendError`` (raised by its C++ backends; built here with their message)."""
    def make() -> None:
        import torch.distributed as dist

        raise dist.DistBackendError(message)
    return make


KINDS = [
    (torch_store_unreachable, PEER),
    (dist_backend_error("NCCL communicator was aborted on rank 1."), PEER),
    (throw(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:40404")), PEER),
    (throw(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:40404: "
                        "Connection reset by peer")), PEER),
    (throw(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms "
                        "for recv operation to complete")), PEER),
    (throw(RuntimeError("[c10d] Socket Timeout")), PEER),
    (throw(RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, "
                        "OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.")), PEER),
    (socket_reset_by_peer, PEER),
    (pipe_to_a_closed_peer, PEER),
    (scheduler_connection_closed, CLUSTER),
    (throw(StorageUnavailable("read s3://bucket/run/records.parquet: still failing after 8 tries in 300s "
                              "(ClientError: SlowDown)")), CLUSTER),
    (disk_full, RUN),
    (throw(ValueError("bad shard")), RUN),
    (throw(KeyError("generator")), RUN),
]


@pytest.mark.parametrize("make, kind", KINDS, ids=[f"{i}-{kind.value}" for i, (_, kind) in enumerate(KINDS)])
def test_each_failure_is_of_its_kind(make, kind):
    assert failure_kind(raised(make)) is kind


def test_a_scheduler_that_cannot_be_reached_is_the_clusters_error_not_the_runs():
    """Once the scheduler is gone, a rank's call to it (the driver watch's metadata) ends in distributed's connect
    timeout: a plain OSError, raised inside distributed. The run did nothing wrong: status says interrupted."""
    from distributed.comm import connect

    with pytest.raises(OSError) as caught:
        asyncio.run(connect(f"tcp://127.0.0.1:{free_port()}", timeout=0.5))
    assert type(caught.value) is OSError and "Timed out trying to connect" in str(caught.value)
    assert failure_kind(caught.value) is CLUSTER
    assert failure_kind(OSError(errno.ENOSPC, "No space left on device")) is RUN, "the rank's own"


def test_classifying_imports_neither_torch_nor_distributed():
    """The client and ``daskgan.config`` import ``daskgan.errors`` without paying for torch."""
    code = ("import sys; from daskgan.errors import failure_kind; failure_kind(ValueError('x')); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'distributed'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(daskgan.__file__).parent.parent).stdout.strip()
    assert loaded == "[]"
