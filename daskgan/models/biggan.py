"""BigGAN (Brock et al. 2019) after ajbrock's BigGAN-PyTorch ``BigGAN.py``, class-conditional.

Generator: z split into chunks (hierarchical z): the first feeds a linear layer to a 4x4 map, each residual
up-sampling block gets the next chunk beside the shared class embedding as the input of its conditional
BatchNorms (gain and bias predicted from [embedding, z chunk]); one self-attention block at a chosen resolution;
BN, ReLU, 3x3 conv, tanh. Discriminator: residual down-sampling blocks (pre-activation after the first),
self-attention, ReLU, global sum pooling, a linear output plus the projection of the features onto the class
embedding. Every conv/linear/embedding is spectrally normalised (``sn_singular_values``, ``sn_iterations``).
Channel multipliers follow BigGAN's tables for 32, 64, 128 and 256 pixels; ``g_channels``/``d_channels`` are
BigGAN's ``ch`` (96 for ImageNet 128).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from daskgan.models.spectral import SNConv2d, SNEmbedding, SNLinear

# resolution -> (G block input multipliers, G block output multipliers, D block output multipliers, D down-samples)
ARCHITECTURES = {
    32: ([4, 4, 4], [4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2], [1, 2, 4, 8, 16], [True] * 4 + [False]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1], [1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
}

# The resolution BigGAN-PyTorch's D table gives each block, which decides where attention goes: the actual output
# size, except at 32 px, where every block is labelled 16 (so attention at 16 follows all four blocks)
D_BLOCK_LABELS = {32: [16, 16, 16, 16]}


class SN:
    """The spectral-norm settings every layer of one network shares."""

    def __init__(self, num_svs: int, num_itrs: int):
        self.num_svs, self.num_itrs = num_svs, num_itrs

    def conv(self, c_in: int, c_out: int, kernel: int = 3, bias: bool = True) -> SNConv2d:
        return SNConv2d(c_in, c_out, kernel, padding=kernel // 2, num_svs=self.num_svs, num_itrs=self.num_itrs,
                        bias=bias)

    def linear(self, f_in: int, f_out: int, bias: bool = True) -> SNLinear:
        return SNLinear(f_in, f_out, self.num_svs, self.num_itrs, bias=bias)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine part; gain (1 + ·) and bias come from the conditioning vector. The inner
    BatchNorm2d becomes cross-worker with ``model.sync_batchnorm``."""

    def __init__(self, channels: int, cond_dim: int, sn: SN):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = sn.linear(cond_dim, channels, bias=False), sn.linear(cond_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain, bias = 1 + self.gain(cond), self.bias(cond)
        return self.norm(x) * gain[:, :, None, None] + bias[:, :, None, None]


class ClassBatchNorm(ConditionalBatchNorm):
    """BatchNorm whose gain and bias are the class's own embeddings in this layer (SA-GAN; BigGAN-PyTorch without
    ``G_shared``): the conditioning is the label itself (indices, or class weights for a blend)."""

    def __init__(self, channels: int, num_classes: int):
        nn.Module.__init__(self)
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gain, bias = 1 + _embedded(self.gain, labels), _embedded(self.bias, labels)
        return self.norm(x) * gain[:, :, None, None] + bias[:, :, None, None]


def _embedded(embedding: nn.Embedding, labels: torch.Tensor) -> torch.Tensor:
    return labels.float() @ embedding.weight if labels.dim() == 2 else embedding(labels)


class GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, sn: SN, num_classes: int = 0):
        """``num_classes`` > 0: per-layer class embeddings (no shared embedding) instead of ``cond_dim`` inputs."""
        super().__init__()
        if num_classes:
            self.bn1, self.bn2 = ClassBatchNorm(c_in, num_classes), ClassBatchNorm(c_out, num_classes)
        else:
            self.bn1, self.bn2 = ConditionalBatchNorm(c_in, cond_dim, sn), ConditionalBatchNorm(c_out, cond_dim, sn)
        self.conv1, self.conv2, self.shortcut = sn.conv(c_in, c_out), sn.conv(c_out, c_out), sn.conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, cond)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, sn: SN, preactivation: bool, downsample: bool):
        super().__init__()
        self.conv1, self.conv2 = sn.conv(c_in, c_out), sn.conv(c_out, c_out)
        self.shortcut = sn.conv(c_in, c_out, 1) if c_in != c_out or downsample else None
        self.preactivation, self.downsample = preactivation, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x)))
        h = F.avg_pool2d(h, 2) if self.downsample else h
        return h + self._shortcut(x)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x
        if self.preactivation:  # conv then pool (cheaper the other way round when channels grow: BigGAN's order)
            x = self.shortcut(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        return self.shortcut(F.avg_pool2d(x, 2) if self.downsample else x)


class SelfAttention(nn.Module):
    """SA-GAN's non-local block: attention over all positions, keys/values pooled 2x, gated by a learned gamma
    that starts at 0 (the block begins as the identity)."""

    def __init__(self, channels: int, sn: SN):
        super().__init__()
        self.theta = sn.conv(channels, channels // 8, 1, bias=False)  # no biases, as BigGAN-PyTorch's Attention
        self.phi = sn.conv(channels, channels // 8, 1, bias=False)
        self.g = sn.conv(channels, channels // 2, 1, bias=False)
        self.out = sn.conv(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)
        g = F.max_pool2d(self.g(x), 2).flatten(2)
        attention = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (n, hw, hw/4)
        o = self.out((g @ attention.transpose(1, 2)).view(n, c // 2, h, w))
        return x + self.gamma * o


class Generator(nn.Module):
    """BigGAN's G. Class conditioning as BigGAN-PyTorch: ``shared`` (BigGAN) embeds the label once and every
    conditional BatchNorm maps [embedding, its z chunk] (``hierarchical``) or the embedding alone; without
    ``shared`` (SA-GAN) each BatchNorm has its own class embeddings and z enters only the first layer."""

    def __init__(self, resolution: int, num_classes: int, z_dim: int = 120, ch: int = 96, shared_dim: int = 128,
                 hierarchical: bool = True, attention: int = 64, sn: SN = SN(1, 1), image_channels: int = 3,
                 shared: bool = True, init: str = "ortho"):
        super().__init__()
        c_in, c_out, _, _ = ARCHITECTURES[resolution]
        self.z_dim, self.num_classes = z_dim, num_classes
        slots = len(c_in) + 1 if hierarchical else 1
        chunk = z_dim // slots
        self.z_split = [z_dim - chunk * (slots - 1)] + [chunk] * (slots - 1)
        self.shared = nn.Embedding(num_classes, shared_dim) if shared else None
        cond_dim = shared_dim + (chunk if hierarchical else 0)
        self.linear = sn.linear(self.z_split[0], c_in[0] * ch * 16)
        self.blocks = nn.ModuleList(GBlock(a * ch, b * ch, cond_dim, sn, 0 if shared else num_classes)
                                    for a, b in zip(c_in, c_out))
        self.attention = nn.ModuleDict({str(i): SelfAttention(b * ch, sn) for i, b in enumerate(c_out)
                                        if 8 * 2 ** i == attention})
        self.output = nn.Sequential(nn.BatchNorm2d(c_out[-1] * ch), nn.ReLU(), sn.conv(c_out[-1] * ch, image_channels),
                                    nn.Tanh())
        self.start_channels = c_in[0] * ch
        self.apply(INITS[init])

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels``: class indices (N,) or class weights (N, C) (a blend, for class interpolation)."""
        chunks = z.split(self.z_split, dim=1)
        if self.shared is None:
            conds = [labels]
        else:
            embedded = _embedded(self.shared, labels)
            conds = [torch.cat([embedded, c], dim=1) for c in chunks[1:]] or [embedded]
        h = self.linear(chunks[0]).view(z.shape[0], self.start_channels, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, conds[min(i, len(conds) - 1)])
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        return self.output(h)


class Discriminator(nn.Module):
    def __init__(self, resolution: int, num_classes: int, ch: int = 96, attention: int = 64, sn: SN = SN(1, 1),
                 image_channels: int = 3, init: str = "ortho"):
        super().__init__()
        _, _, c_out, downsample = ARCHITECTURES[resolution]
        c_in = [image_channels] + [c * ch for c in c_out[:-1]]
        self.blocks = nn.ModuleList(DBlock(a, b * ch, sn, preactivation=i > 0, downsample=down)
                                    for i, (a, b, down) in enumerate(zip(c_in, c_out, downsample)))
        sizes = D_BLOCK_LABELS.get(resolution) or [resolution // 2 ** (sum(downsample[:i + 1]))
                                                   for i in range(len(c_out))]
        self.attention = nn.ModuleDict({str(i): SelfAttention(b * ch, sn) for i, (b, size) in
                                        enumerate(zip(c_out, sizes)) if size == attention})
        self.linear = sn.linear(c_out[-1] * ch, 1)
        self.embed = SNEmbedding(num_classes, c_out[-1] * ch, sn.num_svs, sn.num_itrs)
        self.apply(INITS[init])

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = images
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        features = F.relu(h).sum(dim=[2, 3])
        return (self.linear(features).flatten() + (self.embed(labels) * features).sum(dim=1))


def _initialiser(weights: Callable[[torch.Tensor], Any]) -> Callable[[nn.Module], None]:
    """BigGAN-PyTorch's G_init/D_init: ``weights`` for conv, linear and embedding weights, zero biases."""

    def initialise(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
            weights(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    return initialise


INITS = {"ortho": _initialiser(nn.init.orthogonal_), "N02": _initialiser(lambda w: nn.init.normal_(w, 0.0, 0.02)),
         "xavier": _initialiser(nn.init.xavier_uniform_)}


def build(model_config, resolution: int, num_classes: int, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for ``model: {family: biggan, ...}`` (always class-conditional)."""
    m = model_config
    sn = SN(m.sn_singular_values, m.sn_iterations)
    return (Generator(resolution, num_classes, m.z_dim, m.g_channels, m.shared_dim, m.hierarchical,
                      m.attention_resolution, sn, channels, m.shared_embedding, m.init),
            Discriminator(resolution, num_classes, m.d_channels, m.attention_resolution, sn, channels, m.init))
