"""Model registry: a family name from the job file to a builder of (generator, discriminator)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from daskgan.models import dcgan

Builder = Callable[..., tuple[nn.Module, nn.Module]]

FAMILIES: dict[str, Builder] = {"dcgan": dcgan.build}


def build_models(model_config, resolution: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build G and D for ``model_config.family`` (seed the RNG first: every rank must start identical)."""
    builder = FAMILIES[model_config.family]
    return builder(resolution=resolution, z_dim=model_config.z_dim, g_channels=model_config.g_channels,
                   d_channels=model_config.d_channels, num_classes=num_classes)
