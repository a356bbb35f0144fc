"""``daskgan status``: where a run stands, from its run directory (and, given a cluster, whether a driver is live).

States: ``finished`` (the last record is the job's last iteration), ``stopped`` (a stop request or a silent driver
made the ranks checkpoint and stop: ``state.json``), ``failed`` (rank 0 raised, ``state.json`` holds the error's
first line), ``running`` (a driver's heartbeat moves on the cluster),
``interrupted`` (none of these: a driver died and its ranks stopped at a checkpoint, or a run that never got
going), ``not started`` (no records).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pandas as pd
import yaml

from daskgan import dispatch
from daskgan.cluster import reservations
from daskgan.config.schema import METRICS
from daskgan.errors import NotFound
from daskgan.lease import active_runs, driver_is_live, ended_runs, held_lease, request_stop
from daskgan.run import checkpoint, layout, storage
from daskgan.run.records import load
from daskgan.run.storage import StorageOptions

LAST_VALUES = ("kimg", "loss_G", "loss_D_real", "loss_D_fake", "ada_p")  # of a run's newest record, as shown
RECENT_RECORDS = 50  # the newest records a run's speed is measured over (warm steps)


def run_status(run_url: str, storage_options: StorageOptions | None = None, client: Any = None) -> dict[str, Any]:
    """The run's state, progress, last losses and p, restarts, speed and ETA, newest checkpoint (plain data)."""
    config = _read_config(run_url, storage_options)
    records = load(run_url, storage_options)
    iterations = int(config.get("train", {}).get("iterations", 0))
    status: dict[str, Any] = {"run_url": run_url, "iterations": iterations, "iteration": 0,
                              "checkpoint": checkpoint.latest(run_url, storage_options)}
    if len(records):
        last = records.iloc[-1]
        status.update(iteration=int(last["iteration"]), **newest_values(last))
        status["restarts"] = int(records["restarts"].max()) if "restarts" in records.columns else 0
        status.update(_preemptions(records), **_world_sizes(records))
        status.update(_speed(records, iterations))
    status["state"] = _state(run_url, status, storage_options, client)
    if status["state"] == "running":  # only a live driver's lease names it
        status["driver"] = held_lease(client, run_url)["driver"]
        status["workers"] = sorted(dispatch.worker_addresses(client))
    return status


def _state(run_url: str, status: dict, storage_options: StorageOptions | None, client: Any) -> str:
    if status["iterations"] and status["iteration"] >= status["iterations"]:
        return "finished"
    if client is not None and driver_is_live(client, run_url):
        return "running"
    ended = layout.read_state(run_url, storage_options)
    if ended is not None and ended.iteration == status["iteration"]:
        if ended.error:
            status["error"] = ended.error
        return ended.state
    return "interrupted" if status["iteration"] else "not started"


def _preemptions(records) -> dict[str, Any]:
    """How many restarts were preemptions, and the newest one's seconds from notice to durable checkpoint."""
    if "restart_cause" not in records.columns:
        return {}
    preempted = records[records["restart_cause"].fillna("").str.startswith("preempted")]
    if not len(preempted):
        return {}
    return {"preemptions": len(preempted),
            "notice_to_checkpoint_s": float(preempted["notice_to_checkpoint_s"].iloc[-1])}


def _world_sizes(records) -> dict[str, Any]:
    """The ranks now, and each change of their count: [(first iteration, ranks), ...]."""
    if "world_size" not in records.columns:
        return {}
    sizes = records[["iteration", "world_size"]].dropna()
    changes = sizes[sizes["world_size"].diff() != 0]
    return {"world_size": int(sizes["world_size"].iloc[-1]),
            "world_sizes": [(int(i), int(n)) for i, n in zip(changes["iteration"], changes["world_size"])]}


def newest_values(record: Any) -> dict[str, float]:
    """The ``LAST_VALUES`` a record holds (a dict or a DataFrame row; missing and NaN ones left out)."""
    return {name: float(record[name]) for name in LAST_VALUES
            if name in record and record[name] is not None and record[name] == record[name]}


class LiveProgress:
    """A driver's view of its run from the records it follows, which it publishes with its lease: what
    ``daskgan runs`` shows of a running run without reading its run directory (the client may hold no storage
    credentials). ``see`` each record; ``summary`` is called from the heartbeat's thread."""

    def __init__(self, iterations: int):
        self.iterations = iterations
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RECORDS)
        self._metrics: dict[str, dict[str, float]] = {}

    def see(self, record: dict[str, Any]) -> None:
        self._recent.append(record)
        for name in METRICS:
            if record.get(name) is not None:
                self._metrics[name] = {"value": float(record[name]), "iteration": record["iteration"]}

    def summary(self) -> dict[str, Any]:
        """The newest record's values, the newest value of each metric, and the speed and ETA (``_speed``)."""
        recent = list(self._recent)
        if not recent:
            return {}
        return {**newest_values(recent[-1]), **_speed(pd.DataFrame(recent), self.iterations),
                "metrics": dict(self._metrics)}


