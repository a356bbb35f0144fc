"""NVlabs-style presets: values from their table, scaled by workers, under the job's own keys."""

import pytest

from daskgan.config import ConfigError, JobConfig


def job(**extra):
    return {"name": "p", "preset": "auto", "data": {"url": "memory://d", "resolution": 256},
            "output": {"run_url": "memory://r"}, **extra}


def test_auto_scales_the_batch_and_gamma_with_the_workers():
    two = JobConfig.from_dict(job(), workers=2)
    assert two.data.batch_size == 16, "auto at 256: min(2 * 4096 // 256, 64) = 32 images over 2 workers"
    assert two.train.r1_gamma == pytest.approx(0.0002 * 256 ** 2 / 32)
    assert two.train.ema_kimg == pytest.approx(32 * 10 / 32)
    assert (two.model.family, two.model.mapping_layers, two.model.mbstd_group) == ("stylegan2", 2, 4)
    assert (two.train.beta1, two.train.beta2, two.train.pl_weight, two.augment.mode) == (0.0, 0.99, 2.0, "ada")
    eight = JobConfig.from_dict(job(), workers=8)
    assert eight.data.batch_size * 8 == 64 and eight.train.r1_gamma == pytest.approx(0.0002 * 256 ** 2 / 64)
    assert eight.workers == 8


def test_auto_rounds_the_batch_to_a_multiple_of_the_workers():
    config = JobConfig.from_dict(job(), workers=5)
    assert config.data.batch_size == 12, "min(5 * 16, 64) = 64 -> 60 over 5 workers"
    assert config.train.r1_gamma == pytest.approx(0.0002 * 256 ** 2 / 60)


def test_fixed_presets_keep_their_global_batch_and_the_job_keys_win():
    config = JobConfig.from_dict(job(preset="paper256", train={"iterations": 10, "r1_gamma": 3.0}), workers=8)
    assert config.data.batch_size == 8 and config.model.mapping_layers == 8 and config.model.mbstd_group == 8
    assert config.train.ema_kimg == 20 and config.train.ema_rampup is None
    assert config.train.iterations == 10 and config.train.r1_gamma == 3.0, "keys in the job file override"
    cifar = JobConfig.from_dict(job(preset="cifar", data={"url": "memory://d", "resolution": 32}), workers=2)
    assert (cifar.data.batch_size, cifar.model.style_mixing, cifar.train.pl_weight) == (32, 0.0, 0.0)
    assert cifar.train.iterations == 100_000 * 1000 // 64


def test_preset_errors_are_clear():
    with pytest.raises(ConfigError, match="preset: must be one of"):
        JobConfig.from_dict(job(preset="ffhq"), workers=2)
    with pytest.raises(ConfigError, match="scales with the number of workers"):
        JobConfig.from_dict(job())


def test_biggan_presets_split_the_global_batch_over_workers_and_accumulation():
    config = JobConfig.from_dict(job(preset="biggan", data={"url": "memory://d", "resolution": 128}), workers=8)
    assert (config.data.batch_size, config.train.accumulate, config.train.d_steps) == (32, 8, 2)
    assert (config.model.family, config.train.loss, config.train.ortho_reg, config.train.ema_start) == \
        ("biggan", "hinge", 1e-4, 20000)
    assert 0.5 ** (2048 / (config.train.ema_kimg * 1000)) == pytest.approx(0.9999), "BigGAN's per-step EMA decay"
    sagan = JobConfig.from_dict(job(preset="sagan", data={"url": "memory://d", "resolution": 128}), workers=2)
    assert (sagan.data.batch_size * 2 * sagan.train.accumulate, sagan.train.d_steps) == (256, 1)
    assert (sagan.train.lr_g, sagan.train.lr_d, sagan.model.hierarchical) == (1e-4, 4e-4, False)


