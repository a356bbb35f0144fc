"""End-to-end: 2 gloo ranks on a LocalCluster, data and run directory in the loopback S3 bucket."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from daskgan import dispatch, train_gan
from daskgan.cluster.monitor import RunMonitor
from daskgan.cluster.status import format_status, run_status
from daskgan.config import ConfigError, JobConfig
from daskgan.run import checkpoint, storage
from daskgan.run.checkpoint import CheckpointMismatch
from daskgan.run.records import load

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


@pytest.fixture
def dataset(shapes_in_bucket):
    return shapes_in_bucket(images=48)


def job(bucket_url, options, run="run", **train):
    return JobConfig.from_dict({
        "name": "e2e",
        "data": {"url": f"{bucket_url}/data", "storage_options": options, "resolution": 16, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4},
        "train": {"iterations": 6, **train},
        "output": {"run_url": f"{bucket_url}/{run}", "storage_options": options, "flush_every": 2,
                   "grid_every": 3, "grid_images": 9, "checkpoint_every": 3, "keep_checkpoints": 5},
    })


def run_job(client, config):
    monitor = RunMonitor(client, config.output.run_url)
    try:
        futures = dispatch.run(client, train_gan, config, timeout=120)
        live = list(monitor.records(futures))
    finally:
        monitor.close()
    return dispatch.results(futures)[0], live


def final_weights(config):
    state = checkpoint.load(checkpoint.latest(config.output.run_url, config.output.storage_options),
                            config.output.storage_options)
    return [state[k] for k in ("G", "D", "G_ema") if k in state]


def test_run_writes_records_grids_tensorboard_and_checkpoints(dask_client, dataset, tmp_path):
    url, options = dataset
    config = job(url, options)
    summary, live = run_job(dask_client, config)

    assert [r["iteration"] for r in live] == list(range(1, 7)), "every record reaches the client, in order"
    table = load(config.output.run_url, options)
    assert table["iteration"].tolist() == list(range(1, 7))
    for column in ("epoch", "kimg", "loss_G", "loss_D_real", "loss_D_fake", "D_x", "D_G_z", "images_per_s",
                   "world_size"):
        assert table[column].notna().all(), column
    timed = table.set_index("iteration")["checkpoint_s"].dropna()
    assert timed.index.tolist() == [4] and timed.iloc[0] > 0, "the record after a checkpoint says how long it took"
    assert table["kimg"].iloc[-1] == pytest.approx(6 * 4 * 2 / 1000)
    assert summary["records"] == 6 and summary["skipped_images"] == 0

    parquet = storage.read_bytes(f"{config.output.run_url}/records.parquet", options)
    import pandas as pd
    assert pd.read_parquet(io.BytesIO(parquet))["loss_G"].tolist() == table["loss_G"].tolist()

    for iteration in (3, 6):
        png = storage.read_bytes(f"{config.output.run_url}/grids/{iteration:09d}.png", options)
        assert Image.open(io.BytesIO(png)).size == (3 * 18 + 2, 3 * 18 + 2)

    assert [i for i, _ in checkpoint.list_checkpoints(config.output.run_url, options)] == [3, 6]
    state = checkpoint.load(checkpoint.latest(config.output.run_url, options), options)
    assert state["iteration"] == 6 and len(state["ranks"]) == 2
    assert all(r["cuda_rng"] is None and r["torch_rng"].dtype == torch.uint8 for r in state["ranks"]), "CPU ranks"
    assert storage.exists(f"{config.output.run_url}/dataset-manifest.json.gz", options)

    saved_config = yaml.safe_load(storage.read_bytes(f"{config.output.run_url}/config.yaml", options))
    assert saved_config["train"]["iterations"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(f"{config.output.run_url}/tb", size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/G")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("loss/G")] == pytest.approx(table["loss_G"].tolist(), rel=1e-5)
    assert [e.step for e in events.Images("samples/fixed_z")] == [3, 6]
    kimg = events.Scalars("progress/kimg")  # TensorBoard has kimg by iteration, as the records
    assert [e.step for e in kimg] == list(range(1, 7))
    assert [e.value for e in kimg] == pytest.approx(table["kimg"].tolist())


def test_resume_continues_and_matches_an_uninterrupted_run(dask_client, dataset):
    url, options = dataset
    regularised = {"r1_gamma": 1.0, "r1_interval": 2, "ema_kimg": 0.05}  # R1 and G EMA must resume exactly too
    straight = job(url, options, run="straight", **regularised)
    run_job(dask_client, straight)

    interrupted = job(url, options, run="resumed", iterations=3, **regularised)
    run_job(dask_client, interrupted)
    resumed = job(url, options, run="resumed", **regularised)
    summary, live = run_job(dask_client, resumed)

    assert summary["resumed_from"].endswith("000000003.pt")
    assert [r["iteration"] for r in live] == [4, 5, 6], "the iteration counter continues"
    records = load(resumed.output.run_url, options)
    assert records["iteration"].tolist() == list(range(1, 7)), "no duplicate or missing records"
    assert records["loss_G"].tolist() == load(straight.output.run_url, options)["loss_G"].tolist()
    assert records["r1_penalty"].notna().tolist() == [i % 2 == 0 for i in range(1, 7)], "R1 on every 2nd step"
    assert len(final_weights(straight)) == len(final_weights(resumed)) == 3
    for a, b in zip(final_weights(straight), final_weights(resumed)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_resume_from_an_earlier_checkpoint_drops_later_records(dask_client, dataset):
    url, options = dataset
    first = job(url, options, run="rewind")
    run_job(dask_client, first)
    earlier = checkpoint.list_checkpoints(first.output.run_url, options)[0][1]  # iteration 3
    rewind = job(url, options, run="rewind", iterations=5)
    rewind.output.resume = earlier
    summary, live = run_job(dask_client, rewind)
    assert [r["iteration"] for r in live] == [4, 5]
    assert load(first.output.run_url, options)["iteration"].tolist() == [1, 2, 3, 4, 5]


def test_checkpoint_for_another_model_is_refused(dask_client, dataset):
    url, options = dataset
    run_job(dask_client, job(url, options, run="other", iterations=3))
    wider = job(url, options, run="other")
    wider.model.g_channels = 8
    with pytest.raises(CheckpointMismatch, match="g_channels: checkpoint has 4, job has 8"):
        run_job(dask_client, wider)
    failed = run_status(wider.output.run_url, options)
    assert (failed["state"], failed["iteration"]) == ("failed", 3), "the run directory says why it ended"
    assert "g_channels: checkpoint has 4, job has 8" in failed["error"]
    assert "error: " in format_status(failed)
    run_job(dask_client, job(url, options, run="other"))  # the same job as before resumes: the failure is past
    assert run_status(wider.output.run_url, options)["state"] == "finished"


def test_dataset_without_images_fails_clearly_on_the_client(dask_client, s3_bucket):
    url, options = s3_bucket
    with pytest.raises(FileNotFoundError, match="no images"):
        run_job(dask_client, job(url, options))


def test_a_restart_resumes_from_the_runs_newest_checkpoint_once_there_is_one(tmp_path):
    from daskgan.training.loop import resume_source

    run = tmp_path.as_uri() + "/run"
    earlier = run + "/checkpoints/000000500.pt"
    job = JobConfig.from_dict({"data": {"url": "memory://d"}, "output": {"run_url": run, "resume": earlier}})
    assert resume_source(job).url == resume_source(job, restarting=True).url == earlier, "nothing saved yet: as asked"
    saved = checkpoint.save(run, {"iteration": 510}, 510, keep=2)
    assert resume_source(job).url == earlier and resume_source(job, restarting=True).url == saved
    job.output.resume = "never"
    assert resume_source(job, restarting=True).url == saved


@pytest.mark.parametrize("resume", ["{run}", "{run}/checkpoints/latest.json", "{path}/checkpoints/latest.json"])
def test_resume_naming_the_run_or_its_pointer_takes_its_newest_checkpoint(tmp_path, resume):
    from daskgan.training.loop import resume_source

    run, path = tmp_path.as_uri() + "/run", str(tmp_path / "run")
    checkpoint.save(run, {"iteration": 500}, 500, keep=2)
    newest = checkpoint.save(run, {"iteration": 510}, 510, keep=2)
    job = JobConfig.from_dict({"data": {"url": "memory://d"},
                               "output": {"run_url": run, "resume": resume.format(run=run, path=path)}})
    assert resume_source(job).url.removeprefix("file://") == newest.removeprefix("file://")  # a path stays a path


def test_resuming_from_another_runs_checkpoint_is_refused_pointing_at_init_from(tmp_path):
    foreign = tmp_path.as_uri() + "/pretrained/checkpoints/000000500.pt"
    with pytest.raises(ConfigError, match=rf"output.resume: {foreign} is not a checkpoint of this run .*"
                                          rf"set train.init_from: {foreign}"):
        JobConfig.from_dict({"data": {"url": "memory://d"},
                             "output": {"run_url": tmp_path.as_uri() + "/run", "resume": foreign}})
    JobConfig.from_dict({"data": {"url": "memory://d"}, "train": {"init_from": foreign},
                         "output": {"run_url": str(tmp_path / "run")}})
    JobConfig.from_dict({"data": {"url": "memory://d"}, "output": {"run_url": str(tmp_path / "run"),
                                                                   "resume": f"{tmp_path.as_uri()}/run/x.pt"}})


@pytest.fixture
def local_job(tmp_path, dask_client):
    """Factory: a small job on a synthetic dataset and run directory in ``tmp_path``, for one in-process rank
    (whose driver watch reads the session's scheduler)."""
    from daskgan.data import synthetic

    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=16, resolution=16)

    def make(**train):
        config = job(tmp_path.as_uri(), {}, **train)
        config.data.url = data
        return config

    return make


