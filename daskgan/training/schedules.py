"""R3GAN's schedules: settings that move from the job's values to ``train.decay_to``'s along a half cosine over
``train.decay_kimg`` thousand real images, then stay (its ``cosine_decay_with_warmup`` without warm-up or hold).

R3GAN moves its learning rate, Adam's beta2, gamma (R1 and R2), the EMA half-life and the augmentation
probability this way; any of them may be left out. A value depends only on the iteration, so a resumed run takes
the same values as an uninterrupted one and nothing needs to be kept in checkpoints; setting them reads nothing
back from the device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daskgan.config import JobConfig
    from daskgan.training.steps import Gan

AUGMENT_P = "augment.p"  # the augmentation probability, under augment.mode: schedule
OPTIMIZER_SETTINGS = ("lr_g", "lr_d", "beta2")  # what apply_schedules sets in the optimizers


def cosine(start: float, final: float, images: float, decay_images: float) -> float:
    """The value after ``images`` of ``decay_images``: ``start`` at 0, half-way at half, ``final`` from the end on."""
    if images >= decay_images:
        return final
    decay = 0.5 * (1 + math.cos(math.pi * images / decay_images))
    return start + (1 - decay) * (final - start)


def scheduled(config: JobConfig, name: str, iteration: int, images_per_iteration: int) -> float:
    """Setting ``name`` (``train.<name>``, or ``augment.p``) for ``iteration`` (from 1), by the real images seen
    before it, as R3GAN's loop takes its values before it counts the iteration's batch."""
    if name == AUGMENT_P:
        start, final = config.augment.p, config.augment.p_final if config.augment.mode == "schedule" else None
    else:
        start, final = getattr(config.train, name), config.train.decay_to.get(name)
    if final is None:
        return start
    return cosine(start, final, (iteration - 1) * images_per_iteration, config.train.decay_kimg * 1000)


def apply_schedules(config: JobConfig, gan: Gan, iteration: int, images_per_iteration: int) -> dict[str, Any]:
    """Set the optimizers' lr and beta2 and the augmentation's p for ``iteration``; returns the scheduled values
    for its record (``train.decay_to``'s names). Without schedules nothing is touched."""
    from daskgan.training.setup import adam_settings

    if not config.train.decay_to and config.augment.mode != "schedule":
        return {}

    values = {name: scheduled(config, name, iteration, images_per_iteration)
              for name in (*OPTIMIZER_SETTINGS, AUGMENT_P, *config.train.decay_to)}
    for optimizer, lr, interval in ((gan.opt_G, values["lr_g"], config.train.pl_interval),
                                    (gan.opt_D, values["lr_d"], config.train.r1_interval)):
        lr, betas = adam_settings(config, lr, interval, values["beta2"])
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, betas
    if config.augment.mode == "schedule":
        gan.augment.set_probability(values[AUGMENT_P])
    return {name: values[name] for name in config.train.decay_to}