def test_the_released_biggan_recipe_beside_the_papers():
    released = JobConfig.from_dict(job(preset="biggan-pytorch", data={"url": "memory://d", "resolution": 128}),
                                   workers=8)
    train = released.train
    assert (released.data.batch_size * 8 * train.accumulate, train.d_steps, train.lr_g, train.lr_d) == \
        (2048, 1, 1e-4, 4e-4)
    assert (train.ortho_reg, train.adam_eps) == (0.0, 1e-6)
    paper = JobConfig.from_dict(job(preset="biggan", data={"url": "memory://d", "resolution": 128}), workers=8)
    assert paper.train.adam_eps == 1e-8 and paper.train.d_steps == 2


def test_biggan_256_takes_a_longer_z():
    config = JobConfig.from_dict(job(preset="biggan", data={"url": "memory://d", "resolution": 256}), workers=8)
    assert config.model.z_dim == 140


R3GAN_PRESETS = {  # R3GAN's train.py and README: resolution, global batch, widths, groups, bf16 stages, gamma, p
    "r3gan-cifar10": (32, 512, [768] * 4, 16, 3, (0.05, 0.005), 0.55, 5000, 20000, True),
    "r3gan-ffhq64": (64, 256, [768] * 4 + [384], 16, 4, (2, 0.2), 0.3, 500, 20000, False),
    "r3gan-ffhq256": (256, 256, [768] * 4 + [384, 192, 96], 16, 4, (150, 15), 0.3, 500, 20000, False),
    "r3gan-imagenet32": (32, 4096, [1536] * 4, 32, 3, (0.5, 0.05), 0.5, 50000, 200000, True),
    "r3gan-imagenet64": (64, 4096, [1536] * 5, 32, 4, (1, 0.1), 0.4, 50000, 200000, True),
}


@pytest.mark.parametrize("name", list(R3GAN_PRESETS))
@pytest.mark.parametrize("workers", [1, 8])
def test_r3gan_presets_are_its_train_py_with_the_global_batch_pinned(name, workers):
    resolution, batch, widths, groups, bf16, gamma, p, ema_kimg, decay_kimg, conditional = R3GAN_PRESETS[name]
    config = JobConfig.from_dict(job(preset=name, data={"url": "memory://d", "resolution": resolution}),
                                 workers=workers)
    assert config.data.batch_size * workers == batch, "the same global batch on any number of workers"
    model, train = config.model, config.train
    assert (model.family, model.z_dim, model.stage_widths, model.stage_blocks) == \
        ("r3gan", 64, widths, [2] * len(widths))
    assert (model.group_channels, model.expansion, model.bf16_stages, model.conditional) == (groups, 2, bf16,
                                                                                             conditional)
    assert (train.lr_g, train.lr_d, train.beta1, train.beta2, train.r1_gamma, train.ema_kimg) == \
        (2e-4, 2e-4, 0.0, 0.9, gamma[0], 0.0)
    assert (train.decay_kimg, train.decay_to) == (decay_kimg, {"lr_g": 5e-5, "lr_d": 5e-5, "beta2": 0.99,
                                                               "r1_gamma": gamma[1], "ema_kimg": ema_kimg})
    assert (config.augment.mode, config.augment.p, config.augment.p_final, config.augment.pipeline,
            config.data.mirror) == ("schedule", 0.0, p, "r3gan", True)
    assert train.iterations == -(-decay_kimg * 1000 // batch), "a run as long as its schedules"


def test_an_r3gan_preset_at_another_resolution_is_refused():
    with pytest.raises(ConfigError, match="preset: r3gan-cifar10 is R3GAN's 32 px recipe, got data.resolution 64"):
        JobConfig.from_dict(job(preset="r3gan-cifar10", data={"url": "memory://d", "resolution": 64}), workers=2)


@pytest.mark.parametrize("workers", [2, 8])
def test_the_r3gan_cifar10_job_is_the_recipe_on_any_number_of_workers(workers):
    from pathlib import Path

    from daskgan.config import load_job

    config = load_job(Path(__file__).parent.parent / "jobs" / "r3gan-cifar10.yaml", workers=workers)
    assert config.data.batch_size * workers == 512 and config.model.family == "r3gan" and config.model.conditional
    assert config.train.iterations == 39063 and config.augment.mode == "schedule"
