"""ADA in training: 2 gloo ranks, a tiny dataset in the loopback S3 bucket, a discriminator that overfits."""

import pytest
import torch

from daskgan.cluster.driver import run_job
from daskgan.config import JobConfig
from daskgan.run import checkpoint
from daskgan.run.records import load

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_dataset(shapes_in_bucket):
    return shapes_in_bucket(images=24)


def ada_job(url, options, run, mode="ada", iterations=40):
    return JobConfig.from_dict({
        "name": "ada",
        "data": {"url": f"{url}/data", "storage_options": options, "resolution": 16, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 8, "d_channels": 16},
        "train": {"iterations": iterations, "lr_d": 1e-3},
        # speed_kimg 1: each adjustment moves p by 8 images x 4 / 1000 = 0.032
        "augment": {"mode": mode, "p": 0.0, "speed_kimg": 1.0, "interval": 4},
        "output": {"run_url": f"{url}/{run}", "storage_options": options, "flush_every": 10,
                   "grid_every": 20, "checkpoint_every": 20},
    })


def test_p_rises_when_d_overfits_and_resume_continues_it(dask_client, tiny_dataset):
    url, options = tiny_dataset
    straight = ada_job(url, options, "straight")
    run_job(dask_client, straight)
    records = load(straight.output.run_url, options)
    assert records["ada_rt"].dropna().gt(0.6).any(), "the discriminator became confident on reals"
    assert records["ada_p"].iloc[-1] > 0, "p rose above 0 within the run"
    assert records["ada_p"].iloc[0] == 0.0
    print("\nada_p every 4 iterations:", records["ada_p"].iloc[3::4].round(3).tolist(),
          "r_t:", records["ada_rt"].dropna().iloc[3::4].round(2).tolist())
    steps = records["ada_p"].diff().dropna().round(6)
    assert set(steps.unique()) <= {0.0, 0.032, -0.032}, "p moves in NVlabs' steps"
    assert checkpoint.load(checkpoint.latest(straight.output.run_url, options), options)["augment_p"] == \
        pytest.approx(records["ada_p"].iloc[-1])

    run_job(dask_client, ada_job(url, options, "resumed", iterations=20))
    resumed = ada_job(url, options, "resumed")
    run_job(dask_client, resumed)
    again = load(resumed.output.run_url, options)
    assert again["ada_p"].tolist() == records["ada_p"].tolist(), "the resumed run continues the same p"
    for a, b in zip(*(checkpoint.load(checkpoint.latest(j.output.run_url, options), options)["D"].values()
                      for j in (straight, resumed))):
        assert torch.equal(a, b)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(f"{straight.output.run_url}/tb", size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("ada/p")] == pytest.approx(records["ada_p"].tolist())
    assert events.Scalars("ada/rt")


def test_fixed_p_zero_stays_zero(dask_client, tiny_dataset):
    url, options = tiny_dataset
    fixed = ada_job(url, options, "fixed", mode="fixed", iterations=12)
    run_job(dask_client, fixed)
    records = load(fixed.output.run_url, options)
    assert records["ada_p"].eq(0.0).all() and "ada_rt" not in records


def stylegan2_job(url, options, run, iterations):
    config = ada_job(url, options, run, iterations=iterations)
    config.model.family, config.model.z_dim = "stylegan2", 16
    config.model.w_dim, config.model.mapping_layers, config.model.fmaps, config.model.channel_max = 16, 2, 1 / 128, 32
    config.train.r1_gamma, config.train.r1_interval, config.train.ema_kimg = 1.0, 4, 0.05
    config.train.pl_weight, config.train.pl_interval = 2.0, 2
    config.model.conditional = True  # the shapes' class folders
    config.train.lr_d = config.train.lr_g = 2e-3
    config.augment.speed_kimg = 0.1  # fast p moves so a few iterations show them
    return config


def test_conditional_stylegan2_ada_with_path_length_runs_on_two_workers_and_resumes_p(dask_client, tiny_dataset):
    url, options = tiny_dataset
    straight = stylegan2_job(url, options, "sg2-straight", iterations=12)
    run_job(dask_client, straight)
    records = load(straight.output.run_url, options)
    assert records["iteration"].tolist() == list(range(1, 13))
    assert records[["loss_G", "loss_D_real", "loss_D_fake"]].notna().all().all()
    assert records["ada_p"].notna().all() and records["r1_penalty"].notna().sum() == 3
    assert records["pl_penalty"].notna().tolist() == [i % 2 == 0 for i in range(1, 13)]
    assert records["pl_mean"].dropna().gt(0).all(), "the path-length target moves off zero"

    run_job(dask_client, stylegan2_job(url, options, "sg2-resumed", iterations=6))
    resumed = stylegan2_job(url, options, "sg2-resumed", iterations=12)
    run_job(dask_client, resumed)
    assert load(resumed.output.run_url, options)["ada_p"].tolist() == records["ada_p"].tolist()
    a, b = (checkpoint.load(checkpoint.latest(j.output.run_url, options), options) for j in (straight, resumed))
    assert a["pl_target"] == b["pl_target"] > 0 and a["model"]["num_classes"] == 4
    for key in ("G", "D", "G_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_a_grayscale_dataset_end_to_end(dask_client, tiny_dataset, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from daskgan.run import storage
    from daskgan.tools.generate import generate

    url, options = tiny_dataset
    gray = stylegan2_job(url, options, "gray", iterations=4)
    gray.data.channels, gray.augment.p, gray.augment.mode = 1, 0.5, "fixed"  # every augmentation on 1 channel
    gray.metrics.every, gray.metrics.images = 4, 16
    gray.output.grid_every = 4
    summary = run_job(dask_client, gray)
    records = load(gray.output.run_url, options)
    assert records["fid"].dropna().size == 1 and records["loss_G"].notna().all()
    for name in ("reals", "000000004"):
        grid = Image.open(io.BytesIO(storage.read_bytes(f"{gray.output.run_url}/grids/{name}.png", options)))
        assert grid.mode == "L", f"{name}: a grayscale grid"
    state = checkpoint.load(summary["checkpoint"], options)
    assert state["model"]["channels"] == 1 and state["G"]["blocks.0.torgb.weight"].shape[0] == 1
    generate(summary["checkpoint"], [0], (tmp_path / "out").as_uri(), storage_options=options, class_index=1)
    image = Image.open(tmp_path / "out" / "seed0000.png")
    assert image.mode == "L" and np.array(image).std() > 0
