"""Model registry: a family name from the job file to a builder of (generator, discriminator)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from daskgan.models import dcgan, stylegan2

Builder = Callable[..., tuple[nn.Module, nn.Module]]

FAMILIES: dict[str, Builder] = {"dcgan": dcgan.build, "stylegan2": stylegan2.build}


def build_models(model_config, resolution: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build G and D for ``model_config.family`` (seed the RNG first: every rank must start identical)."""
    return FAMILIES[model_config.family](model_config, resolution, num_classes)
