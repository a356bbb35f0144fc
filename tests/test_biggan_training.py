"""A short 2-worker conditional BigGAN run on the loopback S3 bucket: hinge loss, 2 D steps, accumulation,
synchronised BatchNorm, orthogonal regularisation, EMA from a start iteration, FID/KID and best-k checkpoints."""

import pytest
import torch

from daskgan.cluster.driver import run_job
from daskgan.config import JobConfig
from daskgan.run import checkpoint, storage
from daskgan.run.records import load

pytestmark = pytest.mark.slow


def biggan_job(url, options, run="biggan"):
    return JobConfig.from_dict({
        "name": "biggan",
        "data": {"url": f"{url}/data", "storage_options": options, "resolution": 32, "batch_size": 4},
        "model": {"family": "biggan", "z_dim": 20, "g_channels": 4, "d_channels": 4, "shared_dim": 8,
                  "attention_resolution": 16, "sync_batchnorm": True},
        "train": {"iterations": 8, "loss": "hinge", "lr_g": 1e-4, "lr_d": 4e-4, "beta1": 0.0, "beta2": 0.999,
                  "d_steps": 2, "accumulate": 2, "ortho_reg": 1e-4, "ema_kimg": 0.5, "ema_start": 5},
        "metrics": {"every": 3, "images": 24, "real_images": 24, "kid_subset_size": 12},
        "output": {"run_url": f"{url}/{run}", "storage_options": options, "flush_every": 4, "grid_every": 4,
                   "grid_images": 8, "checkpoint_every": 4, "keep_checkpoints": 2, "keep_best": 3},
    })


def test_conditional_biggan_run_with_metrics_and_best_checkpoints(dask_client, shapes_in_bucket):
    url, options = shapes_in_bucket(images=48, resolution=32)
    config = biggan_job(url, options)
    run_job(dask_client, config)
    records = load(config.output.run_url, options)
    assert records["iteration"].tolist() == list(range(1, 9))
    assert records["kimg"].iloc[-1] == pytest.approx(8 * 4 * 2 * 2 * 2 / 1000), "batch x workers x accum x D steps"
    evaluated = records.dropna(subset=["fid"])
    assert evaluated["iteration"].tolist() == [3, 6, 8]
    assert evaluated["fid"].gt(0).all() and evaluated["kid"].notna().all()
    assert set(evaluated["metrics_extractor"]) == {"random-cnn-v1"}

    report = storage.read_json(f"{config.output.run_url}/metrics/000000003.json", options)
    assert report["extractor"] == "random-cnn-v1" and report["images"] == 24
    assert report["fid"] == evaluated["fid"].iloc[0]
    cached = [n for n in storage.list_names(f"{config.output.run_url}/metrics", options) if n.startswith("real-")]
    assert len(cached) == 1, "real statistics computed once"

    index = checkpoint.index(config.output.run_url, options)
    best = sorted(evaluated[["fid", "iteration"]].itertuples(index=False))
    assert [(b["iteration"], b["fid"]) for b in index["best"]] == [(i, f) for f, i in best]
    assert [e["iteration"] for e in index["latest"]] == [6, 8]
    kept = {i for i, _ in checkpoint.list_checkpoints(config.output.run_url, options)}
    assert kept == {e["iteration"] for e in index["latest"] + index["best"]} == {3, 6, 8}, \
        "4: neither newest nor scored"

    # before ema_start the average is a copy of G's weights (sv* buffers are only the last estimates of sigma)
    weights = lambda state, key: {k: v for k, v in state[key].items() if ".sv" not in k}  # noqa: E731
    for iteration in kept:
        state = checkpoint.load(f"{config.output.run_url}/checkpoints/{iteration:09d}.pt", options)
        same = all(torch.equal(v, weights(state, "G_ema")[k]) for k, v in weights(state, "G").items())
        assert same == (iteration < 5), f"iteration {iteration}: EMA starts at 5"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(f"{config.output.run_url}/tb", size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("metrics/fid")] == [3, 6, 8]

    # any indexed checkpoint serves samples and resumes
    from daskgan.tools.sample import sample

    best_url = index["best"][0]["url"]
    written = sample(best_url, f"{url}/samples", per_class=2, steps=3, storage_options=options)
    assert [w.rsplit("/", 1)[1] for w in written] == ["classes.png", "interp_class.png", "interp_z.png"]
    resumed = biggan_job(url, options, run="biggan-from-best")
    resumed.output.resume, resumed.train.iterations = best_url, index["best"][0]["iteration"] + 1
    summary = run_job(dask_client, resumed)
    assert summary["resumed_from"] == best_url
    assert load(resumed.output.run_url, options)["iteration"].tolist() == [resumed.train.iterations]
