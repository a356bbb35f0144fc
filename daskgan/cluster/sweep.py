"""Sweeps (issue #27): one run per point of a grid of settings, each queued on the cluster's reservation book
(``cluster.reservations``) for its own workers, with optional successive halving on the job's ranking metric.

A setting ``train.lr_g=1e-4,2e-3`` is an axis of the grid (its values read as YAML, as overrides are); one with a
single value applies to every run. Each run's directory is ``<the job's output.run_url>/<its name>``, the name
made of the swept settings (``lr_g-0.0001_r1_gamma-2``: leaf keys, unless two axes share one; characters safe on a
filesystem and in S3 keys), so that `daskgan compare` and TensorBoard on the sweep's folder show them side by side.
The sweep's manifest, ``sweep.json`` in that folder, is written before any run starts: the base job, the points
and their run URLs, and later each rung's cut.

Successive halving (``halving_kimg``, rungs in kimg): a run that reaches a rung (its first evaluation of the
metric at or past the rung's kimg) stops with a checkpoint, freeing its workers for queued runs, until every run
still in the sweep has reached the rung; then the better half (rounded down, at least one) by the metric goes on,
resuming from its checkpoint, and the others stay stopped. The last run to reach a rung goes straight on if it
makes the cut. This is synchronous successive halving, as Hyperband's brackets run it: the cut at a rung compares
every run at the same kimg.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from daskgan.config import JobConfig, load_job
from daskgan.config.overrides import split_setting
from daskgan.config.schema import HIGHER_IS_BETTER
from daskgan.errors import ConfigError, first_line
from daskgan.run import storage

logger = logging.getLogger(__name__)

MANIFEST = "sweep.json"
MAX_RUNS = 64  # a larger grid is a typo more often than a plan
UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")  # what a run name's value may hold: safe in S3 keys and on filesystems
BOOKED_POLL_S = 0.2  # how often the sweep looks whether a run it started has joined the book


@dataclass
class Point:
    """One run of the sweep: its swept settings (as the job holds them), name, run directory and job."""

    name: str
    settings: dict[str, Any]
    job: JobConfig

    @property
    def run_url(self) -> str:
        return self.job.output.run_url


@dataclass
class Sweep:
    """What ``plan_sweep`` resolved: the base job, the grid's points and the halving rungs (kimg)."""

    base: JobConfig
    points: list[Point]
    workers_per_run: int
    halving_kimg: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base.output.run_url

    def manifest(self) -> dict[str, Any]:
        """``sweep.json`` as plain data (credentials redacted, as a run's ``config.yaml``)."""
        return {"sweep_url": self.url, "job": self.base.to_dict(), "workers_per_run": self.workers_per_run,
                "metric": self.base.ranking_metric, "halving_kimg": list(self.halving_kimg),
                "points": [{"name": p.name, "run_url": p.run_url, "settings": p.settings} for p in self.points],
                "rungs": [], "outcomes": {}}


def plan_sweep(job: str, settings: Sequence[str], workers_per_run: int, halving_kimg: Sequence[float] = ()) -> Sweep:
    """The sweep of job file ``job`` over ``settings`` (``key=v1,v2,...``), each run on ``workers_per_run``
    workers; every point's job validated, so a bad key, value or grid is one ``ConfigError`` line before any run."""
    axes = parse_axes(settings)
    fixed = [f"{key}={json.dumps(values[0])}" for key, values in axes.items() if len(values) == 1]
    swept = {key: values for key, values in axes.items() if len(values) > 1}
    count = len(list(itertools.product(*swept.values())))
    if count > MAX_RUNS:
        raise ConfigError(f"the grid has {count} runs, more than {MAX_RUNS}: sweep fewer values")
    base = _job(job, workers_per_run, fixed)
    if base.output.resume != "auto":
        raise ConfigError(f"output.resume: a sweep's runs resume from their own newest checkpoints (after a rung, "
                          f"or the sweep started again): set it to auto, not {base.output.resume!r}")
    points = [_point(job, workers_per_run, fixed, base.output.run_url, dict(zip(swept, values)))
              for values in itertools.product(*swept.values())]
    _refuse_same_names(points)
    _check_rungs(base, workers_per_run, list(halving_kimg))
    return Sweep(base, points, workers_per_run, list(halving_kimg))


