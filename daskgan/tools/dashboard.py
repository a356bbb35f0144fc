"""``daskgan dashboard``: a read-only web page of a cluster's runs, served from the user's machine.

The page (``dashboard_page.PAGE``, one document: no script or style from elsewhere) polls three endpoints:

- ``api/runs``: ``cluster_runs`` as the page shows it (queued, running with what its driver published, recently
  ended), each run that trained with the iteration of its newest sample grid. Only the fields listed in ``SHOWN``
  leave the server: a lease's token does not.
- ``api/curves?run=URL``: the run's loss and metric curves (``[kimg, value]`` pairs) from its records.
- ``grid?run=URL&iteration=N``: that sample grid, as PNG.

A run directory is read through the storage layer with the command's storage options, which never reach the page;
only the runs the cluster lists are read, so the page cannot be used to read other objects.

Why not a route on the scheduler's own dashboard (``distributed.scheduler.http.routes``): that list replaces
distributed's own routes when set, so a user would repeat them; the scheduler would need daskgan installed and the
storage credentials, and would read run directories on its event loop; and its dashboard listens on every
interface by default. Served from here, it needs nothing on the cluster but the scheduler's address.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from daskgan.cluster.status import cluster_runs
from daskgan.config.schema import METRICS
from daskgan.errors import NotFound, first_line
from daskgan.run import layout, storage
from daskgan.run.records import load
from daskgan.run.storage import StorageOptions
from daskgan.tools.dashboard_page import PAGE

logger = logging.getLogger(__name__)

SHOWN = {"queued": ("run_url", "position", "asked", "priority", "since"),
         "running": ("run_url", "driver", "live", "iteration", "iterations", "workers", "progress"),
         "ended": ("run_url", "outcome", "ended_at", "iteration", "iterations")}
REFRESH_S = 2.0  # between two questions to the cluster, once it answered the last
FIRST_ANSWER_S = 60.0  # a page asking before then waits for the cluster's first answer
CURVE_POINTS = 500  # at most this many points a curve: every n-th record of a long run, and its newest


def page_data(client: Any, storage_options: StorageOptions | None = None) -> dict[str, list[dict[str, Any]]]:
    """The cluster's runs as the page shows them: ``cluster_runs``' queued, running and ended runs, each with the
    fields of ``SHOWN`` and, for those that trained, ``grid``: the iteration of its newest sample grid (None yet, or
    when its directory cannot be read with these storage options: ``grid_error`` says why, and the other runs are
    shown all the same)."""
    runs = cluster_runs(client)
    shown = {kind: [{name: run.get(name) for name in SHOWN[kind]} for run in runs[kind]] for kind in SHOWN}
    for run in shown["running"] + shown["ended"]:
        try:
            run["grid"] = newest_grid(run["run_url"], storage_options)
        except Exception as error:  # another team's bucket, a run directory deleted: that run alone goes without
            run["grid"], run["grid_error"] = None, first_line(error)
    return shown


def newest_grid(run_url: str, storage_options: StorageOptions | None = None) -> int | None:
    """The iteration of the run's newest sample grid (``grids/<iteration>.png``, not the reals); None if none."""
    names = storage.list_names(layout.grids_url(run_url), storage_options)
    iterations = [int(name[:-4]) for name in names if name.endswith(".png") and name[:-4].isdigit()]
    return max(iterations, default=None)


def curves(run_url: str, storage_options: StorageOptions | None = None) -> dict[str, list[list[float]]]:
    """The run's curves against kimg, each a list of ``[kimg, value]``: ``loss_G`` and ``loss_D`` (real + fake),
    thinned to ``CURVE_POINTS`` for a long run (its newest record always kept), and each metric at every record
    that measured it (few: thinning would drop them)."""
    records = load(run_url, storage_options)
    if not len(records):
        return {}
    records = records.assign(loss_D=records["loss_D_real"] + records["loss_D_fake"])
    step = math.ceil(len(records) / CURVE_POINTS)
    thinned = records.iloc[sorted({*range(0, len(records), step), len(records) - 1})]
    shown = {name: _points(thinned, name) for name in ("loss_G", "loss_D")}
    return {**shown, **{name: _points(records, name) for name in METRICS if name in records.columns}}


