"""``daskgan compare``: real run directories, trained here on the loopback S3 bucket, ranked by their metric."""

import time
import uuid

import pandas as pd
import pytest

from daskgan import JobConfig, run_job
from daskgan.errors import UserError
from daskgan.run import storage
from daskgan.run.records import load
from daskgan.tools.cli import main
from daskgan.tools.compare import Run, compare, compare_figure, load_runs, ranked_table, write_compare_png

pytestmark = pytest.mark.slow

# name: (train settings, metrics settings); every run 4 iterations on the 2 session workers
RUNS = {"lr-slow": ({"lr_g": 1e-4}, {"every": 2, "images": 16, "kinds": ["fid"]}),
        "lr-fast": ({"lr_g": 1e-2}, {"every": 2, "images": 16, "kinds": ["fid"]}),
        "kid-ranked": ({}, {"every": 2, "images": 16, "kinds": ["fid", "kid"], "kid_subset_size": 8}),
        "unmeasured": ({}, {})}


def tiny_job(bucket: str, options: dict, name: str) -> JobConfig:
    train, metrics = RUNS[name]
    return JobConfig.from_dict({
        "name": name,
        "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4},
        "train": {"iterations": 4, **train}, "metrics": metrics,
        "output": {"run_url": f"{bucket}/sweep/{name}", "storage_options": options, "flush_every": 2, "grid_every": 4,
                   "checkpoint_every": 4, "best_metric": "kid" if name == "kid-ranked" else None},
    }, workers=2)


@pytest.fixture(scope="module")
def sweep(s3_server, dask_client):
    """A folder holding the four trained runs (and an object that is no run); returns (its URL, storage options,
    the clock's span around the training)."""
    import s3fs

    from daskgan.data import synthetic

    options = {"endpoint_url": s3_server.endpoint_url}
    bucket = f"s3://compare-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket[5:])
    synthetic.write_dataset(f"{bucket}/data", images=32, resolution=16, storage_options=options)
    sweep_url = f"{bucket}/sweep"
    started = time.time()
    for name in RUNS:
        run_job(dask_client, tiny_job(bucket, options, name))
    storage.write_bytes(f"{sweep_url}/notes.txt", b"not a run", options)
    return sweep_url, options, (started, time.time())


def test_runs_are_ranked_by_the_metric_their_records_hold(sweep):
    sweep_url, options, _ = sweep
    table = compare([sweep_url], options)

    fid = {name: load(f"{sweep_url}/{name}", options)["fid"].min() for name in ("lr-slow", "lr-fast")}
    assert table["run"].tolist() == ["kid-ranked", *sorted(fid, key=fid.get), "unmeasured"], \
        "grouped by metric in the sweep's (sorted) order: the run ranked by KID (output.best_metric), the FID runs " \
        "low to high, the run without metric values last"
    assert table["url"].tolist() == [f"{sweep_url}/{name}" for name in table["run"]]
    assert table["metric"].tolist()[:3] == ["kid", "fid", "fid"]
    assert table["best"].tolist()[1:3] == pytest.approx(sorted(fid.values()))
    assert table["best"].isna().tolist() == [False, False, False, True]
    assert (table["iteration"] == 4).all() and (table["iterations"] == 4).all() and (table["state"] == "finished").all()


def test_best_is_where_the_records_reached_it(sweep):
    sweep_url, options, _ = sweep
    table = compare([sweep_url], options).set_index("run")
    for name, column in (("lr-slow", "fid"), ("kid-ranked", "kid")):
        records = load(f"{sweep_url}/{name}", options)
        reached = records.loc[records[column].idxmin()]
        assert table.loc[name, "best"] == pytest.approx(reached[column]), name
        assert table.loc[name, ["best_iteration", "best_kimg"]].tolist() == [reached["iteration"], reached["kimg"]]
        last = records.iloc[-1]
        assert table.loc[name, ["kimg", "loss_G", "loss_D_real", "loss_D_fake"]].tolist() == pytest.approx(
            last[["kimg", "loss_G", "loss_D_real", "loss_D_fake"]].tolist())


def test_time_and_gpu_hours_come_from_the_records_timestamps_and_world_size(sweep):
    sweep_url, options, (started, ended) = sweep
    records = load(f"{sweep_url}/lr-fast", options)
    assert records["time"].is_monotonic_increasing, "each record says when rank 0 wrote it"
    assert started <= records["time"].iloc[0] and records["time"].iloc[-1] <= ended
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(f"{sweep_url}/lr-fast/tb")
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "loss/G" in scalars and not any(tag.endswith("/time") for tag in scalars), "TensorBoard keeps its own times"
    run = compare([f"{sweep_url}/lr-fast"], options).iloc[0]
    assert run["wall_s"] == pytest.approx(records["time"].iloc[-1] - records["time"].iloc[0])
    assert run["wall_s"] > 0 and run["gpu_hours"] == pytest.approx(2 * run["wall_s"] / 3600), "2 workers all along"