def files_under(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_resume_never_on_a_run_with_records_and_checkpoints_is_refused_and_changes_nothing(process_group, local_job,
                                                                                          tmp_path):
    train_gan(local_job(iterations=3))
    before = files_under(tmp_path / "run")
    again = local_job(iterations=6)
    again.output.resume = "never"
    with pytest.raises(ConfigError) as refused:
        train_gan(again)
    message = str(refused.value)
    assert "\n" not in message and again.output.run_url in message
    assert "new output.run_url" in message and "output.resume: auto" in message, "it says what to do instead"
    assert files_under(tmp_path / "run") == before, "no record, checkpoint or config.yaml of that run touched"


def test_a_run_whose_newest_checkpoint_was_cut_short_resumes_from_the_one_before(process_group, local_job):
    config = local_job(iterations=6)  # checkpoints 3 and 6
    train_gan(config)
    newest = checkpoint.latest(config.output.run_url)
    with open(newest.removeprefix("file://"), "r+b") as handle:  # what a full disk left of it
        handle.truncate(1000)
    config.train.iterations = 8
    summary = train_gan(config)
    assert summary["resumed_from"].endswith("000000003.pt")
    records = load(config.output.run_url).set_index("iteration")
    assert records.index.tolist() == list(range(1, 9)), "no record missing or duplicated"
    assert "000000006.pt is cut short" in records.loc[4, "unreadable_checkpoints"], "the records say so"
    assert [i for i, _ in checkpoint.list_checkpoints(config.output.run_url)] == [3, 6, 8]


KILLED_AT = """
import json, os, signal, sys
import torch.distributed as dist
from distributed import Client
from daskgan.config import JobConfig
from daskgan.tools.sandbox import free_port
from daskgan.training import loop
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
train_iteration = loop.train_iteration
def dies_at(config, gan, stream, noise, iteration):
    if iteration == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return train_iteration(config, gan, stream, noise, iteration)
loop.train_iteration = dies_at
client = Client(sys.argv[3])  # the driver watch reads the scheduler
loop.train_gan(JobConfig.from_dict(json.loads(sys.argv[1])))
"""


def test_records_up_to_a_checkpoint_survive_rank_0_killed_after_it(process_group, local_job, dask_client):
    """flush_every 4 does not divide checkpoint_every 6: records 5 and 6 were in memory when rank 0 was killed
    at iteration 8, and the resume from 6 never wrote them again."""
    config = local_job(iterations=10)
    config.output.flush_every, config.output.checkpoint_every = 4, 6
    job_file = {key: value for key, value in config.to_dict().items() if key != "workers"}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, json.dumps(job_file), "8",
                             dask_client.scheduler.address],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert checkpoint.latest(config.output.run_url).endswith("000000006.pt")
    train_gan(config)
    assert load(config.output.run_url)["iteration"].tolist() == list(range(1, 11))


