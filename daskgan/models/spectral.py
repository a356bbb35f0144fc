"""Spectral normalisation (Miyato et al. 2018) as in ajbrock's BigGAN-PyTorch: the weight is divided by its largest
singular value, estimated by power iteration with vectors kept between steps. ``num_svs`` singular values are
tracked (Gram-Schmidt keeps the vectors apart; the extra ones are for monitoring), with ``num_itrs`` iterations
per training forward. torch's own spectral_norm tracks only the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def power_iteration(weight: torch.Tensor, us: list[torch.Tensor], iterations: int,
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Refine the left vectors ``us`` (each (1, rows)) of ``weight`` (rows, cols); returns the new vectors and
    the singular value estimates, largest first."""
    for _ in range(iterations):
        vs: list[torch.Tensor] = []
        new_us: list[torch.Tensor] = []
        for u in us:
            v = F.normalize(_orthogonalise(u @ weight, vs), dim=1, eps=1e-12)
            vs.append(v)
            new_us.append(F.normalize(_orthogonalise(v @ weight.T, new_us), dim=1, eps=1e-12))
        us = new_us
    svs = [((v @ weight.T) * u).sum() for u, v in zip(us, vs)]
    return us, svs


def _orthogonalise(x: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    for other in others:
        x = x - (x @ other.T) * other
    return x


class SpectralNorm:
    """Mixin for a layer with a ``weight``: ``normalised_weight()`` is weight / sigma_max, updating the stored
    vectors while training (they are buffers, so checkpoints and DDP's buffer broadcast keep ranks in step)."""

    def init_spectral_norm(self, num_svs: int = 1, num_itrs: int = 1) -> None:
        self.num_svs, self.num_itrs = num_svs, num_itrs
        rows = self.weight.shape[0]
        for i in range(num_svs):
            self.register_buffer(f"u{i}", F.normalize(torch.randn(1, rows), dim=1))
            self.register_buffer(f"sv{i}", torch.ones(1))

    def singular_values(self) -> list[torch.Tensor]:
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def normalised_weight(self) -> torch.Tensor:
        matrix = self.weight.reshape(self.weight.shape[0], -1)
        us = [getattr(self, f"u{i}") for i in range(self.num_svs)]
        if not self.training:  # as BigGAN-PyTorch: one more power step, its vectors not kept
            with torch.no_grad():
                _, svs = power_iteration(matrix, us, self.num_itrs)
            return self.weight / svs[0]
        with torch.no_grad():
            us, _ = power_iteration(matrix, us, self.num_itrs)
            for i, u in enumerate(us):
                getattr(self, f"u{i}").copy_(u)
        # the estimate is differentiable in the weight (through the fixed vectors), as in BigGAN
        svs = [(_right(matrix, u) @ matrix.T * u).sum() for u in us]
        with torch.no_grad():
            for i, sv in enumerate(svs):
                getattr(self, f"sv{i}").copy_(sv.detach())
        return self.weight / svs[0]


def _right(matrix: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.normalize((u @ matrix).detach(), dim=1, eps=1e-12)


class SNConv2d(nn.Conv2d, SpectralNorm):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 num_svs: int = 1, num_itrs: int = 1, bias: bool = True):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.init_spectral_norm(num_svs, num_itrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalised_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, SpectralNorm):
    def __init__(self, in_features: int, out_features: int, num_svs: int = 1, num_itrs: int = 1,
                 bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self.init_spectral_norm(num_svs, num_itrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalised_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNorm):
    """Class embedding of the projection discriminator, spectrally normalised like its other layers."""

    def __init__(self, num_embeddings: int, embedding_dim: int, num_svs: int = 1, num_itrs: int = 1):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self.init_spectral_norm(num_svs, num_itrs)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        weight = self.normalised_weight()
        return labels.float() @ weight if labels.dim() == 2 else F.embedding(labels, weight)
