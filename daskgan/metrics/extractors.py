"""FID and KID over all workers, with a pluggable feature extractor.

Each rank embeds its share of the real and generated images (item i goes to rank i mod world), the features are
gathered back into item order, and the statistics are taken in float64, so 2 workers give the FID one process
gives on the same images. The extractor is named beside every number:

- ``inception-v3``: NVlabs' TorchScript Inception (``inception-2015-12-05.pt``, 2048 pool features, takes uint8
  images), loaded from any fsspec URL the user gives (``metrics.extractor_url``). Numbers comparable with papers.
- ``random-cnn-v1`` (default, no download): a fixed, seeded, randomly initialised 4-layer CNN on 64x64 inputs,
  mean- and std-pooled to 512 features. Random features separate image distributions well enough to rank
  checkpoints of one run, but the numbers are not comparable with published Inception FIDs.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from daskgan.run import storage
from daskgan.run.storage import StorageOptions


class RandomCnnFeatures(nn.Module):
    """The default extractor: random but fixed convolutions (seed 0), the same on every machine with this torch."""

    name = "random-cnn-v1"
    feature_width = 512
    classifies = False  # no class probabilities: no Inception Score

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        widths = [3, 32, 64, 128, 256]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(b, a, 3, 3, generator=generator) / (3 * a ** 0.5), requires_grad=False)
            for a, b in zip(widths, widths[1:]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(64, 64), mode="bilinear", align_corners=False)
        for weight in self.weights:
            x = F.leaky_relu(F.conv2d(x, weight, stride=2, padding=1), 0.2)
        return torch.cat([x.mean(dim=[2, 3]), x.std(dim=[2, 3])], dim=1)


class TorchScriptInception(nn.Module):
    """NVlabs' Inception-v3 TorchScript (``detector(uint8_images, return_features=True)`` -> 2048 features)."""

    name = "inception-v3"
    feature_width = 2048
    classifies = True

    def __init__(self, url: str, storage_options: StorageOptions | None = None):
        super().__init__()
        self.detector = torch.jit.load(io.BytesIO(storage.read_bytes(url, storage_options)), map_location="cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return self.detector(pixels, return_features=True)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for the Inception Score (NVlabs: the softmax without the output bias)."""
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return self.detector(pixels, no_output_bias=True)


def load_extractor(url: str | None, storage_options: StorageOptions | None = None) -> nn.Module:
    """The Inception TorchScript at ``url``, or the default random CNN when no URL is given."""
    extractor = TorchScriptInception(url, storage_options) if url else RandomCnnFeatures()
    return extractor.eval()