def test_run_urls_and_sweep_folders_mix(sweep):
    sweep_url, options, _ = sweep
    table = compare([f"{sweep_url}/unmeasured", f"{sweep_url}/lr-slow"], options)
    assert table["run"].tolist() == ["lr-slow", "unmeasured"]


def test_a_url_that_holds_no_run_is_one_line_naming_it(sweep):
    sweep_url, options, _ = sweep
    for url in (f"{sweep_url}/notes.txt", f"{sweep_url}/lr-slow/grids", f"{sweep_url}-missing"):
        with pytest.raises(UserError) as refused:
            compare([f"{sweep_url}/lr-slow", url], options)
        assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{url} is ")


def test_compare_png_has_a_line_per_run_in_each_panel_by_kimg(sweep, tmp_path):
    from PIL import Image

    sweep_url, options, _ = sweep
    runs = load_runs([sweep_url], options)
    figure = compare_figure(runs)
    panels = {axis.get_title(loc="left"): axis for axis in figure.axes}
    assert list(panels) == ["kid", "fid", "loss_G", "loss_D (real + fake)"], "the runs' metrics, then the losses"
    drawn = {title: [line.get_label() for line in axis.get_lines()] for title, axis in panels.items()}
    assert drawn == {"kid": ["kid-ranked"], "fid": ["kid-ranked", "lr-fast", "lr-slow"],
                     "loss_G": [run.name for run in runs], "loss_D (real + fake)": [run.name for run in runs]}
    for run, line in zip(runs, panels["loss_G"].get_lines()):
        assert line.get_xdata().tolist() == run.records["kimg"].tolist(), "x in kimg"
        assert line.get_ydata().tolist() == pytest.approx(run.records["loss_G"].tolist())
    fid = panels["fid"].get_lines()[1]
    assert fid.get_ydata().tolist() == pytest.approx(runs[1].records["fid"].dropna().tolist())
    colours = {title: {line.get_label(): line.get_color() for line in axis.get_lines()}
               for title, axis in panels.items()}
    assert colours["fid"]["kid-ranked"] == colours["kid"]["kid-ranked"] == colours["loss_G"]["kid-ranked"], \
        "a run keeps its colour in every panel"

    url = write_compare_png(runs, str(tmp_path / "out"), options)
    assert url == str(tmp_path / "out" / "compare.png") and Image.open(url).format == "PNG"


def test_the_command_prints_the_ranked_table_and_where_compare_png_is(sweep, tmp_path, monkeypatch, capsys):
    from PIL import Image

    sweep_url, options, _ = sweep
    monkeypatch.chdir(tmp_path)
    assert main(["compare", sweep_url, "--endpoint-url", options["endpoint_url"]]) == 0
    out = capsys.readouterr().out.splitlines()
    ranked = compare([sweep_url], options)
    header, *rows, said = out
    assert header.split()[:4] == ["#", "run", "metric", "best"] and len(rows) == 4
    assert [row.split()[:3] for row in rows] == [[str(rank), run, metric] for rank, run, metric in zip(
        range(1, 5), ranked["run"], ranked["metric"])], "ranked as compare() ranks them"
    assert rows[-1].split()[3] == "-" and "4 of 4" in rows[0] and rows[0].split()[-1] == "finished"
    assert said == f"daskgan: 4 runs compared; curves in {tmp_path / 'compare.png'}", "the current folder by default"
    assert Image.open(tmp_path / "compare.png").format == "PNG"

    assert main(["compare", f"{sweep_url}/lr-slow", "--out", str(tmp_path / "one"),
                 "--endpoint-url", options["endpoint_url"]]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"curves in {tmp_path / 'one' / 'compare.png'}")


def test_the_command_refuses_a_url_without_runs_in_one_line(sweep, tmp_path, capsys):
    sweep_url, options, _ = sweep
    assert main(["compare", f"{sweep_url}/lr-slow/grids", "--out", str(tmp_path),
                 "--endpoint-url", options["endpoint_url"]]) == 2
    error = capsys.readouterr().err
    assert error == f"daskgan: {sweep_url}/lr-slow/grids is neither a daskgan run directory (no config.yaml) nor a " \
                    "folder holding any\n"
    assert not (tmp_path / "compare.png").exists()


def test_a_higher_inception_score_ranks_first_as_it_keeps_a_checkpoint():
    """IS needs Inception's file, which the session's workers cannot fetch: these records are written here."""
    def run(name: str, scores: list[float]) -> Run:
        records = pd.DataFrame({"iteration": [2, 4], "kimg": [0.016, 0.032], "is": scores})
        return Run(name, f"memory://{name}", "is", records, {"iterations": 4, "iteration": 4, "state": "finished"})

    table = ranked_table([run("low", [1.5, 1.2]), run("high", [2.5, 3.0]), run("middle", [2.0, 1.0])])
    assert table["run"].tolist() == ["high", "middle", "low"]
    assert table[["best", "best_iteration"]].values.tolist() == [[3.0, 4], [2.0, 2], [1.5, 2]]