def test_a_checkpoint_that_cannot_be_written_is_recorded_and_training_goes_on(process_group, tmp_path, monkeypatch):
    from daskgan.data import synthetic
    from daskgan.errors import StorageUnavailable
    from daskgan.run.records import load
    from daskgan.training import loop

    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=16, resolution=16)
    config = job(tmp_path.as_uri(), {})
    config.data.url = data
    real_save = checkpoint.save

    def storage_down_at_3(run_url, state, iteration, *args, **kwargs):
        if iteration == 3:
            raise StorageUnavailable(f"{run_url}/checkpoints/000000003.pt: still failing after 8 tries in 300s")
        return real_save(run_url, state, iteration, *args, **kwargs)

    monkeypatch.setattr(loop.checkpoint, "save", storage_down_at_3)
    summary = train_gan(config)
    assert summary["iterations"] == 6 and summary["checkpoint"].endswith("000000006.pt")
    records = load(config.output.run_url).set_index("iteration")
    assert records.loc[4, "checkpoint_failed"] == 3 and "still failing" in records.loc[4, "checkpoint_error"]
    assert [i for i, _ in checkpoint.list_checkpoints(config.output.run_url)] == [6]


def test_fid_against_the_whole_dataset_on_two_workers_evaluates_again_and_again(dask_client, dataset):
    url, options = dataset
    config = job(url, options, run="dataset-fid", iterations=3)
    config.metrics.every, config.metrics.images, config.metrics.kinds = 1, 8, ["fid"]
    config.metrics.fid_reals = "dataset"
    run_job(dask_client, config)
    table = load(config.output.run_url, options)
    assert table["fid"].notna().tolist() == [True, True, True], "every rank takes part in each evaluation"
    fs, root = storage.filesystem(config.output.run_url, options)
    assert len(fs.glob(f"{root}/metrics/real-stats-*.pt")) == 1, "the statistics are computed once"


def test_a_real_example_that_is_gone_or_does_not_decode_is_a_grey_tile(tmp_path):
    from daskgan.data import synthetic
    from daskgan.data.index import index_images
    from daskgan.training.loop import real_examples

    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=4, resolution=16)
    index = index_images(data_url)
    files = [tmp_path / "data" / path.split("/data/", 1)[1] for path in index.paths]
    files[0].write_bytes(b"not an image")
    files[1].unlink()
    config = JobConfig.from_dict({"name": "g", "data": {"url": data_url, "resolution": 16},
                                  "output": {"run_url": tmp_path.as_uri() + "/run", "grid_images": 4}})
    reals = real_examples(config, index, None)
    grey = torch.zeros(3, 16, 16)
    assert [torch.equal(image, grey) for image in reals] == [True, True, False, False]
