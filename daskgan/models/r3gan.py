"""R3GAN (Huang et al., "The GAN is dead; long live the GAN! A Modern GAN Baseline", NeurIPS 2024): a plain
residual G and D with no mapping network, modulation, noise inputs or normalisation.

G: z (with a class embedding appended) scales a learned 4x4 basis, then stages of residual blocks, each stage
after the first opening with a 1x1 convolution (when the width changes) and a [1, 3, 3, 1] FIR upsampling; a 1x1
convolution makes the image. D mirrors it: a 1x1 convolution from the image, stages of blocks each closed by a FIR
downsampling and a 1x1 convolution, and a head of a depthwise 4x4 convolution and a linear layer, projected on a
class embedding when conditional. A residual block is 1x1 -> grouped 3x3 -> 1x1 with the biases inside the
leaky ReLUs (no bias on the convolutions). Each stage runs in its own dtype (R3GAN's presets put the
highest-resolution stages in bfloat16); the networks return float32.

Initialisation (the paper's fix-up): every layer ~ N(0, gain / sqrt(fan_in)); in a block, the first two layers'
gain is the leaky ReLU's times L^(-1/4) for L blocks in all (the variance scaling that keeps the residual sum
bounded), and the last layer is zero, so each block starts as the identity.

``reference_state`` maps the state dict of R3GAN's ``training.networks.Generator`` / ``Discriminator`` (keys
``Model.`` + ``R3GAN.Networks``'s) onto these modules.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from daskgan.errors import CheckpointMismatch, ConfigError
from daskgan.models.layers import one_hot
from daskgan.models.resample import downsample2d, fir_filter, upsample2d

SLOPE = 0.2
LRELU_GAIN = math.sqrt(2 / (1 + SLOPE**2))
KERNEL_SIZE = 3
BASE_WIDTH = 768  # R3GAN's CIFAR-10 and FFHQ presets: 3/4 of 1024 up to 32 px, halved at each doubling beyond


def variance_scaled_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """``weight`` ~ N(0, gain / sqrt(fan_in)) in place (a zero gain gives zeros); fan_in counts the inputs one
    output sees (a grouped convolution's group, a linear layer's features)."""
    fan_in = weight[0].numel()
    with torch.no_grad():
        return weight.normal_(0, gain / math.sqrt(fan_in)) if gain else weight.zero_()


def conv(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1, gain: float = 1.0,
         padding: int | None = None) -> nn.Conv2d:
    """A convolution without bias, variance-scaled, padded to keep the size unless ``padding`` says otherwise."""
    padding = (kernel_size - 1) // 2 if padding is None else padding
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=False)
    variance_scaled_(layer.weight, gain)
    return layer


def linear(in_features: int, out_features: int, gain: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    variance_scaled_(layer.weight, gain)
    return layer


def apply_conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer`` in ``x``'s dtype (the weights stay float32; a bfloat16 stage computes in bfloat16)."""
    return F.conv2d(x, layer.weight.to(x.dtype), padding=layer.padding, groups=layer.groups)


def biased_lrelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x + bias.to(x.dtype).view(1, -1, 1, 1), SLOPE)


