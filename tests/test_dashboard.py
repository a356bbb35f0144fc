"""``daskgan dashboard`` (issue #27 item 5): the page's JSON endpoints, in plain Python, on the session's cluster
with drivers holding leases and reservations (two granted a worker, a third queued) over run directories in
memory; then the page in headless Chromium (Debian's chromium and chromium-driver, driven by selenium: `make test`
installs them) on a scheduler and two workers as processes, two runs training and a third queued."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import test_shared_cluster
import yaml
from PIL import Image
from test_driver_lease import daskgan_process, wait_for
from test_reservations import drivers

from daskgan.cluster.status import cluster_runs
from daskgan.lease import DriverLease
from daskgan.run import layout, storage
from daskgan.run.images import png_bytes
from daskgan.tools.cli import main
from daskgan.tools.dashboard import CURVE_POINTS, Dashboard, curves, newest_grid

shared = test_shared_cluster.shared  # the fixture: a scheduler and 2 workers as processes, runs of --workers 1
SECRET = "not-for-the-page"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; given, so nothing is downloaded
UNREADABLE = f"s3://dash-unreadable-{uuid.uuid4().hex[:6]}/run"  # the page's storage options hold no key for it
GRID_EVERY = 50  # iterations between run a's grids


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
        unreadable = DriverLease(dask_client, UNREADABLE, 30.0)  # ended; its bucket refuses the page's options
        unreadable.acquire()
        unreadable.release("finished")
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
    [ended] = [run for run in listed["ended"] if run["run_url"] == UNREADABLE]
    assert ended["grid"] is None and "credentials" in ended["grid_error"], "a run that cannot be read: said, alone"
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


def test_a_long_runs_loss_curves_are_thinned_keeping_its_newest_record_and_every_metric():
    run_url = "memory://dash-thinned/run"
    _write_run(run_url, 2 * CURVE_POINTS + 7)  # every third record kept: not the 20th, which holds the FID
    shown = curves(run_url)
    assert len(shown["loss_G"]) <= CURVE_POINTS + 1 and shown["loss_G"][0][0] == 1 / 250
    assert shown["loss_G"][-1] == [(2 * CURVE_POINTS + 7) / 250, 1.0 + (2 * CURVE_POINTS + 7) / 100]
    assert shown["fid"] == [[20 / 250, 50.0]], "a metric's few points are never thinned away"


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


@pytest.fixture
def chromium():
    """Headless Chromium under selenium, through Debian's chromedriver (named: selenium's own manager, which would
    download a driver, never runs). Imported here: the endpoint tests above need no browser."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest.fixture
def page_url(shared):
    """The URL `daskgan dashboard --port 0` prints once it serves the cluster of ``shared``."""
    _, _, options, spec, _ = shared
    server = daskgan_process("dashboard", "--cluster", str(spec), "--port", "0", "--endpoint-url",
                             options["endpoint_url"])
    try:
        line = next(line for line in server.stdout if "the cluster's runs at" in line)
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        server.kill()
        server.communicate()


GRID_SHOWN = """const image = document.querySelector(`img.grid[data-run="${arguments[0]}"]`);
return image && image.complete && image.naturalWidth > 0 ? [image.getAttribute("src"), image.naturalWidth] : null;"""


def _shown_grid(browser, run_url: str) -> tuple[str, int, int] | None:
    """(run, iteration, natural width) of the grid image the page shows for ``run_url``, once loaded."""
    shown = browser.execute_script(GRID_SHOWN, run_url)
    if shown is None:
        return None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown[0]).query)
    return query["run"][0], int(query["iteration"][0]), shown[1]


def _table(browser, table: str) -> str:
    return browser.execute_script(f"return document.querySelector('#{table} tbody').innerText")


@pytest.mark.slow
def test_the_page_in_headless_chromium_lists_queued_and_running_runs_and_shows_the_newest_grid(
        shared, page_url, chromium, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    start, url, options, _, client = shared
    a, b = start("a", 100_000, f"output.grid_every={GRID_EVERY}"), start("b", 100_000)
    try:
        wait_for(lambda: len(cluster_runs(client)["running"]) == 2, 120, "both runs granted a worker")
        c = start("c", 100)
        wait_for(lambda: cluster_runs(client)["queued"], 60, "the third run queued")
        wait_for(lambda: newest_grid(url("a"), options), 120, "a grid of run a")
        assert page_url.startswith("http://127.0.0.1:"), "loopback unless told otherwise"
        newest_before = newest_grid(url("a"), options)
        chromium.get(page_url)
        WebDriverWait(chromium, 60).until(lambda browser: url("c") in _table(browser, "queued")
                                          and {url("a"), url("b")} <= set(_table(browser, "running").split()))
        queued = _table(chromium, "queued")
        assert queued.split("\t")[:3] == ["1", url("c"), "1"], f"position 1, 1 worker asked: {queued!r}"

        def newest_shown(browser):  # the page catches up with a's newest grid within its refreshes (a unpaced
            shown = _shown_grid(browser, url("a"))  # on a quiet machine writes one every second: by then newer)
            return shown if shown and shown[0] == url("a") and shown[1] >= newest_before else None

        run, iteration, width = WebDriverWait(chromium, 60).until(newest_shown)
        assert iteration >= GRID_EVERY and iteration % GRID_EVERY == 0 and width > 0
        screenshot = tmp_path / "dashboard.png"
        chromium.save_screenshot(str(screenshot))
        print(f"dashboard screenshot: {screenshot}")
    finally:
        for driver in (a, b, c):
            driver.kill()
            driver.communicate()
