"""R3GAN trained on the cluster (issue #28 items 2 and 4): its traits on the family description drive the loop.

The pairing loss with R1 and R2 every D step, fakes under the reals' labels and Adam's beta1 = 0 come from
``daskgan.config.families``; a 2-worker run on the loopback S3 trains, records its terms and resumes exactly.
"""

from pathlib import Path

import pytest
import torch
from test_training import final_weights, run_job

from daskgan.config import JobConfig
from daskgan.config.families import FAMILIES
from daskgan.run.records import load
from daskgan.training.steps import Noise

TINY = {"family": "r3gan", "z_dim": 8, "stage_widths": [16, 8, 8], "stage_blocks": [1, 1, 1], "group_channels": 4}


def r3gan_job(bucket_url, options, run="run", conditional=False, **train):
    return JobConfig.from_dict({
        "name": "r3gan-e2e",
        "data": {"url": f"{bucket_url}/data", "storage_options": options, "resolution": 16, "batch_size": 4},
        "model": {**TINY, "conditional": conditional},
        "train": {"iterations": 6, "r1_gamma": 1.0, "ema_kimg": 0.05, **train},
        "output": {"run_url": f"{bucket_url}/{run}", "storage_options": options, "flush_every": 2,
                   "grid_every": 3, "grid_images": 4, "checkpoint_every": 3, "keep_checkpoints": 5},
    })


def test_r3gan_trains_with_adam_beta1_zero_unless_the_job_sets_it():
    job = {"data": {"url": "memory://d"}, "output": {"run_url": "memory://r"}, "model": {"family": "r3gan"}}
    assert JobConfig.from_dict(job).train.beta1 == 0.0, "R3GAN's Adam has beta1 = 0"
    assert JobConfig.from_dict({**job, "train": {"beta1": 0.5}}).train.beta1 == 0.5, "the job's own value wins"
    assert JobConfig.from_dict({**job, "model": {"family": "dcgan"}}).train.beta1 == 0.5, "DCGAN's stays"


def test_only_r3gan_pairs_reals_with_fakes_under_the_reals_labels():
    assert [name for name, family in FAMILIES.items() if family.pairing_loss] == ["r3gan"]
    assert [name for name, family in FAMILIES.items() if family.fake_labels_from_reals] == ["r3gan"]


def test_fakes_take_the_reals_labels_when_the_family_says_so():
    reals = torch.tensor([3, 1, 4, 1])
    paired = Noise(torch.Generator().manual_seed(0), 8, 5, torch.device("cpu"), labels_from_reals=True)
    z, labels = paired.draw(4, reals)
    assert z.shape == (4, 8) and torch.equal(labels, reals)
    drawn = Noise(torch.Generator().manual_seed(0), 8, 5, torch.device("cpu"))
    assert drawn.draw(4, reals)[1].shape == (4,), "other families draw their own"


@pytest.mark.slow
def test_a_two_worker_r3gan_run_trains_records_its_terms_and_resumes_exactly(dask_client, shapes_in_bucket):
    url, options = shapes_in_bucket(images=48)
    straight = r3gan_job(url, options, run="straight", conditional=True)
    summary, live = run_job(dask_client, straight)
    assert [r["iteration"] for r in live] == list(range(1, 7))
    records = load(straight.output.run_url, options)
    for column in ("loss_G", "loss_D_real", "r1_penalty", "r2_penalty"):
        assert records[column].notna().all() and (records[column] != 0).any(), column
    assert (records["loss_D_fake"] == 0).all(), "the pairing term is one: loss_D_real holds it"
    assert (records["r1_penalty"] > 0).all() and (records["r2_penalty"] > 0).all(), "R1 and R2 every D step"
    assert records["kimg"].iloc[-1] == pytest.approx(6 * 4 * 2 / 1000), "kimg counts the reals D sees"

    run_job(dask_client, r3gan_job(url, options, run="resumed", conditional=True, iterations=3))
    resumed = r3gan_job(url, options, run="resumed", conditional=True)
    summary, live = run_job(dask_client, resumed)
    assert summary["resumed_from"].endswith("000000003.pt")
    assert [r["iteration"] for r in live] == [4, 5, 6]
    again = load(resumed.output.run_url, options)
    assert again["loss_G"].tolist() == records["loss_G"].tolist(), "the same losses as the uninterrupted run"
    assert len(final_weights(straight)) == len(final_weights(resumed)) == 3, "G, D and G_ema"
    for a, b in zip(final_weights(straight), final_weights(resumed)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs after resume"


R3GAN_PICKLE = Path(__file__).parent / "fixtures" / "r3gan-pkl-uncond" / "network-snapshot.pkl"


@pytest.mark.slow
def test_a_fine_tuning_run_starts_from_an_r3gan_pickle(process_group, dask_client, tmp_path, monkeypatch):
    """The pickle R3GAN's own loop wrote (32 px, z 24, stages 24/16/16/8 with 1/2/1/2 blocks, unconditional)."""
    from daskgan import train_gan
    from daskgan.data import synthetic
    from daskgan.pretrained import load_weights
    from daskgan.training import loop

    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=8, resolution=32)
    job = JobConfig.from_dict({
        "data": {"url": data, "resolution": 32, "batch_size": 4},
        "model": {"family": "r3gan", "z_dim": 24, "stage_widths": [24, 16, 16, 8], "stage_blocks": [1, 2, 1, 2]},
        "train": {"iterations": 2, "r1_gamma": 0.05, "ema_kimg": 0.01, "init_from": str(R3GAN_PICKLE)},
        "output": {"run_url": tmp_path.as_uri() + "/run", "grid_images": 4},
    })
    source, first, train_iteration = load_weights(str(R3GAN_PICKLE)), {}, loop.train_iteration

    def watching(config, gan, stream, noise, iteration):
        if iteration == 1:
            first.update({name: {key: value.clone() for key, value in network.state_dict().items()}
                          for name, network in (("G", gan.G.module), ("D", gan.D.module), ("G_ema", gan.G_ema))})
        return train_iteration(config, gan, stream, noise, iteration)

    monkeypatch.setattr(loop, "train_iteration", watching)
    summary = train_gan(job)
    assert summary["records"] == 2
    for network in ("G", "D", "G_ema"):
        assert first[network].keys() == source[network].keys()
        assert all(torch.equal(first[network][name], source[network][name]) for name in first[network]), network


def test_generate_draws_numpy_seeds_for_the_families_whose_scripts_do():
    assert [name for name, family in FAMILIES.items() if family.numpy_seeds] == ["stylegan2", "r3gan"]


def test_the_small_example_job_is_r3gans_recipe_scaled_to_a_cpu():
    from daskgan.config import load_job

    config = load_job(Path(__file__).parent.parent / "jobs" / "r3gan-small.yaml", workers=2)
    assert (config.model.family, config.train.beta1, config.augment.mode) == ("r3gan", 0.0, "schedule")
    assert config.train.decay_kimg * 1000 == config.train.iterations * config.images_per_iteration(2), \
        "the schedules run over the whole run"