class ResidualBlock(nn.Module):
    """x + 1x1(lrelu(grouped 3x3(lrelu(1x1(x))))), the inner width ``expansion`` times the block's."""

    def __init__(self, channels: int, cardinality: int, expansion: int, total_blocks: int):
        super().__init__()
        inner = channels * expansion
        gain = LRELU_GAIN * total_blocks ** (-1 / 4)  # L^(-1/(2m-2)) with m = 3 layers a block
        self.conv1 = conv(channels, inner, gain=gain)
        self.conv2 = conv(inner, inner, KERNEL_SIZE, groups=cardinality, gain=gain)
        self.conv3 = conv(inner, channels, gain=0)
        self.bias1 = nn.Parameter(torch.zeros(inner))
        self.bias2 = nn.Parameter(torch.zeros(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = biased_lrelu(apply_conv(self.conv1, x), self.bias1)
        y = biased_lrelu(apply_conv(self.conv2, y), self.bias2)
        return x + apply_conv(self.conv3, y)


class Resample(nn.Module):
    """Twice (``up``) or half the resolution with the [1, 3, 3, 1] filter, and a 1x1 convolution to the new width
    when it changes: before upsampling, after downsampling (on the fewer pixels)."""

    def __init__(self, in_channels: int, out_channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = conv(in_channels, out_channels) if in_channels != out_channels else None
        self.register_buffer("kernel", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = x if self.conv is None else apply_conv(self.conv, x)
            return upsample2d(x, self.kernel)
        x = downsample2d(x, self.kernel)
        return x if self.conv is None else apply_conv(self.conv, x)


class GenerativeBasis(nn.Module):
    """The first 4x4 features: a learned basis per channel, scaled by a linear map of the latent."""

    def __init__(self, in_features: int, channels: int):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, 4, 4))
        self.linear = linear(in_features, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.linear(x, self.linear.weight.to(x.dtype))
        return self.basis.to(x.dtype)[None] * scale[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """D's head: a depthwise 4x4 convolution to one value per channel, then a linear layer."""

    def __init__(self, channels: int, out_features: int):
        super().__init__()
        self.depthwise = conv(channels, channels, 4, groups=channels, padding=0)
        self.linear = linear(channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_conv(self.depthwise, x).flatten(1)
        return F.linear(x, self.linear.weight.to(x.dtype))


class Stage(nn.Module):
    """A transition (G: before the blocks; D: after them) and residual blocks, run in ``dtype``."""

    def __init__(self, transition: nn.Module, blocks: list[ResidualBlock], transition_first: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.transition, self.blocks = transition, nn.ModuleList(blocks)
        self.transition_first, self.dtype = transition_first, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        x = self.transition(x) if self.transition_first else x
        for block in self.blocks:
            x = block(x)
        return x if self.transition_first else self.transition(x)


class Architecture:
    """Widths, cardinalities, block counts and dtypes per stage (G's order: 4 px first), from the model config."""

    def __init__(self, model_config, resolution: int):
        stages = int(math.log2(resolution)) - 1
        widths = list(model_config.stage_widths) or [BASE_WIDTH * 32 // max(32, 4 * 2**i) for i in range(stages)]
        blocks = list(model_config.stage_blocks) or [2] * stages  # R3GAN's presets: 2 blocks a stage
        for name, values in (("stage_widths", widths), ("stage_blocks", blocks)):
            if len(values) != stages:
                raise ConfigError(f"model.{name}: {resolution} px needs {stages} stages (4 px to {resolution} px), "
                                  f"got {len(values)}")
        if model_config.bf16_stages > stages:
            raise ConfigError(f"model.bf16_stages: at most the {stages} stages of {resolution} px, "
                              f"got {model_config.bf16_stages}")
        expansion, group = model_config.expansion, model_config.group_channels
        odd = [w for w in widths if w * expansion % group]
        if odd:
            raise ConfigError(f"model.stage_widths: each width times model.expansion ({expansion}) must divide into "
                              f"groups of model.group_channels ({group}); {odd} do not")
        self.widths, self.blocks, self.expansion = widths, blocks, expansion
        self.cardinalities = [w * expansion // group for w in widths]
        self.dtypes = [torch.bfloat16 if i >= stages - model_config.bf16_stages else torch.float32
                       for i in range(stages)]
        self.total_blocks = sum(blocks)

    def residual_blocks(self, stage: int) -> list[ResidualBlock]:
        return [ResidualBlock(self.widths[stage], self.cardinalities[stage], self.expansion, self.total_blocks)
                for _ in range(self.blocks[stage])]


class Generator(nn.Module):
    def __init__(self, z_dim: int, architecture: Architecture, num_classes: int = 0, channels: int = 3):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        embedding = z_dim if num_classes else 0  # R3GAN's presets: the class embedding as wide as z
        self.embed = linear(num_classes, embedding) if num_classes else None
        widths = architecture.widths
        stages = [Stage(GenerativeBasis(z_dim + embedding, widths[0]), architecture.residual_blocks(0), True,
                        architecture.dtypes[0])]
        stages += [Stage(Resample(widths[i - 1], widths[i], up=True), architecture.residual_blocks(i), True,
                         architecture.dtypes[i]) for i in range(1, len(widths))]
        self.stages = nn.ModuleList(stages)
        self.to_rgb = conv(widths[-1], channels)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = z.float()
        x = z if self.embed is None else torch.cat([z, self.embed(one_hot(labels, self.num_classes))], dim=1)
        for stage in self.stages:
            x = stage(x)
        return apply_conv(self.to_rgb, x).float()


class Discriminator(nn.Module):
    def __init__(self, architecture: Architecture, num_classes: int = 0, channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        widths, dtypes = architecture.widths[::-1], architecture.dtypes[::-1]
        self.from_rgb = conv(channels, widths[0])
        stages = [Stage(Resample(widths[i], widths[i + 1], up=False), architecture.residual_blocks(-1 - i), False,
                        dtypes[i]) for i in range(len(widths) - 1)]
        embedding = widths[-1] if num_classes else 1  # R3GAN's presets: the projection as wide as the head
        stages.append(Stage(DiscriminativeBasis(widths[-1], embedding), architecture.residual_blocks(0), False,
                            dtypes[-1]))
        self.stages = nn.ModuleList(stages)
        self.embed = linear(num_classes, embedding, gain=embedding**-0.5) if num_classes else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = apply_conv(self.from_rgb, images.to(self.stages[0].dtype))
        for stage in self.stages:
            x = stage(x)
        x = x.float()
        if self.embed is not None:
            x = (x * self.embed(one_hot(labels, self.num_classes))).sum(dim=1, keepdim=True)
        return x.view(x.shape[0])


def build(model_config, resolution: int, num_classes: int, channels: int = 3) -> tuple[Generator, Discriminator]:
    architecture = Architecture(model_config, resolution)
    return (Generator(model_config.z_dim, architecture, num_classes, channels),
            Discriminator(architecture, num_classes, channels))


# R3GAN's layer names -> ours, within a stage's transition or block, then for the networks' own layers.
LAYER_NAMES = [(r"LinearLayer(\d)\.Layer\.weight", r"conv\1.weight"), (r"NonLinearity(\d)\.Bias", r"bias\1"),
               (r"LinearLayer\.Layer\.weight", "conv.weight"), (r"LinearLayer\.weight", "linear.weight"),
               (r"Basis\.weight", "depthwise.weight"), (r"Basis", "basis")]
NETWORK_NAMES = {"AggregationLayer.Layer.weight": "to_rgb.weight", "ExtractionLayer.Layer.weight": "from_rgb.weight",
                 "EmbeddingLayer.weight": "embed.weight"}
STAGE_LAYER = re.compile(r"MainLayers\.(\d+)\.Layers\.(\d+)\.(.+)")


def reference_state(state: dict[str, torch.Tensor], generator: bool) -> dict[str, torch.Tensor]:
    """Our state dict from R3GAN's (``training.networks`` keys: ``Model.`` + ``R3GAN.Networks``') of a G
    (``generator``) or D. Its resampling kernels are checked to be the [1, 3, 3, 1] filter ours apply (they are
    constants, not state, here) and dropped."""
    ours = {}
    for name, tensor in state.items():
        key = name.removeprefix("Model.")
        if key.endswith("Resampler.Kernel"):
            _check_kernel(name, tensor)
            continue
        ours[_our_name(key, name, generator)] = tensor
    return ours


def _our_name(key: str, name: str, generator: bool) -> str:
    if key in NETWORK_NAMES:
        return NETWORK_NAMES[key]
    match = STAGE_LAYER.fullmatch(key)
    renamed = _layer_name(match[3]) if match else None
    if renamed is None:
        raise CheckpointMismatch(f"{name}: not a parameter of R3GAN's {'generator' if generator else 'discriminator'}")
    stage, index = int(match[1]), int(match[2])
    if generator:  # the transition first, then the blocks
        part = "transition" if index == 0 else f"blocks.{index - 1}"
    else:  # the blocks, then the transition (told by its layers' names: a block's are numbered)
        part = f"blocks.{index}" if re.match(r"(LinearLayer|NonLinearity)\d", match[3]) else "transition"
    return f"stages.{stage}.{part}.{renamed}"


def _layer_name(rest: str) -> str | None:
    for pattern, replacement in LAYER_NAMES:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement, rest)
    return None


def _check_kernel(name: str, kernel: torch.Tensor) -> None:
    expected = fir_filter()
    if kernel.shape != expected.shape or not torch.allclose(kernel.float(), expected):
        raise CheckpointMismatch(f"{name}: a resampling filter other than R3GAN's [1, 3, 3, 1] default")