def parse_axes(settings: Sequence[str]) -> dict[str, list[Any]]:
    """``key=v1,v2,...`` as ``{key: [v1, v2, ...]}``, the values read as one YAML flow sequence (so ``[fid,kid]``
    is one value, a list, and quoted commas stay in their string)."""
    axes: dict[str, list[Any]] = {}
    for setting in settings:
        key, text = split_setting(setting, "a swept setting is KEY=V1,V2,... with a dotted key, e.g. "
                                           "train.lr_g=1e-4,2e-4")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: {text!r} is not a comma-separated list of YAML values: "
                              f"{getattr(exc, 'problem', exc)}") from None
        if not values:
            raise ConfigError(f"{key}: no values to sweep; give {key}=V1,V2,...")
        axes[key] = values
    return axes


def point_name(settings: dict[str, Any]) -> str:
    """A run's folder name from its swept settings: ``<leaf key>-<value>`` joined by ``_`` (the whole dotted key
    where two settings share a leaf), the values' unsafe characters as ``-``."""
    leaves = [key.rsplit(".", 1)[-1] for key in settings]
    labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(settings, leaves)]
    return "_".join(f"{label}-{_value_text(value)}" for label, value in zip(labels, settings.values()))


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_value_text(item) for item in value)
    return UNSAFE.sub("-", value if isinstance(value, str) else json.dumps(value))


def _job(job: str, workers: int, overrides: list[str]) -> JobConfig:
    return load_job(job, workers=workers, overrides=[*overrides, f"recovery.workers={workers}"])


def _point(job: str, workers: int, fixed: list[str], sweep_url: str, values: dict[str, Any]) -> Point:
    """A point's job (validated), its settings as the job holds them (``2e-3`` read as a number), its name."""
    config = _job(job, workers, [*fixed, *(f"{key}={json.dumps(value)}" for key, value in values.items())])
    held = config.to_dict(redact_secrets=False)
    settings = {key: _lookup(held, key, value) for key, value in values.items()}
    name = point_name(settings)
    output = dataclasses.replace(config.output, run_url=storage.join(sweep_url, name))
    return Point(name, settings, dataclasses.replace(config, output=output).validate())


def _lookup(data: dict[str, Any], key: str, default: Any) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def _refuse_same_names(points: list[Point]) -> None:
    seen: set[str] = set()
    for point in points:
        if point.name in seen:
            raise ConfigError(f"two runs named {point.name}: a swept setting repeats a value (or two values differ "
                              "only in characters a run name cannot hold)")
        seen.add(point.name)


def _check_rungs(base: JobConfig, workers: int, rungs: list[float]) -> None:
    """Rungs in increasing kimg before the runs' end, with a metric evaluated to cut on."""
    if not rungs:
        return
    if base.metrics.every <= 0 or not base.metrics.kinds:
        raise ConfigError("--halving-kimg: the runs evaluate no metric to cut on; set metrics.every (and "
                          "metrics.kinds)")
    if any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[0] <= 0:
        raise ConfigError(f"--halving-kimg: rungs must be increasing kimg above 0, got {rungs}")
    end = base.train.iterations * base.images_per_iteration(workers) / 1000
    if rungs[-1] >= end:
        raise ConfigError(f"--halving-kimg: {rungs[-1]:g} kimg is not before the runs' end at {end:g} kimg")


