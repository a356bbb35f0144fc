"""StyleGAN2 networks (Karras et al. 2020) in plain PyTorch, after NVlabs' ``training/networks.py``.

Generator: mapping network (normalised z -> w through ``mapping_layers`` equalised-lr layers with a 0.01 learning
rate multiplier, tracked average w for truncation), synthesis network with a learned constant 4x4 input, modulated /
demodulated 3x3 convolutions, per-layer noise, and skip (toRGB) outputs; style mixing while training (one cutoff per
batch, as NVlabs).
Discriminator: residual blocks from fromRGB down to 4x4, minibatch standard deviation, conv, fc, logit.
Channels per resolution: min(32768 * fmaps / resolution, channel_max).

Class-conditional (``model.conditional``): G's mapping takes the normalised embedding of the one-hot label beside
the normalised z; D projects its last features onto a mapping of the label (NVlabs' ``cmap``).

Resampling is NVlabs': the [1, 3, 3, 1] FIR filter (``daskgan.models.resample``), G's up-sampling convs as
stride-2 transposed convs, D's down-sampling after filtering; conv activations are clamped to ±256 (NVlabs'
default ``conv_clamp``). With NVlabs' weights (``daskgan.pretrained``) the networks give their outputs (tested
to 1e-4 against their code's).

Reduced precision (``train.precision: bf16|fp16``): the convolutions of the highest ``n`` resolutions of G and D
run under autocast. What stays fp32: the parameters
and optimizer states (autocast casts per op), the mapping networks, the style affines and the weight
(de)modulation, the toRGB image path (each block's RGB is added in fp32), the lower-resolution blocks, D's
epilogue (minibatch std, conv, fc, logit, projection), the losses and the R1 / path-length gradients.

Unlike NVlabs there are no custom CUDA kernels: everything is plain PyTorch (``torch.compile`` optional).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from daskgan.models.layers import one_hot
from daskgan.models.resample import downsample2d, fir_filter, upfirdn2d, upsample2d

LRELU_GAIN = math.sqrt(2)
D_ARCHITECTURES = {"resnet": True, "orig": False}  # D architecture -> whether its blocks have residual skips
D_MAPPING_LAYERS = 8  # depth of D's label mapping: NVlabs' default whatever G's mapping depth
CONV_CLAMP = 256.0  # activations of reduced-precision layers are clamped to +-CONV_CLAMP (NVlabs' conv_clamp)


def channels_at(resolution: int, fmaps: float, channel_max: int) -> int:
    return max(1, min(int(32768 * fmaps / resolution), channel_max))


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate (weights scaled at run time, not at init)."""

    def __init__(self, in_features: int, out_features: int, activation: bool = False, lr_multiplier: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.lr_multiplier, self.activation = lr_multiplier, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_multiplier)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate; ``down`` halves the resolution with NVlabs' FIR filter (a 1x1
    conv after filtering, a 3x3 one with stride 2 on the filtered input). Activated layers clamp at
    ±``CONV_CLAMP``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, activation: bool = True, bias: bool = True,
                 down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.activation, self.down = activation, down
        if down:
            self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        weight = self.weight * self.weight_gain
        kernel = weight.shape[-1]
        if not self.down:
            x = F.conv2d(x, weight, self.bias, padding=kernel // 2)
        elif kernel == 1:
            x = F.conv2d(downsample2d(x, self.resample_filter), weight, self.bias)
        else:
            x = F.conv2d(upfirdn2d(x, self.resample_filter, padding=_padding_before_strided_conv(
                kernel, self.resample_filter)), weight, self.bias, stride=2)
        if not self.activation:
            return x * gain
        return clamp_activations(F.leaky_relu(x, 0.2) * LRELU_GAIN * gain, gain)


def _padding_before_strided_conv(kernel: int, fir: torch.Tensor) -> tuple[int, int, int, int]:
    """Padding of the filtered input of a stride-2 ``kernel``-wide conv, so the output is half the input."""
    taps = fir.shape[-1]
    before, after = kernel // 2 + (taps - 1) // 2, kernel // 2 + (taps - 2) // 2
    return before, after, before, after


def _transposed_conv_up(x: torch.Tensor, weight: torch.Tensor, fir: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``kernel``-wide conv at twice the resolution, as NVlabs: a stride-2 transposed conv (which convolves,
    i.e. flips the kernel relative to ``conv2d``), then the FIR filter with gain 4 trims it to exactly 2x."""
    out_channels, in_channels, kernel, _ = weight.shape
    per_group = out_channels // groups
    weight = weight.reshape(groups, per_group, in_channels, kernel, kernel).transpose(1, 2)
    x = F.conv_transpose2d(x, weight.reshape(groups * in_channels, per_group, kernel, kernel), stride=2,
                           groups=groups)
    taps = fir.shape[-1]
    before = kernel // 2 + (taps + 1) // 2 - (kernel - 1)
    after = kernel // 2 + (taps - 2) // 2 - (kernel - 2)
    return upfirdn2d(x, fir, padding=(before, after, before, after), gain=4)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     up_filter: torch.Tensor | None = None) -> torch.Tensor:
    """Convolve each sample with ``weight`` scaled per input channel by its ``styles``; with ``demodulate`` each
    output filter is renormalised to unit norm, so unit-variance inputs give unit-variance outputs. With
    ``up_filter`` the output has twice the resolution (``_transposed_conv_up``)."""
    n, in_channels, height, width = x.shape
    out_channels, _, kernel, _ = weight.shape
    w = weight.unsqueeze(0) * styles[:, None, :, None, None]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
    x = x.reshape(1, n * in_channels, height, width)
    w = w.reshape(n * out_channels, in_channels, kernel, kernel)
    if up_filter is not None:
        out = _transposed_conv_up(x, w, up_filter, groups=n)
    else:
        out = F.conv2d(x, w, padding=kernel // 2, groups=n)
    return out.reshape(n, out_channels, *out.shape[2:])


class SynthesisLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.up = up
        if up:
            self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, fp32_styles(self.affine, w),
                             up_filter=self.resample_filter if self.up else None)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        return clamp_activations(F.leaky_relu(x + self.bias[None, :, None, None].to(x.dtype), 0.2) * LRELU_GAIN)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, w_dim: int, image_channels: int = 3):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(image_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(image_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = fp32_styles(self.affine, w) * self.weight_gain
        rgb = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return clamp_activations(rgb.float() + self.bias[None, :, None, None])


def fp32_styles(affine: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Styles from w, always in fp32: they scale every weight of a layer, too coarse a knob for bf16/fp16."""
    with torch.autocast(w.device.type, enabled=False):
        return affine(w.float())


def clamp_activations(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """NVlabs' ``conv_clamp``: conv outputs (after activation and ``gain``) within ±CONV_CLAMP·gain, so fp16
    cannot overflow; their default applies it in fp32 layers too."""
    return x.clamp(-CONV_CLAMP * gain, CONV_CLAMP * gain)


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` for a reduced-precision block, or nothing for an fp32 one."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class ReducedPrecisionBlocks:
    """Mixin for networks whose blocks know their ``resolution`` and honour a ``compute_dtype``."""

    def use_reduced_precision(self, dtype: torch.dtype, resolutions: int) -> None:
        """Run the blocks of the ``resolutions`` highest resolutions in ``dtype`` (the rest stay fp32)."""
        lowest = self.resolution // 2 ** (resolutions - 1)
        for block in self.blocks:
            block.compute_dtype = dtype if block.resolution >= lowest else None


class SynthesisBlock(nn.Module):
    """One resolution: (constant input or 2x up-sampling conv), conv, and a toRGB added to the up-sampled image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, image_channels: int = 3):
        super().__init__()
        self.resolution, self.compute_dtype = resolution, None
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.convs = nn.ModuleList([SynthesisLayer(out_channels, out_channels, w_dim, 4)])
        else:
            self.convs = nn.ModuleList([SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True),
                                        SynthesisLayer(out_channels, out_channels, w_dim, resolution)])
        self.torgb = ToRGB(out_channels, w_dim, image_channels)
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x, image, ws: torch.Tensor, noise_mode: str):
        if self.first:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        with autocast_to(ws.device, self.compute_dtype):
            for i, conv in enumerate(self.convs):
                x = conv(x, ws[:, i], noise_mode)
            rgb = self.torgb(x, ws[:, len(self.convs)])
        image = rgb if image is None else upsample2d(image, self.resample_filter) + rgb
        return x, image


def normalize_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    """z (and, when ``num_classes`` > 0, the embedded label) -> w; without z it maps labels alone (D's cmap)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, num_classes: int = 0, lr_multiplier: float = 0.01,
                 w_avg_beta: float | None = 0.995):
        """``w_avg_beta`` None: no average w is tracked (D's label mapping, which is never truncated)."""
        super().__init__()
        self.num_classes = num_classes
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, activation=True, lr_multiplier=lr_multiplier)
                                   for a, b in zip(dims, dims[1:])])
        if w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    def forward(self, z: torch.Tensor | None, labels: torch.Tensor | None = None,
                update_w_avg: bool = True) -> torch.Tensor:
        parts = [] if z is None else [normalize_2nd_moment(z)]
        if self.embed is not None:
            parts.append(normalize_2nd_moment(self.embed(one_hot(labels, self.num_classes))))
        w = self.net(torch.cat(parts, dim=1))
        if self.training and update_w_avg and self.w_avg_beta is not None:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return w


class Generator(ReducedPrecisionBlocks, nn.Module):
    def __init__(self, resolution: int, z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8,
                 fmaps: float = 0.5, channel_max: int = 512, style_mixing: float = 0.9, num_classes: int = 0,
                 image_channels: int = 3):
        super().__init__()
        self.resolution, self.z_dim, self.style_mixing = resolution, z_dim, style_mixing
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes)
        resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels_at(max(r // 2, 4), fmaps, channel_max), channels_at(r, fmaps, channel_max),
                           w_dim, r, image_channels)
            for r in resolutions)
        self.num_ws = sum(len(b.convs) for b in self.blocks) + 1

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, truncation_psi: float = 1.0,
                noise_mode: str | None = None, return_ws: bool = False):
        """``labels``: class indices (N,) or class weights (N, C) for conditional models. ``noise_mode``: random,
        const (fixed per-layer noise, as NVlabs' snapshots) or none; by default random while training and const in
        eval mode. ``return_ws`` also returns the per-layer w's the image was made from (for path length)."""
        noise_mode = noise_mode or ("random" if self.training else "const")
        ws = self.map_to_w(z, labels).unsqueeze(1).repeat(1, self.num_ws, 1)
        if self.training and self.style_mixing > 0:
            ws = self._mix_styles(ws, labels)
        if truncation_psi != 1:
            ws = self.mapping.w_avg.lerp(ws, truncation_psi)
        image = self.synthesize(ws, noise_mode)
        return (image, ws) if return_ws else image

    # what train.compile compiles (daskgan.training.compiled): the networks, not the style mixing's draws, which
    # are read on the host (one cutoff and one coin per batch) and would break the graph
    compiled_parts = ("map_to_w", "synthesize")

    def map_to_w(self, z: torch.Tensor, labels: torch.Tensor | None, update_w_avg: bool = True) -> torch.Tensor:
        """One w per image (the mapping network)."""
        return self.mapping(z, labels, update_w_avg=update_w_avg)

    def synthesize(self, ws: torch.Tensor, noise_mode: str) -> torch.Tensor:
        """The image from its per-layer w's."""
        x = image = None
        index = 0
        for block in self.blocks:
            x, image = block(x, image, ws[:, index:index + len(block.convs) + 1], noise_mode)
            index += len(block.convs)
        return image

    def _mix_styles(self, ws: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """As NVlabs, once per batch: with probability ``style_mixing`` the layers from a random cutoff on take
        the w of a second z; that second mapping leaves the average w alone. The cutoff and the coin are drawn
        from torch's CPU generator and read there: no device waits for them."""
        cutoff = int(torch.randint(1, self.num_ws, ()))
        if float(torch.rand(())) >= self.style_mixing:
            return ws
        other = self.map_to_w(torch.randn(ws.shape[0], self.z_dim, device=ws.device), labels, update_w_avg=False)
        return torch.cat([ws[:, :cutoff], other.unsqueeze(1).expand(-1, self.num_ws - cutoff, -1)], dim=1)


class MinibatchStd(nn.Module):
    """Appends the standard deviation across groups of samples as an extra feature map (fights mode collapse)."""

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = min(self.group_size, n)
        while n % group:
            group -= 1
        y = x.reshape(group, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=[1, 2, 3])
        y = y.reshape(-1, 1, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """fromrgb (top block only), conv0, conv1 halving the resolution; ``residual`` (NVlabs' ``resnet``) adds a
    1x1 down-sampled skip, both paths scaled by √½; without it (``orig``) the convs alone."""

    def __init__(self, in_channels: int, out_channels: int, from_rgb: bool, resolution: int, residual: bool = True,
                 image_channels: int = 3):
        super().__init__()
        self.resolution, self.compute_dtype = resolution, None
        self.fromrgb = EqualConv2d(image_channels, in_channels, 1) if from_rgb else None
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = (EqualConv2d(in_channels, out_channels, 1, activation=False, bias=False, down=True)
                     if residual else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            x = x.float()  # coming from a reduced-precision block above
        with autocast_to(x.device, self.compute_dtype):
            if self.fromrgb is not None:
                x = self.fromrgb(x)
            if self.skip is None:
                return self.conv1(self.conv0(x))
            residual = self.skip(x, gain=math.sqrt(0.5))
            return residual + self.conv1(self.conv0(x), gain=math.sqrt(0.5))


class Discriminator(ReducedPrecisionBlocks, nn.Module):
    def __init__(self, resolution: int, fmaps: float = 0.5, channel_max: int = 512, mbstd_group: int = 4,
                 num_classes: int = 0, mapping_layers: int = D_MAPPING_LAYERS, architecture: str = "resnet",
                 image_channels: int = 3):
        super().__init__()
        self.resolution = resolution
        resolutions = [2 ** i for i in range(int(math.log2(resolution)), 2, -1)]
        self.blocks = nn.Sequential(*[
            DiscriminatorBlock(channels_at(r, fmaps, channel_max), channels_at(r // 2, fmaps, channel_max),
                               from_rgb=(r == resolution), resolution=r, residual=D_ARCHITECTURES[architecture],
                               image_channels=image_channels)
            for r in resolutions])
        channels = channels_at(4, fmaps, channel_max)
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv = EqualConv2d(channels + 1, channels, 3)
        self.fc = EqualLinear(channels * 16, channels, activation=True)
        # conditional: the output is the projection of `channels` features onto the label's mapping (cmap)
        self.out = EqualLinear(channels, channels if num_classes else 1)
        self.cmap = MappingNetwork(0, channels, mapping_layers, num_classes, w_avg_beta=None) if num_classes else None

    def freeze(self, layers: int) -> None:
        """Freeze-D (Mo et al. 2020) as NVlabs' ``--freezed``: the first ``layers`` layers counted from the
        image (per block: fromrgb, conv0, conv1, skip) keep their weights; the epilogue always trains."""
        in_order = [layer for block in self.blocks for layer in (block.fromrgb, block.conv0, block.conv1, block.skip)
                    if layer is not None]
        for layer in in_order[:layers]:
            layer.requires_grad_(False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(self.mbstd(self.blocks(images).float()))
        x = self.out(self.fc(x.flatten(1)))
        if self.cmap is None:
            return x.flatten()
        return (x * self.cmap(None, labels)).sum(dim=1) / math.sqrt(x.shape[1])


def build(model_config, resolution: int, num_classes: int, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for ``model: {family: stylegan2, ...}``; ``num_classes`` > 0: conditional."""
    m = model_config
    return (Generator(resolution, m.z_dim, m.w_dim, m.mapping_layers, m.fmaps, m.channel_max, m.style_mixing,
                      num_classes, channels),
            Discriminator(resolution, m.fmaps, m.channel_max, m.mbstd_group, num_classes,
                          architecture=m.d_architecture, image_channels=channels))
