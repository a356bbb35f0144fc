"""Adaptive discriminator augmentation (ADA, Karras et al. 2020), the 'bgc' set, written in torch.

Every image the discriminator sees (real and fake) goes through ``AugmentPipe``; each enabled augmentation fires
per image with probability ``p`` times its weight (NVlabs' per-augmentation multipliers: 1 in NVlabs' pipelines,
0.5 for the colour transforms in R3GAN's, which adds cutout). Geometric augmentations compose one 2-D affine matrix
per image (applied once with NVlabs' resampling: reflect padding, 2x supersampling between sym6 wavelet filters),
colour augmentations one 4x4 colour matrix, as in NVlabs' ``training/augment.py``; cutout multiplies by a mask.
Everything is differentiable, so the generator is trained through it.

``AdaController`` is NVlabs' heuristic: the sign of D(real) is summed over ``interval`` minibatches and all ranks
(one all-reduce), r_t = E[sign(D(real))], and p moves by sign(r_t - target) * batch * interval / (speed_kimg*1000),
so p can go from 0 to 1 in ``speed_kimg`` thousand images; p stays within [0, 1].

Nothing here reads the device back during training (issue #29): p is known on the host (``probability``), the
per-image parameters are drawn and composed into matrices on the CPU, from torch's CPU generator (the pad margins
and the skip-the-identity checks read them there, waiting on no device; on a GPU this moved the draws off the
device's generator), and only the finished matrices go to the images' device. ADA's statistic accumulates on the
device and is read once per adjustment.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from daskgan import ranks
from daskgan.models.resample import fir_filter, upfirdn2d, upsample2d

BLIT = ("xflip", "rotate90", "xint")
GEOMETRIC = ("scale", "rotate", "aniso", "xfrac")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
CUTOUT = ("cutout",)
# Each pipeline: its augmentations and their weights. NVlabs' names at weight 1; R3GAN's train.py: 'bgc' with the
# colour transforms at half weight, and cutout.
PIPELINES: dict[str, dict[str, float]] = {
    name: dict.fromkeys(augmentations, 1.0)
    for name, augmentations in {"blit": BLIT, "geom": GEOMETRIC, "color": COLOR, "bg": BLIT + GEOMETRIC,
                                "bgc": BLIT + GEOMETRIC + COLOR}.items()}
PIPELINES["r3gan"] = {**dict.fromkeys(BLIT + GEOMETRIC, 1.0), **dict.fromkeys(COLOR, 0.5), "cutout": 1.0}
KNOWN = BLIT + GEOMETRIC + COLOR + CUTOUT


HOST = torch.device("cpu")  # where the per-image parameters are drawn and composed
LUMA_AXIS = tuple((torch.ones(3) / math.sqrt(3)).tolist())  # the hue rotation's axis, as float32 holds it


class AugmentPipe(nn.Module):
    """Randomly augments a batch (N, 3, H, W) in [-1, 1]; ``p`` (a buffer, so checkpoints keep it) is the chance,
    set through ``set_probability`` (which keeps its value on the host too)."""

    def __init__(self, augmentations: Mapping[str, float] | Sequence[str] = PIPELINES["bgc"], *,
                 xint_max: float = 0.125, scale_std: float = 0.2, rotate_max: float = 1.0, aniso_std: float = 0.2,
                 xfrac_std: float = 0.125, brightness_std: float = 0.2, contrast_std: float = 0.5,
                 hue_max: float = 1.0, saturation_std: float = 1.0, cutout_size: float = 0.5):
        """``augmentations``: names with their weights (a name alone weighs 1); ``cutout_size``: the side of the
        square cut out, as a fraction of the image's."""
        super().__init__()
        weights = dict(augmentations) if isinstance(augmentations, Mapping) else dict.fromkeys(augmentations, 1.0)
        unknown = set(weights) - set(KNOWN)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {KNOWN}")
        self.augmentations = weights
        self.cutout_size = cutout_size
        self.xint_max, self.scale_std, self.rotate_max, self.aniso_std = xint_max, scale_std, rotate_max, aniso_std
        self.xfrac_std, self.brightness_std, self.contrast_std = xfrac_std, brightness_std, contrast_std
        self.hue_max, self.saturation_std = hue_max, saturation_std
        self.register_buffer("p", torch.zeros([]))
        self._known: tuple[torch.Tensor | None, int, float] = (None, -1, 0.0)  # (buffer, its version, its value)

    def set_probability(self, p: float) -> None:
        """Set p, remembering its value (as the float32 buffer holds it) so no iteration reads the buffer back."""
        self.p.fill_(p)
        self._known = (self.p, self.p._version, float(np.float32(p)))

    @property
    def probability(self) -> float:
        """p as a number: the remembered value while the buffer is the one ``set_probability`` wrote (its version
        counter moves with every in-place write); else read from the buffer once (``load_state_dict``, a direct
        ``p.fill_``)."""
        buffer, version, value = self._known
        if buffer is not self.p or version != self.p._version:
            self._known = (self.p, self.p._version, float(self.p))
        return self._known[2]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.probability
        if p <= 0:
            return images
        images = self._geometric(images, p)
        images = self._color(images, p)
        return self._cutout(images, p) if "cutout" in self.augmentations else images

    def _geometric(self, images: torch.Tensor, p: float) -> torch.Tensor:
        n, _, height, width = images.shape
        fires = _Chance(n, p, self.augmentations)
        on = set(self.augmentations)
        zeros = torch.zeros(n)
        flip = fires.integers("xflip", 2) if "xflip" in on else zeros
        quarter_turns = fires.integers("rotate90", 4) if "rotate90" in on else zeros
        if "xint" in on:  # whole-pixel shifts
            shift = (fires.uniform("xint", 2) * 2 - 1) * self.xint_max
            dx, dy = torch.round(shift[:, 0] * width), torch.round(shift[:, 1] * height)
        else:
            dx = dy = zeros
        if on.isdisjoint(GEOMETRIC):  # only pixel moves: done exactly, without the resampling below
            moves = torch.stack([flip, quarter_turns, dx, dy])
            return blit(images, *_to(images.device, *moves)) if _host(moves).any() else images
        matrix = scale2d(1 - 2 * flip, torch.ones_like(flip)) @ rotate2d(-math.pi / 2 * quarter_turns)
        matrix = matrix @ translate2d(dx * 2 / width, dy * 2 / height)  # normalised coordinates span 2 a side
        if "scale" in on:
            s = torch.exp2(fires.normal("scale") * self.scale_std)
            matrix = matrix @ scale2d(s, s)
        if "rotate" in on:  # applied twice (around aniso), each with the chance that makes its weight times p
            p_rotate = 1 - math.sqrt(max(1 - fires.chance("rotate"), 0))
            matrix = matrix @ rotate2d(-(fires.uniform("rotate", chance=p_rotate) * 2 - 1) * math.pi * self.rotate_max)
        if "aniso" in on:
            s = torch.exp2(fires.normal("aniso") * self.aniso_std)
            matrix = matrix @ scale2d(s, 1 / s)
        if "rotate" in on:
            matrix = matrix @ rotate2d(-(fires.uniform("rotate", chance=p_rotate) * 2 - 1) * math.pi * self.rotate_max)
        if "xfrac" in on:
            shift = fires.normal("xfrac", 2) * self.xfrac_std * 2
            matrix = matrix @ translate2d(shift[:, 0], shift[:, 1])
        if torch.equal(matrix, torch.eye(3).expand_as(matrix)):  # on the CPU: no device read
            return images
        return warp(images, matrix)

    def _color(self, images: torch.Tensor, p: float) -> torch.Tensor:
        n, channels, height, width = images.shape
        fires = _Chance(n, p, self.augmentations)
        on = set(self.augmentations)
        identity = torch.eye(4)
        matrix = identity.repeat(n, 1, 1)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)
        luma_outer = torch.outer(luma, luma)
        if "brightness" in on:
            b = fires.normal("brightness") * self.brightness_std
            matrix = translate3d(b, b, b) @ matrix
        if "contrast" in on:
            c = torch.exp2(fires.normal("contrast") * self.contrast_std)
            matrix = scale3d(c, c, c) @ matrix
        if "lumaflip" in on:
            flip = fires.integers("lumaflip", 2)
            matrix = (identity - 2 * luma_outer * flip[:, None, None]) @ matrix
        if "hue" in on:
            hue = fires.uniform("hue") * 2 - 1
            matrix = rotate3d(LUMA_AXIS, hue * math.pi * self.hue_max) @ matrix
        if "saturation" in on:
            s = torch.exp2(fires.normal("saturation") * self.saturation_std)
            matrix = (luma_outer + (identity - luma_outer) * s[:, None, None]) @ matrix
        if torch.equal(matrix, identity.expand_as(matrix)):  # on the CPU: no device read
            return images
        (matrix,) = _to(images.device, matrix)
        flat = images.reshape(n, channels, height * width)
        if channels == 1:  # grayscale, as NVlabs: the colour matrix averaged over its RGB rows
            row = matrix[:, :3, :].mean(dim=1, keepdim=True)
            return (flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]).reshape(n, channels, height, width)
        return (matrix[:, :3, :3] @ flat + matrix[:, :3, 3:]).reshape(n, channels, height, width)

    def _cutout(self, images: torch.Tensor, p: float) -> torch.Tensor:
        """A square of ``cutout_size`` of the side, at a uniformly drawn centre (clipped at the borders), set to 0
        (mid-grey) in each image where it fires, as NVlabs' cutout; the mask is a product, so gradients flow."""
        n, _, height, width = images.shape
        fires = torch.rand(n) < _Chance(n, p, self.augmentations).chance("cutout")
        centre = torch.rand(n, 2)
        if not fires.any():  # on the CPU: no device read
            return images
        half = torch.where(fires, self.cutout_size / 2, 0.0)
        centre, half = _to(images.device, centre, half)
        xs = (torch.arange(width, device=images.device) + 0.5) / width
        ys = (torch.arange(height, device=images.device) + 0.5) / height
        outside_x = (xs[None, :] - centre[:, :1]).abs() >= half[:, None]  # (N, W)
        outside_y = (ys[None, :] - centre[:, 1:]).abs() >= half[:, None]  # (N, H)
        keep = outside_y[:, :, None] | outside_x[:, None, :]  # (N, H, W)
        return images * keep[:, None].to(images.dtype)


