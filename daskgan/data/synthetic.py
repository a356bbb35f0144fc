"""A small procedurally drawn image dataset, so the demo and tests need no download.

Each class is a shape (circle, square, triangle, ring) drawn in a random colour, size and position over a
two-colour gradient background. Files go to ``<url>/<shape>/<index>.png``, so class subfolders become labels.
"""

from __future__ import annotations

import io
import logging
import random

from PIL import Image, ImageDraw

from daskgan.run import storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "ring")


def draw_image(shape: str, resolution: int, rng: random.Random) -> Image.Image:
    """One RGB image of ``shape``; everything else (colours, size, place) comes from ``rng``."""
    top, bottom = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    image = Image.linear_gradient("L").resize((resolution, resolution))
    image = Image.merge("RGB", [image.point(lambda v, a=a, b=b: a + (b - a) * v // 255)
                                for a, b in zip(top, bottom)])
    draw = ImageDraw.Draw(image)
    size = rng.uniform(0.3, 0.6) * resolution
    cx, cy = (rng.uniform(size / 2, resolution - size / 2) for _ in range(2))
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    colour = tuple(rng.randrange(256) for _ in range(3))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(size / 6)))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(url: str, images: int, resolution: int = 64, seed: int = 0,
                  storage_options: StorageOptions | None = None, shapes: tuple[str, ...] = SHAPES) -> list[str]:
    """Draw ``images`` images spread evenly over ``shapes`` and upload them under ``url``; returns their URLs."""
    rng = random.Random(seed)
    objects = {}
    for index in range(images):
        shape = shapes[index % len(shapes)]
        objects[storage.join(url, shape, f"{index:06d}.png")] = png_bytes(draw_image(shape, resolution, rng))
    storage.write_many(objects, storage_options)
    logger.info("wrote %d synthetic images (%dx%d, %d classes) to %s", images, resolution, resolution,
                len(shapes), url)
    return sorted(objects)
