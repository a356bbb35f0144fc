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
import logging
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from daskgan import storage
from daskgan.storage import StorageOptions

logger = logging.getLogger(__name__)


class RandomCnnFeatures(nn.Module):
    """The default extractor: random but fixed convolutions (seed 0), the same on every machine with this torch."""

    name = "random-cnn-v1"

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

    def __init__(self, url: str, storage_options: StorageOptions | None = None):
        super().__init__()
        self.detector = torch.jit.load(io.BytesIO(storage.read_bytes(url, storage_options)), map_location="cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return self.detector(pixels, return_features=True)


def load_extractor(url: str | None, storage_options: StorageOptions | None = None) -> nn.Module:
    """The Inception TorchScript at ``url``, or the default random CNN when no URL is given."""
    extractor = TorchScriptInception(url, storage_options) if url else RandomCnnFeatures()
    return extractor.eval()


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition; tiny negative eigenvalues
    from rounding are clipped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½), with tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), a symmetric PSD
    root (no complex parts to discard, unlike scipy's general sqrtm)."""
    root1 = sqrtm_psd(sigma1)
    cross = sqrtm_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross.trace())


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of (N, D) features."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018) as NVlabs computes it: the unbiased MMD² with the cubic
    polynomial kernel (x·y/d + 1)³, averaged over random subsets."""
    real, fake = real.double(), fake.double()
    n = min(len(real), len(fake), subset_size)
    dim = real.shape[1]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = fake[torch.randperm(len(fake), generator=generator)[:n]]
        y = real[torch.randperm(len(real), generator=generator)[:n]]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += float((a.sum() - a.diagonal().sum()) / (n - 1) - b.sum() * 2 / n)
    return total / subsets / n


def embed_share(count: int, images_of: Callable[[list[int]], torch.Tensor], extractor: nn.Module,
                batch_size: int = 64) -> torch.Tensor:
    """Features of items 0..count-1, this rank embedding items rank, rank + world, ...; all ranks get all, in
    item order. ``images_of(indices)`` returns those items' images (N, 3, H, W) in [-1, 1]."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, count, world))
    chunks = [extractor(images_of(mine[i:i + batch_size])) for i in range(0, len(mine), batch_size)]
    local = torch.cat(chunks).double() if chunks else torch.zeros(0, 0, dtype=torch.float64)
    if world == 1:
        return local.cpu()
    return _gather_in_item_order(local, count, world)


def _gather_in_item_order(local: torch.Tensor, count: int, world: int) -> torch.Tensor:
    shares = [None] * world
    dist.all_gather_object(shares, local.cpu())  # shares differ in length by at most one item
    features = torch.empty(count, shares[0].shape[1], dtype=torch.float64)
    for rank, share in enumerate(shares):
        features[rank::world] = share
    return features


METRICS = ("fid", "kid")  # both: lower is better


def compute(names: list[str], real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000) -> dict[str, float]:
    """The requested metrics (``fid``, ``kid``) of generated against real features."""
    functions = {"fid": fid, "kid": lambda r, f: kid(r, f, subset_size=kid_subset_size)}
    return {name: functions[name](real, fake) for name in names}
