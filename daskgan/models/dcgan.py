"""DCGAN (Radford et al. 2015), as in the PyTorch example and Saturn Cloud's Dask tutorial, for any power-of-two
resolution >= 8: the generator upsamples a 4x4 map with strided transposed convolutions (BatchNorm + ReLU, tanh
out); the discriminator mirrors it with strided convolutions (BatchNorm + LeakyReLU 0.2) down to one logit.

Class-conditional (``model.conditional``): G reads the one-hot label beside z (Mirza & Osindero's conditional
GAN); D adds the projection of its last features onto an embedding of the label (Miyato & Koyama's projection
discriminator). The embedding starts at N(0, 1), so D's verdict depends on the class from the first step: started
at zero it stayed nearly class-blind for the demo's first thousand steps and G drew every class in every row. A row
of class weights (a blend) works too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from daskgan.models.layers import one_hot


def _stage_widths(resolution: int, base: int) -> list[int]:
    """Channel widths from the 4x4 stage up to resolution/2: base * 2^k, widest at the coarsest stage."""
    stages = int(math.log2(resolution)) - 2  # number of 2x up/down-samplings between 4x4 and the image
    return [base * 2 ** (stages - 1 - i) for i in range(stages)]


class Generator(nn.Module):
    def __init__(self, resolution: int = 64, z_dim: int = 100, channels: int = 64, image_channels: int = 3,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        widths = _stage_widths(resolution, channels)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + num_classes, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], image_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: class indices (N,) or class weights (N, C), for a conditional generator."""
        if self.num_classes:
            z = torch.cat([z, one_hot(labels, self.num_classes).to(z.dtype)], dim=1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 64, channels: int = 64, image_channels: int = 3, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        widths = _stage_widths(resolution, channels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(image_channels, widths[0], 4, 2, 1, bias=False),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)
        self.embed = nn.Linear(num_classes, widths[-1], bias=False) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.net[:-1](images)
        logits = self.net[-1](features).flatten()
        if self.embed is None:
            return logits
        projection = self.embed(one_hot(labels, self.num_classes).to(features.dtype)) * features.mean(dim=[2, 3])
        return logits + projection.sum(dim=1)


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build(model_config, resolution: int, num_classes: int, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for ``model: {family: dcgan, ...}``; ``num_classes`` > 0: conditional."""
    m = model_config
    return (Generator(resolution, m.z_dim, m.g_channels, channels, num_classes),
            Discriminator(resolution, m.d_channels, channels, num_classes))
