"""Resampling with a separable FIR filter, in plain PyTorch: what NVlabs' ``upfirdn2d`` computes, without a
custom CUDA extension.

``upfirdn2d`` upsamples by inserting zeros, pads (negative padding crops), filters each channel with a 2-D FIR
kernel, and keeps every ``down``-th pixel. StyleGAN2 resamples everywhere with the normalised [1, 3, 3, 1] kernel:
upsampling multiplies by ``up²`` so that a constant image stays constant after the zeros are inserted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Padding = tuple[int, int, int, int]  # left, right, top, bottom


def fir_filter(taps: list[float] = (1, 3, 3, 1), device: torch.device | None = None) -> torch.Tensor:
    """The 2-D filter of a 1-D kernel (outer product), normalised to sum 1."""
    kernel = torch.as_tensor(taps, dtype=torch.float32, device=device)
    kernel = torch.outer(kernel, kernel)
    return kernel / kernel.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, padding: Padding = (0, 0, 0, 0),
              gain: float = 1.0, flip_kernel: bool = False) -> torch.Tensor:
    """Upsample by ``up`` (zero insertion), pad, convolve each channel with ``kernel`` times ``gain``, then keep
    every ``down``-th pixel. As NVlabs, the kernel is convolved (flipped), unless ``flip_kernel``."""
    n, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(n, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, channels, height * up, width * up)
    left, right, top, bottom = padding
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[:, :, max(-top, 0):x.shape[2] - max(-bottom, 0), max(-left, 0):x.shape[3] - max(-right, 0)]
    weight = (kernel * gain).to(x.dtype)
    if not flip_kernel:
        weight = weight.flip([0, 1])
    weight = weight[None, None].repeat(channels, 1, 1, 1)
    x = F.conv2d(x, weight, groups=channels)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Twice (``up``) the resolution, padded so that the output is exactly ``up`` times the input."""
    size = kernel.shape[-1]
    before, after = (size + up - 1) // 2, (size - up) // 2
    return upfirdn2d(x, kernel, up=up, padding=(before, after, before, after), gain=up * up)


def downsample2d(x: torch.Tensor, kernel: torch.Tensor, down: int = 2) -> torch.Tensor:
    """Half (``down``) the resolution: filter, then keep every ``down``-th pixel."""
    size = kernel.shape[-1]
    before, after = (size - down + 1) // 2, (size - down) // 2
    return upfirdn2d(x, kernel, down=down, padding=(before, after, before, after))


def filter2d(x: torch.Tensor, kernel: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """Filter at the same resolution, ``padding`` pixels larger on each side."""
    size = kernel.shape[-1]
    before, after = padding + size // 2, padding + (size - 1) // 2
    return upfirdn2d(x, kernel, padding=(before, after, before, after))
