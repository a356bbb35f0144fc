"""Sweeps on a shared cluster (issue #27 item 3, its must-show): a scheduler and two workers as processes of their
own; a 2x2 `daskgan sweep` of runs on one worker each completes with every iteration recorded once, `daskgan
compare` ranks the runs and draws compare.png; with successive halving the runs stopped at the rung free their
workers for the queued ones and the manifest records the cut."""

from __future__ import annotations

import threading

import pytest
import yaml
from distributed import Client
from test_driver_lease import daskgan_process, ended, wait_for

from daskgan.cluster.sweep import read_manifest
from daskgan.run import layout, storage
from daskgan.run.records import load, topic
from daskgan.tools.cli import main
from daskgan.tools.compare import compare

pytestmark = pytest.mark.slow

ITERATIONS = 30  # batch 4 on one worker: 0.004 kimg an iteration, 0.12 kimg a run
RUNG_KIMG = 0.06  # iteration 15, where FID is evaluated (every 5 iterations)
ITERATION_S = 0.3  # the halving test's pace: its runs' last 15 iterations outlast a stop request's way to the ranks
GRID = ("train.lr_g=1e-4,1e-3", "train.seed=1,2")
NAMES = ["lr_g-0.0001_seed-1", "lr_g-0.0001_seed-2", "lr_g-0.001_seed-1", "lr_g-0.001_seed-2"]


@pytest.fixture
def sweep_on_cluster(request, own_cluster, shapes_in_bucket, tmp_path):
    """(sweep(*options) -> Popen of `daskgan sweep` of the 2x2 grid on a 2-worker cluster, the sweep's URL,
    storage options, a client of the cluster). Parametrized indirectly with seconds, the workers take at least that
    long per iteration."""
    bucket, options = shapes_in_bucket(16)
    if getattr(request, "param", None):
        own_cluster.pace_iterations(request.param)
    address, _ = own_cluster.start(workers=2)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": address}}))
    job = {"name": "tiny", "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16,
                                    "batch_size": 4},
           "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": ITERATIONS},
           "metrics": {"every": 5, "images": 16, "kinds": ["fid"]},
           "output": {"run_url": f"{bucket}/sweep", "storage_options": options, "flush_every": 5,
                      "checkpoint_every": 10_000, "grid_every": 10_000}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))

    def sweep(*more: str):
        return daskgan_process("sweep", str(path), *GRID, "--workers-per-run", "1", "--cluster", str(spec), *more)

    with Client(address, timeout=60) as client:
        yield sweep, f"{bucket}/sweep", options, client


def test_a_sweep_runs_every_point_and_compare_ranks_them(sweep_on_cluster, tmp_path, capsys):
    sweep, sweep_url, options, _ = sweep_on_cluster
    out, err = ended(sweep(), 240)
    assert "daskgan: swept 4 runs" in out and all(f"  {name}: finished" in out for name in NAMES), out + err
    manifest = read_manifest(sweep_url, options)
    assert [point["run_url"] for point in manifest["points"]] == [f"{sweep_url}/{name}" for name in NAMES]
    assert manifest["points"][2]["settings"] == {"train.lr_g": 1e-3, "train.seed": 1}
    for name in NAMES:
        run_url = f"{sweep_url}/{name}"
        assert load(run_url, options)["iteration"].tolist() == list(range(1, ITERATIONS + 1)), name
        assert storage.list_names(layout.tensorboard_url(run_url), options), f"{name}: TensorBoard events under it"

    table = compare(sweep_url, options)
    assert sorted(table["run"]) == NAMES and table["best"].is_monotonic_increasing, "best (lowest) FID first"
    assert main(["compare", sweep_url, "--out", str(tmp_path), "--endpoint-url", options["endpoint_url"]]) == 0
    out = capsys.readouterr().out
    assert "4 runs compared" in out, out
    assert out.index(table["run"][0]) < out.index(table["run"][3]), "the table ranks them"
    assert (tmp_path / "compare.png").stat().st_size > 0


class Arrivals:
    """The runs' records in the order the test's client received them: (run name, iteration)."""

    def __init__(self, client: Client, sweep_url: str):
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        for name in NAMES:
            client.subscribe_topic(topic(f"{sweep_url}/{name}"),
                                   lambda event, name=name: self._add(name, event[1]["iteration"]))

    def _add(self, name: str, iteration: int) -> None:
        with self._lock:
            self.seen.append((name, iteration))

    def before(self, name: str, other: str) -> list[int]:
        """The iterations of ``name`` received before the first record of ``other``."""
        with self._lock:
            first = next(i for i, (run, _) in enumerate(self.seen) if run == other)
            return [iteration for run, iteration in self.seen[:first] if run == name]


@pytest.mark.parametrize("sweep_on_cluster", [ITERATION_S], indirect=True)
def test_halving_stops_the_worse_half_at_the_rung_and_frees_workers_for_the_queued_runs(sweep_on_cluster):
    sweep, sweep_url, options, client = sweep_on_cluster
    arrivals = Arrivals(client, sweep_url)
    started = sweep("--halving-kimg", str(RUNG_KIMG), "--detach")
    out, err = ended(started, 120)
    assert started.returncode == 0 and "4 runs of" in out, err
    manifest = wait_for(lambda: len((m := read_manifest(sweep_url, options))["outcomes"]) == 4 and m, 180,
                        "every run of the sweep ended")

    [rung] = manifest["rungs"]
    assert rung["kimg"] == RUNG_KIMG and set(rung["values"]) == set(NAMES)
    ranked = sorted(NAMES, key=lambda name: rung["values"][name])
    assert rung["kept"] == ranked[:2] and rung["stopped"] == {name: rung["values"][name] for name in ranked[2:]}
    for name in NAMES:
        records = load(f"{sweep_url}/{name}", options)
        measured = records.dropna(subset=["fid"])
        at_rung = measured[measured["kimg"] >= RUNG_KIMG].iloc[0]
        assert at_rung["fid"] == rung["values"][name], f"{name}: its value at the rung is its first FID past it"
        last = records["iteration"].iloc[-1]
        assert records["iteration"].tolist() == list(range(1, last + 1)), f"{name}: each iteration once"
        if name in rung["kept"]:
            assert last == ITERATIONS and manifest["outcomes"][name] == "finished", name
        else:
            assert last < ITERATIONS and manifest["outcomes"][name] == f"stopped at rung 1 ({RUNG_KIMG:g} kimg)"

    first, second, queued = NAMES[0], NAMES[1], NAMES[2:]
    for name in queued:  # two workers: a queued run starts once one of the first two stopped at the rung
        assert arrivals.before(first, name) and arrivals.before(second, name)
        stopped_then = [max(arrivals.before(run, name)) for run in (first, second)]
        assert min(stopped_then) < ITERATIONS and min(stopped_then) * 0.004 >= RUNG_KIMG, \
            f"{name} started once a run had stopped past the rung, unfinished: {stopped_then}"
