"""Image bytes to training tensors: RGB, centre crop to a square, antialiased resize, values in [-1, 1].

The stream keeps images uint8 (``decode_uint8``, as NVlabs' datasets keep them) and the training step converts a
whole batch to [-1, 1] on its device: per-image float conversion and stacking cost several times the decoding of a
256 px JPEG here, and uint8 is a quarter of the bytes to queue and to copy to a GPU.

Pillow decodes everything; where installed (the ``fast-decode`` extra), pyspng decodes 8-bit PNGs and
simplejpeg YCbCr/grayscale JPEGs to RGB, both several times faster. They are used only where their pixels are
Pillow's exactly (tested); anything else, and anything they fail on, goes to Pillow.

Pillow opens only the formats training takes (``TRAINING_FORMATS``): left to itself it tries every format it knows,
and an EPS file named ``x.png`` makes it start Ghostscript. Whatever goes wrong while one image is decoded makes
that image unreadable (``UnreadableImage``), which every reader skips and counts: Pillow's plugins raise whatever
their parsing meets (a crafted TIFF raises ``OverflowError``), and one error let through stops a run at the same
image on every restart.
"""

from __future__ import annotations

import contextlib
import io
import struct
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TRAINING_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # Pillow's names; PPM reads PGM too
PNG_SIGNATURE, JPEG_SIGNATURE = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's for 16-bit grayscale PNG, TIFF, PGM

try:
    import pyspng
except ImportError:
    pyspng = None
try:
    import simplejpeg
except ImportError:
    simplejpeg = None


class UnreadableImage(ValueError):
    """An image that cannot be decoded, whatever the reason (named in the message): skipped and counted."""


DECODE_ERRORS = (UnreadableImage,)  # what a reader of images catches: every decoding error becomes this
GONE_OR_UNREADABLE = (FileNotFoundError, *DECODE_ERRORS)  # what ``decode_fetched`` raises for an image to skip


@contextlib.contextmanager
def decoding_one_image(name: str = "") -> Iterator[None]:
    """Any exception raised inside is this image's fault: raised again as ``UnreadableImage`` saying what it was
    (after the image's ``name``, when given). Also a decorator."""
    try:
        yield
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 - see the module's docstring
        raise UnreadableImage(f"{name}{': ' if name else ''}{type(error).__name__}: {error}") from error


def open_image(data: bytes) -> Image.Image:
    """``data`` opened by Pillow in one of ``TRAINING_FORMATS``, never another (no plugin that runs a program)."""
    return Image.open(io.BytesIO(data), formats=TRAINING_FORMATS)


def decode_image(data: bytes, resolution: int, channels: int = 3) -> torch.Tensor:
    """Decode image bytes to a (channels, R, R) float tensor in [-1, 1]: RGB (3) or grayscale (1), centre crop
    to square, resize."""
    return to_unit_range(decode_uint8(data, resolution, channels))


def decode_fetched(fetched: bytes | BaseException, resolution: int, channels: int = 3) -> torch.Tensor:
    """A fetched image (its bytes, or the error standing for an image that is gone: a vanished object, a corrupt
    member) as ``decode_image`` decodes it; one that is gone or does not decode raises one of
    ``GONE_OR_UNREADABLE``, for the reader to skip or replace it (the grid of reals, evaluation's reals)."""
    if not isinstance(fetched, bytes):
        raise fetched
    return decode_image(fetched, resolution, channels)


def decode_uint8(data: bytes, resolution: int, channels: int = 3) -> torch.Tensor:
    """``decode_image``'s pixels before the conversion to [-1, 1]: (channels, R, R) uint8."""
    return torch.from_numpy(decode_array(data, resolution, channels))


@decoding_one_image()
def decode_array(data: bytes, resolution: int, channels: int = 3) -> np.ndarray:
    """``decode_uint8``'s pixels as a numpy array. An image already R x R (a prepared dataset's) takes no torch
    operation at all: at ~20 us per 64 px PNG, the few microseconds of each one would be a large share.
    Raises ``UnreadableImage`` for an image that does not decode."""
    pixels = decode_pixels(data, channels)
    planes = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
    if planes.shape[1:] == (resolution, resolution):
        return planes
    return center_crop_resize(torch.from_numpy(planes), resolution).numpy()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) as float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


@decoding_one_image()
def decode_pixels(data: bytes, channels: int = 3) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 pixels, as Pillow's ``convert("RGB")`` or ``convert("L")`` gives them."""
    fast = fast_pixels(data, channels)
    if fast is not None:
        return fast
    with open_image(data) as image:
        return np.array(to_channels(image, channels))


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` in RGB (3) or grayscale (1), as Pillow converts it; but a 16-bit grayscale image keeps its high
    byte, as Pillow reads 16-bit RGB. Pillow's own conversion clips such an image at 255, which turns a 16-bit
    scan (medical and astronomy data, the usual 1-channel sets) white."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8), "L")
    return image.convert("RGB" if channels == 3 else "L")


def fast_pixels(data: bytes, channels: int) -> np.ndarray | None:
    """pyspng's or simplejpeg's pixels where they equal Pillow's conversion, else None (Pillow decodes)."""
    try:
        if pyspng is not None and data.startswith(PNG_SIGNATURE) and _png_pixels_allowed(data):
            pixels = pyspng.load(data)
            if pixels.dtype != np.uint8:
                return None  # 16-bit: Pillow's own conversion
            if channels == 1:
                return pixels if pixels.ndim == 2 else None
            if pixels.ndim == 2:
                return np.repeat(pixels[:, :, None], 3, axis=2)
            return np.ascontiguousarray(pixels[:, :, :3]) if pixels.shape[2] in (3, 4) else None  # alpha dropped
        if simplejpeg is not None and channels == 3 and data.startswith(JPEG_SIGNATURE):
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("YCbCr", "Gray") and height * width <= (Image.MAX_IMAGE_PIXELS or height * width):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - whatever they cannot read, Pillow reads or names
        return None
    return None


def _png_pixels_allowed(data: bytes) -> bool:
    """Whether the PNG's size passes Pillow's decompression-bomb limit (pyspng has none of its own)."""
    if len(data) < 24:
        return False
    width, height = struct.unpack(">II", data[16:24])
    return Image.MAX_IMAGE_PIXELS is None or width * height <= Image.MAX_IMAGE_PIXELS


def center_crop_resize(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crop a (C, H, W) uint8 image to its central square and resize it (antialiased bilinear, rounded back to
    uint8, as NVlabs' dataset tool stores resized images) to R x R."""
    _, height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side == resolution:
        return square
    resized = F.interpolate(square.float().unsqueeze(0), size=(resolution, resolution), mode="bilinear",
                            antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)