def _points(records, name: str) -> list[list[float]]:
    """``[kimg, value]`` of the records that hold a value of ``name``."""
    measured = records[["kimg", name]].dropna()
    return [[float(kimg), float(value)] for kimg, value in zip(measured["kimg"], measured[name])]


class Dashboard(ThreadingHTTPServer):
    """The page and its endpoints for the cluster of ``client``, on ``host``:``port`` (0: a free one); ``url``
    is where a browser finds it. ``serve_forever`` to serve; ``shutdown`` (from another thread) and
    ``server_close`` to stop.

    A thread of its own asks the cluster every ``REFRESH_S`` (``page_data``: telling a live driver from a stale one
    takes watching its heartbeat for two beats, up to 20 s), so that ``api/runs`` answers at once with the newest
    answer; the grid and curves endpoints read only the runs that answer lists."""

    daemon_threads = True

    def __init__(self, client: Any, storage_options: StorageOptions | None, host: str, port: int):
        self._closed = threading.Event()  # before binding: a port refused closes the server at once
        super().__init__((host, port), _Handler)
        self.client, self.storage_options = client, storage_options
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/"
        if not _is_loopback(host):
            logger.warning("the dashboard listens on %s: anyone who reaches it sees the cluster's runs", host)
        self._newest: dict[str, Any] | None = None
        self._answered = threading.Condition()
        threading.Thread(target=self._keep_asking, daemon=True, name="daskgan-dashboard").start()

    def runs(self) -> dict[str, Any]:
        """The newest ``page_data``, with ``updated_at`` (epoch seconds), once the cluster first answered."""
        with self._answered:
            if not self._answered.wait_for(lambda: self._newest is not None, FIRST_ANSWER_S):
                raise TimeoutError(f"the cluster has not answered in {FIRST_ANSWER_S:.0f} s (see the log)")
            return self._newest

    def listed_run(self, run_url: str | None) -> str:
        """``run_url`` if the newest answer lists it; ``NotFound`` otherwise."""
        if run_url not in {run["run_url"] for kind in SHOWN for run in self.runs()[kind]}:
            raise NotFound(f"{run_url} is not a run on this cluster")
        return run_url

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def _keep_asking(self) -> None:
        while not self._closed.is_set():
            try:
                newest = {**page_data(self.client, self.storage_options), "updated_at": time.time()}
            except Exception as error:  # the scheduler or storage out of reach for a while: the page shows the last
                if not self._closed.is_set():  # (a client closed under a server closing is no news)
                    logger.warning("dashboard: the cluster's runs not updated: %s", first_line(error))
            else:
                with self._answered:
                    self._newest = newest
                    self._answered.notify_all()
            self._closed.wait(REFRESH_S)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    """GET only: the page, ``api/runs``, ``api/curves`` and ``grid``; anything else, or a run or grid that is not
    there, is a 404."""

    server: Dashboard

    def do_GET(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        route = {"/": self._page, "/api/runs": self._runs, "/api/curves": self._curves, "/grid": self._grid}
        try:
            if parsed.path not in route:
                raise NotFound(f"{parsed.path}: no such page")
            route[parsed.path](query)
        except NotFound as error:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", first_line(error).encode())
        except Exception as error:  # storage or the scheduler out of reach: the page says so and polls again
            logger.warning("dashboard: %s: %s", parsed.path, first_line(error))
            self._send(HTTPStatus.BAD_GATEWAY, "text/plain; charset=utf-8", first_line(error).encode())

    def _page(self, query: dict[str, str]) -> None:
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())

    def _runs(self, query: dict[str, str]) -> None:
        self._json(self.server.runs())

    def _curves(self, query: dict[str, str]) -> None:
        self._json(curves(self.server.listed_run(query.get("run")), self.server.storage_options))

    def _grid(self, query: dict[str, str]) -> None:
        run_url, iteration = self.server.listed_run(query.get("run")), query.get("iteration", "")
        if not iteration.isdigit():
            raise NotFound(f"grid {iteration!r}: an iteration is a whole number")
        url = layout.grid_url(run_url, int(iteration))
        self._send(HTTPStatus.OK, "image/png", storage.read_bytes(url, self.server.storage_options))

    def _json(self, data: Any) -> None:
        self._send(HTTPStatus.OK, "application/json", json.dumps(data).encode())

    def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # http.server writes each request to stderr
        logger.debug("dashboard: " + format, *args)