class Halving:
    """Successive halving on plain data: the rung each run is to reach next, and each rung's cut once every run
    still in the sweep reached it (see the module docstring). Runs are named; ``reach`` and ``leave`` return the
    rung's decision when they complete it, else None."""

    def __init__(self, names: Sequence[str], rungs_kimg: Sequence[float], higher_is_better: bool = False):
        self.names, self.rungs, self.sign = list(names), list(rungs_kimg), -1 if higher_is_better else 1
        self.rung_of = {name: 0 for name in self.names}  # the index of the rung each run is to reach next
        self.values: list[dict[str, float]] = [{} for _ in self.rungs]
        self.out: dict[str, str] = {}  # runs no longer in the sweep's cut: why (cut at a rung, or ended)
        self.decisions: list[dict[str, Any]] = []

    def next_rung(self, name: str) -> float | None:
        """The kimg of the rung the run is to reach next; None with none left, or while it waits for a cut."""
        rung = self.rung_of[name]
        if name in self.out or rung >= len(self.rungs) or name in self.values[rung]:
            return None
        return self.rungs[rung]

    def reach(self, name: str, value: float) -> dict[str, Any] | None:
        """The run reached its next rung with ``value`` of the metric."""
        self.values[self.rung_of[name]][name] = value
        return self._decide(self.rung_of[name])

    def leave(self, name: str, why: str) -> dict[str, Any] | None:
        """The run ended by itself (finished, failed, stopped by a user): the cuts go on without it."""
        if name in self.out:
            return None
        self.out[name] = why
        rung = self.rung_of[name]
        if rung >= len(self.rungs):
            return None
        self.values[rung].pop(name, None)
        return self._decide(rung)

    def verdict(self, name: str) -> str:
        """``stop`` (cut, or ended), ``waiting`` (at a rung not yet cut) or ``go`` (on to its next rung)."""
        if name in self.out:
            return "stop"
        rung = self.rung_of[name]
        return "waiting" if rung < len(self.rungs) and name in self.values[rung] else "go"

    def _decide(self, rung: int) -> dict[str, Any] | None:
        """The cut at ``rung`` once every run still in has a value there: the better half (rounded down, at least
        one) goes on, best first by the metric (NaN last), ties by grid order."""
        values = self.values[rung]
        still_in = [name for name in self.names if name not in self.out]
        if rung < len(self.decisions) or not still_in or any(name not in values for name in still_in):
            return None
        ranked = sorted(still_in, key=lambda name: (values[name] != values[name], self.sign * values[name]))
        kept, cut = ranked[:max(1, len(ranked) // 2)], ranked[max(1, len(ranked) // 2):]
        for name in kept:
            self.rung_of[name] += 1
        for name in cut:
            self.out[name] = f"stopped at rung {rung + 1} ({self.rungs[rung]:g} kimg)"
        self.decisions.append({"rung": rung + 1, "kimg": self.rungs[rung], "values": {n: values[n] for n in ranked},
                               "kept": kept, "stopped": {name: values[name] for name in cut}})
        return self.decisions[-1]


def run_sweep(client: Any, sweep: Sweep) -> dict[str, Any]:
    """Drive every run of ``sweep`` from this process until all ended: the manifest (plain data), with each rung's
    cut and each run's outcome. Runs join the cluster's queue in grid order."""
    return _SweepDriver(client.scheduler.address, sweep).run()


def detach_sweep(client: Any, sweep: Sweep) -> str:
    """Write the manifest, then drive the sweep from a thread in the scheduler's process, where it outlives this
    client (as ``train --detach``); returns the scheduler's address."""
    write_manifest(sweep.url, sweep.manifest(), sweep.base.output.storage_options)
    client.run_on_scheduler(_start_sweep_thread, sweep)
    return client.scheduler.address


def _start_sweep_thread(sweep: Sweep, dask_scheduler: Any = None) -> None:
    def drive() -> None:
        try:
            outcomes = _SweepDriver(dask_scheduler.address, sweep).run()["outcomes"]
            logger.info("detached sweep %s ended: %s", sweep.url, outcomes)
        except Exception:
            logger.exception("detached sweep %s failed", sweep.url)

    threading.Thread(target=drive, daemon=True, name=f"daskgan-sweep-{sweep.base.name}").start()


def write_manifest(sweep_url: str, manifest: dict[str, Any], storage_options: dict | None) -> None:
    """Write ``sweep.json`` whole (one writer, the sweep's driver: object stores cannot append)."""
    storage.write_bytes(storage.join(sweep_url, MANIFEST), json.dumps(manifest, indent=1).encode(), storage_options)


def read_manifest(sweep_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """A sweep's ``sweep.json`` as plain data."""
    return json.loads(storage.read_bytes(storage.join(sweep_url, MANIFEST), storage_options))


class _SweepDriver:
    """One thread per run, each with its own client (a client holds one handler per event topic), driving its
    run through ``run_job``; halving decisions are taken from the records those drivers receive."""

    def __init__(self, address: str, sweep: Sweep):
        self.address, self.sweep = address, sweep
        self.manifest = sweep.manifest()
        self.metric = sweep.base.ranking_metric
        self.halving = Halving([p.name for p in sweep.points], sweep.halving_kimg, self.metric in HIGHER_IS_BETTER)
        self.changed = threading.Condition()
        self.paused: set[str] = set()  # runs asked to stop at a rung: they wait for its cut

    def run(self) -> dict[str, Any]:
        from distributed import Client

        self._write()
        threads = []
        with Client(self.address, set_as_default=False) as client:
            for point in self.sweep.points:
                threads.append(threading.Thread(target=self._drive, args=(point,), daemon=True,
                                                name=f"daskgan-sweep-{point.name}"))
                threads[-1].start()
                _wait_until_booked(client, point.run_url, threads[-1])  # the queue keeps the grid's order
        for thread in threads:
            thread.join()
        return self.manifest

    def _drive(self, point: Point) -> None:
        from distributed import Client

        outcome = "failed"
        try:
            with Client(self.address, set_as_default=False) as client:
                outcome = self._train(client, point)
        except Exception as error:
            logger.exception("sweep run %s failed", point.run_url)
            outcome = f"failed: {first_line(error)}"
        finally:
            with self.changed:
                self._decided(self.halving.leave(point.name, outcome))
                self.manifest["outcomes"][point.name] = self.halving.out.get(point.name, outcome)
                self._write()

    def _train(self, client: Any, point: Point) -> str:
        """Train the run, again after each rung it makes; how it ended, in words."""
        from daskgan.cluster.driver import outcome_of, run_job

        while True:
            summary = run_job(client, point.job, on_record=lambda record: self._see(client, point, record))
            if not summary.get("stopped") or point.name not in self.paused:
                return outcome_of(summary)
            with self.changed:
                self.changed.wait_for(lambda: self.halving.verdict(point.name) != "waiting")
                if self.halving.verdict(point.name) == "stop":
                    return self.halving.out[point.name]
                self.paused.discard(point.name)
            logger.info("%s made the cut: it resumes from its checkpoint", point.run_url)

    def _see(self, client: Any, point: Point, record: dict[str, Any]) -> None:
        """A record of the run: at its next rung, note its metric there, and stop it with a checkpoint unless the
        rung's cut is taken now and keeps it."""
        from daskgan.lease import request_stop

        with self.changed:
            rung = self.halving.next_rung(point.name)
            if rung is None or self.metric not in record or record["kimg"] < rung:
                return
            logger.info("%s reached %g kimg: %s %.4g", point.run_url, rung, self.metric, record[self.metric])
            self._decided(self.halving.reach(point.name, float(record[self.metric])))
            if self.halving.verdict(point.name) != "go":
                self.paused.add(point.name)
                request_stop(client, point.run_url)

    def _decided(self, decision: dict[str, Any] | None) -> None:
        """Note a rung's cut in the manifest and wake the runs waiting for it (``changed`` held)."""
        if decision is None:
            return
        logger.info("rung %d (%g kimg): %s go on; %s stop", decision["rung"], decision["kimg"],
                    ", ".join(decision["kept"]), ", ".join(decision["stopped"]) or "none")
        self.manifest["rungs"].append(decision)
        self._write()
        self.changed.notify_all()

    def _write(self) -> None:
        write_manifest(self.sweep.url, self.manifest, self.sweep.base.output.storage_options)


def _wait_until_booked(client: Any, run_url: str, thread: threading.Thread) -> None:
    """Until the run's driver is in the cluster's book (queued or granted), or ended already."""
    from daskgan.cluster.reservations import listing

    while thread.is_alive():
        booked = listing(client)
        if run_url in {run["run_url"] for run in booked["queued"] + booked["granted"]}:
            return
        time.sleep(BOOKED_POLL_S)