def _speed(records, iterations: int) -> dict[str, float]:
    """Iterations per second over the newest records (warm steps) and the time the rest would take at that rate."""
    recent = records.tail(RECENT_RECORDS)
    if "images_per_s" not in recent.columns or len(recent) < 2:
        return {}
    per_iteration = float((recent["kimg"].diff().dropna() * 1000 / recent["images_per_s"].iloc[1:]).median())
    if not per_iteration > 0:
        return {}
    remaining = max(iterations - int(recent["iteration"].iloc[-1]), 0)
    return {"iterations_per_s": 1 / per_iteration, "eta_s": remaining * per_iteration}


def _read_config(run_url: str, storage_options: StorageOptions | None) -> dict:
    try:
        return yaml.safe_load(storage.read_bytes(layout.config_url(run_url), storage_options)) or {}
    except NotFound:
        raise NotFound(f"{run_url} is not a daskgan run directory (no {layout.CONFIG})") from None


def format_values(values: dict[str, Any]) -> str:
    """The ``LAST_VALUES`` among ``values``, as a line shows them."""
    return ", ".join(f"{name} {values[name]:.4g}" for name in LAST_VALUES if name in values)


def format_speed(speed: dict[str, float]) -> str:
    """Iterations per second and the time left at that rate (``_speed``'s figures), as a line shows them."""
    eta = time.strftime("%H:%M:%S", time.gmtime(speed["eta_s"])) if speed["eta_s"] < 86400 else \
        f"{speed['eta_s'] / 86400:.1f} days"
    return f"{speed['iterations_per_s']:.2f} it/s, {eta} left at that rate"


def format_status(status: dict[str, Any]) -> str:
    """The status as the command prints it."""
    lines = [f"{status['run_url']}: {status['state']}, iteration {status['iteration']} of {status['iterations']}"]
    losses = format_values(status)
    if losses:
        lines.append(f"  {losses}")
    if "iterations_per_s" in status:
        lines.append(f"  {format_speed(status)}; restarts {status.get('restarts', 0)}")
    if "preemptions" in status:
        lines.append(f"  preemptions {status['preemptions']}, the newest checkpointed "
                     f"{status['notice_to_checkpoint_s']:.1f} s after its notice")
    if len(status.get("world_sizes", [])) > 1:
        history = ", ".join(f"{ranks} from iteration {first}" for first, ranks in status["world_sizes"])
        lines.append(f"  ranks {status['world_size']} ({history})")
    if "error" in status:
        lines.append(f"  error: {status['error']}")
    if "driver" in status:
        lines.append(f"  driver {status['driver']}; {len(status['workers'])} workers: {', '.join(status['workers'])}")
    lines.append(f"  checkpoint: {status['checkpoint']}")
    return "\n".join(lines)


def cluster_runs(client: Any) -> dict[str, list[dict[str, Any]]]:
    """The runs on a cluster as plain data: ``queued`` (position, workers asked, priority, waiting since: epoch
    seconds), in the order they will start, and ``running``: every run with a driver's lease (run_url, driver,
    iteration, iterations, live: whether its heartbeat moves, progress: what its driver published) but not queued,
    with ``workers``: the ones the cluster's queue granted it (None: a run that takes every worker, unreserved), and
    ``ended``: the runs whose driver let go within the last day and that neither run nor wait now, newest first
    (``daskgan.lease.ended_runs``: outcome, ended_at, iteration)."""
    book = reservations.listing(client)
    queued = {run["run_url"] for run in book["queued"]}
    granted = {run["run_url"]: run["workers"] for run in book["granted"]}
    running = [{**lease, "workers": granted.get(lease["run_url"])} for lease in active_runs(client)
               if lease["run_url"] not in queued]
    busy = queued | {lease["run_url"] for lease in running}
    return {"queued": book["queued"], "running": running,
            "ended": [run for run in ended_runs(client) if run["run_url"] not in busy]}


def stop_run(client: Any, run_url: str, now: bool = False) -> dict[str, Any]:
    """Take the run out of the cluster's queue if it waits there (its driver ends, nothing trained); otherwise
    ask its ranks to stop, after a checkpoint or ``now``. Returns what was done: ``{"run_url", "stopped"}`` with
    ``queued``, ``checkpoint`` or ``now``."""
    if reservations.remove_queued(client, run_url):
        return {"run_url": run_url, "stopped": "queued"}
    request_stop(client, run_url, now=now)
    return {"run_url": run_url, "stopped": "now" if now else "checkpoint"}