# Symlet 6 low-pass (PyWavelets' 'sym6' dec_lo): NVlabs' filter for geometric augmentation's 2x supersampling
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` through ``theta`` (N, 3, 3 on the CPU: output -> input, in ``affine_grid``'s normalised
    coordinates; the padding it needs is read from it without waiting on the images' device) as NVlabs: reflect-pad
    just enough for every sampled point and the filter, upsample 2x with the sym6 filter, sample bilinearly there,
    filter back down and crop. A single bilinear pass at 1x blurs what D sees; sampling at 2x between two wavelet
    filters keeps the detail."""
    n, channels, height, width = images.shape
    kernel = fir_filter(SYM6, images.device)
    reach = len(SYM6) // 4  # the filter's reach at 2x, in pixels of the input

    def scale(sx: float, sy: float) -> torch.Tensor:
        return scale2d(theta.new_full((n,), sx), theta.new_full((n,), sy))

    def shift(tx: float, ty: float) -> torch.Tensor:
        return translate2d(theta.new_full((n,), tx), theta.new_full((n,), ty))

    pixels = scale(width / 2, height / 2) @ theta @ scale(2 / width, 2 / height)  # centred pixel coordinates
    left, top, right, bottom = _reflect_margins(pixels, width, height, reach)
    images = F.pad(images, [left, right, top, bottom], mode="reflect")
    pixels = shift((left - right) / 2, (top - bottom) / 2) @ pixels
    images = upsample2d(images, kernel)
    pixels = shift(-0.5, -0.5) @ scale(2, 2) @ pixels @ scale(0.5, 0.5) @ shift(0.5, 0.5)
    out_height, out_width = (height + 2 * reach) * 2, (width + 2 * reach) * 2
    theta = scale(2 / images.shape[3], 2 / images.shape[2]) @ pixels @ scale(out_width / 2, out_height / 2)
    (theta,) = _to(images.device, theta[:, :2, :])
    grid = F.affine_grid(theta, [n, channels, out_height, out_width], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    taps = len(SYM6)
    before, after = -2 * reach + (taps - 1) // 2, -2 * reach + (taps - 2) // 2
    return upfirdn2d(images, kernel, down=2, padding=(before, after, before, after), flip_kernel=True)


def blit(images: torch.Tensor, flip: torch.Tensor, quarter_turns: torch.Tensor, dx: torch.Tensor,
         dy: torch.Tensor) -> torch.Tensor:
    """The pixel-blitting augmentations (x-flip, quarter turns, whole-pixel shifts with reflection) as pixel moves,
    per image, without resampling, so a blit-only pipeline costs next to nothing. NVlabs composes them into the
    general warp: its whole-pixel shifts are these exactly (the 2x filters cancel), its flips and turns these up
    to the filters' smoothing of the finest detail (the sym6 filter is not symmetric)."""
    n, _, height, width = images.shape
    images = torch.where(flip.view(n, 1, 1, 1) > 0, images.flip(3), images)
    turned = torch.stack([torch.rot90(images, -k, dims=(2, 3)) for k in range(4)])  # square images
    images = turned[quarter_turns.long(), torch.arange(n, device=images.device)]
    rows = _reflected(torch.arange(height, device=images.device) + dy.long()[:, None], height)  # (N, H)
    cols = _reflected(torch.arange(width, device=images.device) + dx.long()[:, None], width)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    moved = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return moved.permute(0, 3, 1, 2).contiguous()  # NCHW memory, as the networks and DDP expect


def _reflected(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in without repeating the edge (``F.pad``'s reflect)."""
    period = 2 * (size - 1)
    index = index.abs() % period
    return torch.where(index >= size, period - index, index)


def _reflect_margins(pixels: torch.Tensor, width: int, height: int, reach: int) -> list[int]:
    """Left, top, right, bottom padding (shared by the batch) that covers where the output's corners sample from,
    plus the filter's reach, and no more than reflection allows."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = pixels.new_tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1.0, 1.0, 1.0]])
    sampled = (pixels @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # (xy, N * corners)
    margin = torch.cat([-sampled, sampled]).max(dim=1).values  # x0, y0, x1, y1
    margin = margin + pixels.new_tensor([2 * reach - cx, 2 * reach - cy] * 2)
    limit = pixels.new_tensor([width - 1, height - 1] * 2)
    return _host(margin.clamp(min=0).minimum(limit).ceil().int()).tolist()


def _host(values: torch.Tensor) -> np.ndarray:
    """The values of a tensor the augmentation composed on the CPU (its per-image parameters and matrices), read
    where they lie: unlike a read of the images' tensors this waits on no device queue, once per augmented batch
    (padding sizes and skipping an identity move must be known on the host)."""
    return values.detach().numpy()


def _to(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host-side parameters onto the images' device without waiting for it (an asynchronous copy)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


class AdaController:
    """Moves ``pipe.p`` toward the point where E[sign(D(real))] equals ``target`` (NVlabs' ADA heuristic)."""

    def __init__(self, pipe: AugmentPipe, target: float = 0.6, interval: int = 4, speed_kimg: float = 500.0):
        self.pipe, self.target, self.interval, self.speed_kimg = pipe, target, interval, speed_kimg
        self.rt: float | None = None
        self._sums = torch.zeros(2, dtype=torch.float64)  # [sum of signs, count] since the last adjustment

    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate sign(D(real)) of this rank's (augmented) reals, on their device (nothing is read back)."""
        signs = torch.sign(real_logits.detach()).to(torch.float64)
        self._sums = self._sums.to(signs.device) + torch.stack([signs.sum(), signs.new_full((), signs.numel())])

    def due(self, iteration: int) -> bool:
        """Whether p is adjusted after ``iteration`` (every ``interval`` iterations)."""
        return iteration % self.interval == 0

    def statistic(self) -> torch.Tensor:
        """This rank's [sum of signs, count] since the last adjustment, on the device: summed over the ranks, it
        is what ``adjust`` takes."""
        return self._sums

    def adjust(self, signs: float, count: float, global_batch: int) -> float:
        """Adjust p from the statistic summed over every rank; returns r_t."""
        self.rt = signs / max(count, 1.0)
        sign = (self.rt > self.target) - (self.rt < self.target)  # NVlabs' np.sign: no move at the target
        adjust = sign * global_batch * self.interval / (self.speed_kimg * 1000)
        self.pipe.set_probability(min(max(self.pipe.probability + adjust, 0.0), 1.0))
        self._sums = torch.zeros_like(self._sums)
        return self.rt

    def update(self, iteration: int, global_batch: int) -> float | None:
        """The controller on its own: every ``interval`` iterations, all-reduce the statistic and adjust p; returns
        r_t (None between updates). The training loop instead folds the statistic into its one all-reduce."""
        if not self.due(iteration):
            return None
        sums = self._sums.clone()
        if ranks.process_group_running():
            sums = sums.to(ranks.collective_device())
            dist.all_reduce(sums)
        return self.adjust(*sums.tolist(), global_batch)

    def state_dict(self) -> dict:
        return {"sums": self._sums.to("cpu", copy=True), "rt": self.rt}

    def load_state_dict(self, state: dict) -> None:
        self._sums.copy_(state["sums"])
        self.rt = state["rt"]


class _Chance:
    """Per-image random draws on the host for the named augmentation, each firing with chance ``p`` times the
    augmentation's weight; where it does not fire, the identity value."""

    def __init__(self, n: int, p: float, weights: Mapping[str, float]):
        self.n, self.p, self.weights = n, p, weights

    def chance(self, augmentation: str) -> float:
        return self.p * self.weights[augmentation]

    def _fires(self, chance: float, shape: tuple[int, ...]) -> torch.Tensor:
        fires = torch.rand(self.n, device=HOST) < chance
        return fires.reshape(self.n, *([1] * (len(shape) - 1))).expand(shape)

    def integers(self, augmentation: str, high: int) -> torch.Tensor:
        """Uniform in {0..high-1} where it fires, else 0."""
        values = torch.floor(torch.rand(self.n, device=HOST) * high)
        return torch.where(self._fires(self.chance(augmentation), (self.n,)), values, torch.zeros_like(values))

    def uniform(self, augmentation: str, size: int = 0, chance: float | None = None) -> torch.Tensor:
        """Uniform in [0, 1) where it fires (with ``chance`` instead, given one), else 0.5 (the centre: no change
        once mapped to [-a, a])."""
        shape = (self.n, size) if size else (self.n,)
        values = torch.rand(shape, device=HOST)
        fires = self._fires(self.chance(augmentation) if chance is None else chance, shape)
        return torch.where(fires, values, torch.full_like(values, 0.5))

    def normal(self, augmentation: str, size: int = 0) -> torch.Tensor:
        """Standard normal where it fires, else 0."""
        shape = (self.n, size) if size else (self.n,)
        values = torch.randn(shape, device=HOST)
        return torch.where(self._fires(self.chance(augmentation), shape), values, torch.zeros_like(values))


def _matrix(rows: list[list]) -> torch.Tensor:
    """Stack per-image entries (tensors of shape (N,) or numbers) into (N, R, C) matrices."""
    n_like = next(e for row in rows for e in row if torch.is_tensor(e))
    entries = [[e if torch.is_tensor(e) else torch.full_like(n_like, float(e)) for e in row] for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


# Per-image homogeneous matrices (N, 3, 3) for the geometric moves and (N, 4, 4) for the colour ones, as NVlabs
# composes them: each entry is a tensor of shape (N,) or a number.


def translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    return _matrix([[torch.cos(theta), -torch.sin(theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1]])


def translate3d(tx: torch.Tensor, ty: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]])


def scale3d(sx: torch.Tensor, sy: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]])


def rotate3d(axis: tuple[float, float, float], theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta`` (N,) about the unit ``axis`` (Rodrigues), as 4x4 colour matrices."""
    vx, vy, vz = axis
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrix([[vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                    [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                    [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                    [0, 0, 0, 1]])
