"""R3GAN's cosine schedules over ``train.decay_kimg`` (issue #28 item 2): learning rate, Adam's beta2, gamma, the
EMA half-life and (``augment.mode: schedule``) the augmentation probability move from the job's values to
``train.decay_to``'s along R3GAN's cosine (``training_loop.cosine_decay_with_warmup`` with neither warm-up nor
hold), then stay there."""

import math

import pytest

from daskgan.config import ConfigError, JobConfig
from daskgan.training.schedules import cosine, scheduled

DECAY_KIMG = 20000  # R3GAN's decay_nimg 2e7


def r3gan_formula(nimg: float, base: float, final: float, total: float) -> float:
    """R3GAN's value, written out from its training_loop: base + (1 - decay) (final - base), decay the half
    cosine; past total_nimg the final value."""
    decay = 0.5 * (1 + math.cos(math.pi * nimg / total))
    return final if nimg > total else base + (1 - decay) * (final - base)


@pytest.mark.parametrize("base, final", [(2e-4, 5e-5), (0.9, 0.99), (0.05, 0.005), (0.0, 5e6), (0.0, 0.55)])
@pytest.mark.parametrize("fraction", [0, 0.25, 0.5, 1, 1.5])
def test_cosine_follows_r3gans_formula(base, final, fraction):
    total = DECAY_KIMG * 1000
    assert cosine(base, final, fraction * total, total) == pytest.approx(r3gan_formula(fraction * total, base, final,
                                                                                       total), rel=1e-12, abs=1e-15)


def test_the_values_at_zero_half_and_decay_kimg():
    assert [cosine(2e-4, 5e-5, n, 2e7) for n in (0, 1e7, 2e7)] == pytest.approx([2e-4, 1.25e-4, 5e-5], rel=1e-12)


def r3gan_job(**train):
    return JobConfig.from_dict({"data": {"url": "memory://d", "batch_size": 4}, "output": {"run_url": "memory://r"},
                                "model": {"family": "r3gan"},
                                "train": {"lr_g": 2e-4, "lr_d": 2e-4, "beta2": 0.9, "r1_gamma": 0.05,
                                          "decay_kimg": 0.016, "decay_to": {"lr_g": 5e-5, "lr_d": 5e-5,
                                                                            "beta2": 0.99, "r1_gamma": 0.005}, **train},
                                "augment": {"mode": "schedule", "p": 0.0, "p_final": 0.55}}, workers=2)


def test_each_setting_is_scheduled_by_the_images_seen_before_an_iteration():
    job = r3gan_job()  # 8 images an iteration on 2 workers: half-way at iteration 2, done at 3
    assert [scheduled(job, "lr_g", i, 8) for i in (1, 2, 3, 9)] == pytest.approx([2e-4, 1.25e-4, 5e-5, 5e-5])
    assert scheduled(job, "r1_gamma", 2, 8) == pytest.approx(0.0275)
    assert scheduled(job, "augment.p", 2, 8) == pytest.approx(0.275)
    assert scheduled(job, "ema_kimg", 2, 8) == job.train.ema_kimg, "a setting decay_to does not name stays"


@pytest.mark.parametrize("train, augment, message", [
    ({"decay_to": {"lr_g": 1e-5}}, {}, "train.decay_to: needs train.decay_kimg"),
    ({"decay_kimg": 10, "decay_to": {"adam_eps": 1e-6}}, {}, "train.decay_to: 'adam_eps' is not scheduled"),
    ({"decay_kimg": 10, "decay_to": {"beta2": 1.0}}, {}, "train.decay_to: beta2 must be in"),
    ({"decay_kimg": 0, "decay_to": {"lr_g": 1e-5}}, {}, "train.decay_kimg: must be > 0"),
    ({}, {"mode": "schedule", "p_final": 0.5}, "augment.mode: schedule needs train.decay_kimg"),
    ({"decay_kimg": 10}, {"mode": "fixed", "p_final": 0.5}, "augment.p_final: only with augment.mode: schedule"),
])
def test_a_schedule_that_cannot_run_is_refused_naming_the_key(train, augment, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        JobConfig.from_dict({"data": {"url": "memory://d"}, "output": {"run_url": "memory://r"}, "train": train,
                             "augment": augment})


@pytest.mark.slow
def test_the_optimisers_and_the_augmentation_follow_the_schedules_in_a_run(process_group, dask_client, tmp_path,
                                                                         monkeypatch):
    from daskgan import train_gan
    from daskgan.data import synthetic
    from daskgan.run.records import load
    from daskgan.training import loop

    data = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data, images=8, resolution=16)
    job = JobConfig.from_dict({
        "data": {"url": data, "resolution": 16, "batch_size": 4},
        "model": {"family": "r3gan", "z_dim": 8, "stage_widths": [8, 8, 8], "stage_blocks": [1, 1, 1],
                  "group_channels": 4},
        "train": {"iterations": 5, "lr_g": 2e-4, "lr_d": 2e-4, "beta2": 0.9, "r1_gamma": 0.05, "ema_kimg": 0.0,
                  "decay_kimg": 0.012, "decay_to": {"lr_g": 5e-5, "lr_d": 5e-5, "beta2": 0.99, "r1_gamma": 0.005,
                                                    "ema_kimg": 0.1}},
        "augment": {"mode": "schedule", "p": 0.0, "p_final": 0.5},
        "output": {"run_url": tmp_path.as_uri() + "/run", "flush_every": 5, "grid_images": 4},
    })
    seen, train_iteration = [], loop.train_iteration

    def watching(config, gan, stream, noise, iteration):
        seen.append((gan.opt_G.param_groups[0]["lr"], gan.opt_D.param_groups[0]["betas"], gan.augment.probability,
                     gan.G_ema is not None))
        return train_iteration(config, gan, stream, noise, iteration)

    monkeypatch.setattr(loop, "train_iteration", watching)
    train_gan(job)
    images = [4 * i for i in range(5)]  # one rank, 4 reals an iteration: seen before iterations 1 to 5
    assert [lr for lr, *_ in seen] == pytest.approx([cosine(2e-4, 5e-5, n, 12) for n in images], rel=1e-9)
    assert [betas for _, betas, *_ in seen] == [(0.0, pytest.approx(cosine(0.9, 0.99, n, 12))) for n in images]
    assert [p for _, _, p, _ in seen] == pytest.approx([cosine(0.0, 0.5, n, 12) for n in images], rel=1e-6)
    assert all(ema for *_, ema in seen), "an EMA half-life scheduled up from 0 keeps an average"
    records = load(job.output.run_url)
    assert records["r1_gamma"].tolist() == pytest.approx([cosine(0.05, 0.005, n, 12) for n in images])
    assert records["ema_kimg"].tolist() == pytest.approx([cosine(0.0, 0.1, n, 12) for n in images])
