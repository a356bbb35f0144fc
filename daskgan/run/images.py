"""Images as the run directory stores them: tensors in [-1, 1] tiled into grids and encoded as PNG."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image


def image_grid(images: torch.Tensor, padding: int = 2, columns: int | None = None) -> torch.Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (C, H', W') uint8 image, as square as possible."""
    count, channels, height, width = images.shape
    columns = columns or grid_columns(count)
    rows = math.ceil(count / columns)
    grid = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), -1.0)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return to_uint8(grid)


def grid_columns(count: int) -> int:
    """Columns of the grid that tiles ``count`` images (as square as possible)."""
    return math.ceil(math.sqrt(count))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map values in [-1, 1] (clamped) to 0..255."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_bytes(image: torch.Tensor | Image.Image) -> bytes:
    """Encode a (3, H, W) or (1, H, W) uint8 tensor (RGB or grayscale) or a PIL image as PNG."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
