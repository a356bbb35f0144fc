"""``daskgan dashboard`` (issue #27 item 5): the page's JSON endpoints, in plain Python, on the session's cluster
with drivers holding leases and reservations (two granted a worker, a third queued) over run directories in
memory."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from PIL import Image
from test_reservations import drivers

from daskgan.run import layout, storage
from daskgan.run.images import png_bytes
from daskgan.tools.cli import main
from daskgan.tools.dashboard import Dashboard

SECRET = "not-for-the-page"


def _write_run(run_url: str, iterations: int) -> bytes:
    """A run directory's config, records (FID at iteration 20) and grids at 0 and 20 (and the reals); returns the
    newest grid's PNG."""
    storage.write_bytes(layout.config_url(run_url), b"train: {iterations: 100}\n")
    records = [{"iteration": i, "kimg": i / 250, "loss_G": 1.0 + i / 100, "loss_D_real": 0.5, "loss_D_fake": 0.25,
                "ada_p": 0.1, **({"fid": 50.0} if i == 20 else {})} for i in range(1, iterations + 1)]
    storage.write_bytes(layout.record_part_url(run_url, 1, iterations),
                        "".join(json.dumps(record) + "\n" for record in records).encode())
    newest = png_bytes(Image.new("RGB", (8, 8), "gray"))
    storage.write_bytes(layout.grid_url(run_url, 0), png_bytes(Image.new("RGB", (8, 8), "black")))
    storage.write_bytes(layout.grid_url(run_url, 0, "reals"), png_bytes(Image.new("RGB", (8, 8), "white")))
    storage.write_bytes(layout.grid_url(run_url, 20), newest)
    return newest


@pytest.fixture(scope="module")
def dashboard(dask_client):
    """(the dashboard's URL, [run URLs: two granted, the third queued], the newest grid's PNG of the first)."""
    with drivers(dask_client, [1, 1, 1]) as (leases, reservations):
        answers = [reservation.ask() for reservation in reservations]
        assert [answer["state"] for answer in answers] == ["granted", "granted", "queued"]
        newest = _write_run(leases[0].run_url, 30)
        leases[0].progress = lambda: {"kimg": 0.12, "loss_G": 1.3, "ada_p": 0.1, "eta_s": 60.0,
                                      "metrics": {"fid": {"value": 50.0, "iteration": 20}}}
        server = Dashboard(dask_client, {"secret": SECRET}, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.url, [reservation.run_url for reservation in reservations], newest
        finally:
            server.shutdown()
            server.server_close()


def _get(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return answer.read(), answer.headers["Content-Type"]


def test_the_runs_endpoint_lists_queued_and_running_runs_with_their_newest_grid_and_no_secrets(dashboard):
    url, runs, _ = dashboard
    body, kind = _get(url + "api/runs")
    assert kind.startswith("application/json")
    listed = json.loads(body)
    assert [(run["run_url"], run["position"], run["asked"]) for run in listed["queued"]] == [(runs[2], 1, 1)]
    running = {run["run_url"]: run for run in listed["running"]}
    assert set(running) >= {runs[0], runs[1]} and len(running[runs[0]]["workers"]) == 1
    first = running[runs[0]]
    assert first["grid"] == 20, "the newest sample grid (not the reals)"
    assert first["progress"]["metrics"] == {"fid": {"value": 50.0, "iteration": 20}} and first["live"]
    assert running[runs[1]]["grid"] is None, "a run without grids yet"
    assert SECRET not in body.decode() and "token" not in body.decode(), "no storage options, no lease tokens"


def test_the_grid_and_curves_endpoints_serve_a_listed_run_and_nothing_else(dashboard):
    url, runs, newest = dashboard
    query = urllib.parse.urlencode({"run": runs[0], "iteration": 20})
    assert _get(f"{url}grid?{query}") == (newest, "image/png")
    curves = json.loads(_get(f"{url}api/curves?{urllib.parse.urlencode({'run': runs[0]})}")[0])
    assert curves["loss_G"][0] == [0.004, 1.01] and len(curves["loss_G"]) == 30
    assert curves["loss_D"][-1] == [0.12, 0.75], "D's loss: real + fake"
    assert curves["fid"] == [[0.08, 50.0]], "a metric only where it was measured"
    for refused in (urllib.parse.urlencode({"run": "memory://elsewhere", "iteration": 20}),
                    urllib.parse.urlencode({"run": runs[0], "iteration": "../config"})):
        with pytest.raises(urllib.error.HTTPError) as answer:
            _get(f"{url}grid?{refused}")
        assert answer.value.code == 404


def test_the_page_is_one_self_contained_document(dashboard):
    url, _, _ = dashboard
    page, kind = _get(url)
    assert kind.startswith("text/html") and b"api/runs" in page
    assert not re.search(rb"<link|<script src|(src|href|url)\(?=?[\"']?(https?:)?//", page), "nothing from elsewhere"


def test_a_port_already_taken_is_one_line(dask_client, tmp_path, capsys):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": dask_client.scheduler.address}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--cluster", str(spec), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"daskgan: --host 127.0.0.1 --port {port}: cannot serve there (Address already "
                                       "in use)\n")
