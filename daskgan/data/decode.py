"""Image bytes to training tensors: RGB, centre crop to a square, antialiased resize, values in [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes, resolution: int, channels: int = 3) -> torch.Tensor:
    """Decode image bytes to a (channels, R, R) float tensor in [-1, 1]: RGB (3) or grayscale (1), centre crop
    to square, resize."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image.convert("RGB" if channels == 3 else "L"))
    pixels = torch.from_numpy(pixels)
    return center_crop_resize(pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None], resolution)


def center_crop_resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crop a (C, H, W) uint8 image to its central square and resize it (antialiased bilinear) to R x R."""
    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top:top + side, left:left + side].float().unsqueeze(0)
    if side != resolution:
        square = F.interpolate(square, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False)
    return (square[0] / 127.5 - 1.0).clamp_(-1.0, 1.0)
