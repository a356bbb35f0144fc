"""A small procedurally drawn image dataset, so the demo and tests need no download.

Each class is a shape (circle, square, triangle, ring) drawn in a random bright colour, size and position on a
plain dark background. Files go to ``<url>/<shape>/<index>.png``, so class subfolders become labels.
With ``class_hues`` each class keeps one hue (circles red, squares yellow-green, triangles cyan, rings violet;
brightness still random): a class-conditional model's grid rows then show their class within a few hundred steps,
in colour before the shapes sharpen, which the short example jobs need on two CPU cores.
"""

from __future__ import annotations

import colorsys
import logging
import random

from PIL import Image, ImageDraw

from daskgan.run import storage
from daskgan.run.images import png_bytes
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "ring")


def draw_image(shape: str, resolution: int, rng: random.Random, hue: float | None = None) -> Image.Image:
    """One RGB image of ``shape``; everything else (colours, size, place) comes from ``rng``. ``hue`` (0-1) fixes
    the shape's hue, keeping the brightness ``rng`` gives it; ``rng`` is drawn from the same either way."""
    background = tuple(rng.randrange(90) for _ in range(3))
    image = Image.new("RGB", (resolution, resolution), background)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(0.5, 0.8) * resolution
    cx, cy = (rng.uniform(size / 2, resolution - size / 2) for _ in range(2))
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    colour = tuple(rng.randrange(140, 256) for _ in range(3))
    if hue is not None:
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, max(colour) / 255))
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


def write_dataset(url: str, images: int, resolution: int = 64, seed: int = 0,
                  storage_options: StorageOptions | None = None, shapes: tuple[str, ...] = SHAPES,
                  class_hues: bool = False) -> list[str]:
    """Draw ``images`` images spread evenly over ``shapes`` and upload them under ``url``; returns their URLs.
    ``class_hues``: the shape at ``SHAPES`` position k has hue k/4, whichever ``shapes`` are drawn."""
    rng = random.Random(seed)
    objects = {}
    for index in range(images):
        shape = shapes[index % len(shapes)]
        hue = _class_hue(shape) if class_hues else None
        objects[storage.join(url, shape, f"{index:06d}.png")] = png_bytes(draw_image(shape, resolution, rng, hue))
    storage.write_many(objects, storage_options)
    logger.info("wrote %d synthetic images (%dx%d, %d classes) to %s", images, resolution, resolution,
                len(shapes), url)
    return sorted(objects)


def _class_hue(shape: str) -> float:
    """The hue of ``shape``'s class: evenly spaced round the colour wheel, so no two classes look alike."""
    return SHAPES.index(shape) / len(SHAPES)
