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


def pickle_job(tmp_path, source):
    """Fine-tuning from an R3GAN pickle with its optimizer moments, on the fixture's networks."""
    return JobConfig.from_dict({
        "data": {"url": "memory://x", "resolution": 32},
        "model": {"family": "r3gan", "z_dim": 24, "stage_widths": [24, 16, 16, 8], "stage_blocks": [1, 2, 1, 2]},
        "train": {"init_from": str(source), "init_optimizers": True, "lr_g": 1e-5},
        "output": {"run_url": (tmp_path / "run").as_uri()},
    })


# R3GAN's Adam numbers module.parameters(); the fixture's numbers beside daskgan's names (D's transition follows
# its blocks in R3GAN's stage, so a number taken as ours would land on a parameter of another shape)
NUMBERED = {"G": {0: "stages.0.transition.basis", 15: "stages.1.blocks.1.conv3.weight", 34: "to_rgb.weight"},
            "D": {0: "from_rgb.weight", 6: "stages.0.blocks.1.conv1.weight", 11: "stages.0.transition.conv.weight",
                  33: "stages.3.transition.depthwise.weight"}}


@pytest.mark.parametrize("imported", [False, True], ids=["pickle", "imported"])
def test_fine_tuning_takes_adam_moments_from_an_r3gan_pickle_by_parameter_name(tmp_path, process_group, imported):
    from daskgan.pretrained import import_weights, r3gan
    from daskgan.pretrained.nvlabs_pickle import read_pickle
    from daskgan.run import storage
    from daskgan.training.setup import build_gan, initialise_from

    source = tmp_path / "imported.pt" if imported else R3GAN_PICKLE  # `daskgan import` keeps the moments
    if imported:
        storage.write_bytes(str(source), storage.torch_bytes(import_weights(str(R3GAN_PICKLE))))
    job = pickle_job(tmp_path, source)
    gan = build_gan(job, 0, torch.device("cpu"))
    initialise_from(gan, job)
    saved = read_pickle(R3GAN_PICKLE.read_bytes(), str(R3GAN_PICKLE), r3gan.ADMITTED)
    for key, optimizer, network in (("G", gan.opt_G, gan.G.module), ("D", gan.opt_D, gan.D.module)):
        moments, parameters = saved[f"{key}_opt_state"]["state"], dict(network.named_parameters())
        for number, name in NUMBERED[key].items():
            for moment in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optimizer.state[parameters[name]][moment], moments[number][moment]), \
                    f"{key} {name}: {moment} is not R3GAN's number {number}"
        taken = set()
        for name, parameter in parameters.items():
            ours = optimizer.state[parameter]
            assert ours["exp_avg"].shape == ours["exp_avg_sq"].shape == parameter.shape, name
            assert float(ours["step"]) == 1.0, f"{key} {name}: one R3GAN step"
            taken |= {n for n, m in moments.items() if torch.equal(m["exp_avg"], ours["exp_avg"])}
        assert taken == set(moments) and len(moments) == len(parameters), f"each of {key}'s moments, once"
    assert [g["lr"] for g in gan.opt_G.param_groups] == [1e-5] and gan.opt_G.param_groups[0]["betas"][0] == 0.0, \
        "the job's hyperparameters, not the pickle's"


def test_an_r3gan_pickle_without_optimizer_states_is_refused_naming_them(tmp_path, process_group):
    from daskgan.errors import ConfigError
    from daskgan.training.setup import build_gan, initialise_from

    data = R3GAN_PICKLE.read_bytes()
    assert data.count(b"G_opt_state") == data.count(b"D_opt_state") == 1
    stripped = tmp_path / "no-optimizers.pkl"  # the same pickle, its optimizer states under other keys
    stripped.write_bytes(data.replace(b"G_opt_state", b"G_opt_other").replace(b"D_opt_state", b"D_opt_other"))
    job = pickle_job(tmp_path, stripped)
    with pytest.raises(ConfigError, match="holds no optimizer state.*R3GAN pickle needs G_opt_state and D_opt_state"):
        initialise_from(build_gan(job, 0, torch.device("cpu")), job)


def test_an_r3gan_optimizer_state_that_does_not_fit_its_network_is_refused_in_one_line():
    from daskgan.errors import CheckpointMismatch, CheckpointUnreadable
    from daskgan.pretrained import r3gan
    from daskgan.pretrained.nvlabs_pickle import read_pickle

    networks = read_pickle(R3GAN_PICKLE.read_bytes(), "snapshot.pkl", r3gan.ADMITTED)
    saved = networks["D_opt_state"]
    assert set(r3gan.optimizer_moments(networks, "snapshot.pkl")) == {"opt_G", "opt_D"}
    fewer = {**saved, "param_groups": [{**saved["param_groups"][0], "params": list(range(34))}]}
    widened = {**saved, "state": {**saved["state"], 3: {**saved["state"][3],
                                                         "exp_avg_sq": torch.zeros(8, 16, 1, 2)}}}
    for state, error, message in (
            (fewer, CheckpointMismatch, r"snapshot.pkl D_opt_state: 34 parameters, R3GAN's D has 35"),
            (widened, CheckpointMismatch, r"MainLayers.0.Layers.0.LinearLayer3.Layer.weight's state is not Adam's"),
            ([1, 2], CheckpointUnreadable, r"D_opt_state: not an optimizer's state_dict")):
        with pytest.raises(error, match=message) as raised:
            r3gan.optimizer_moments({**networks, "D_opt_state": state}, "snapshot.pkl")
        assert "\n" not in str(raised.value)
