"""The ADA pipeline and its p controller."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from daskgan import dispatch
from daskgan.training.augment import PIPELINES, AdaController, AugmentPipe

GEOMETRIC = PIPELINES["bg"]


def batch(n=16, size=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size) * 2 - 1


def pipe_with_p(augmentations, p):
    pipe = AugmentPipe(augmentations)
    pipe.p.fill_(p)
    return pipe


def test_p_zero_is_the_identity():
    images = batch()
    assert torch.equal(pipe_with_p(PIPELINES["bgc"], 0.0)(images), images)


@pytest.mark.parametrize("augmentation", PIPELINES["bgc"])
def test_each_augmentation_changes_images_and_keeps_shape_and_range(augmentation):
    images = batch()
    torch.manual_seed(1)
    out = pipe_with_p((augmentation,), 1.0)(images)
    assert out.shape == images.shape and torch.isfinite(out).all()
    changed = (out - images).abs().flatten(1).amax(1) > 1e-4
    assert changed.any(), f"{augmentation} at p=1 changed nothing"
    if augmentation in GEOMETRIC:  # wavelet-filtered resampling rings a little on white noise (as NVlabs')
        assert out.abs().max() <= 1.6 * images.abs().max()
    else:  # colour transforms move values, by a bounded amount
        assert out.abs().max() < 20


def test_p_is_a_per_image_chance():
    torch.manual_seed(2)
    images = batch(n=400, size=8)
    out = pipe_with_p(("brightness",), 0.25)(images)
    fraction = ((out - images).abs().flatten(1).amax(1) > 1e-6).float().mean().item()
    assert 0.15 < fraction < 0.35


def test_cutout_sets_a_square_of_half_the_side_to_grey_in_each_image_it_fires_for():
    torch.manual_seed(4)
    images = batch(n=64, size=16)
    pipe = pipe_with_p(("cutout",), 1.0)
    out = pipe(images)
    cut = out == 0
    assert torch.equal(out[~cut], images[~cut]), "every other pixel as it was"
    for mask in cut[:, 0]:  # the same square in every channel
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8, "at most half the side, clipped at the borders"
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all(), "one filled rectangle"
    whole = [mask for mask in cut[:, 0] if mask.sum() == 64]
    assert whole, "a square away from the borders is 8 x 8 pixels"
    assert torch.equal(pipe_with_p(("cutout",), 0.0)(images), images)


def test_a_weight_scales_an_augmentations_chance_and_r3gans_pipeline_halves_the_colour_ones():
    torch.manual_seed(5)
    images = batch(n=2000, size=4)

    def changed(augmentations):
        return ((pipe_with_p(augmentations, 0.8)(images) - images).abs().flatten(1).amax(1) > 1e-6).float().mean()

    assert 0.75 < changed({"brightness": 1.0}) < 0.85 and 0.35 < changed({"brightness": 0.5}) < 0.45
    r3gan = PIPELINES["r3gan"]
    assert {name for name, weight in r3gan.items() if weight == 0.5} == {"brightness", "contrast", "lumaflip", "hue",
                                                                        "saturation"}
    assert set(r3gan) == set(PIPELINES["bgc"]) | {"cutout"} and r3gan["cutout"] == 1.0
    assert 0.35 < changed({name: r3gan[name] for name in ("hue",)}) < 0.45


def test_gradients_reach_the_generator_through_the_pipeline():
    torch.manual_seed(3)
    generator = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))
    discriminator = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    fake = pipe_with_p(PIPELINES["bgc"], 1.0)(generator(torch.randn(8, 4)))
    discriminator(fake).mean().backward()
    grad = generator[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_controller_moves_p_by_the_nvlabs_step_and_clamps():
    pipe = AugmentPipe()
    controller = AdaController(pipe, target=0.6, interval=4, speed_kimg=1.0)
    for iteration in range(1, 5):
        controller.observe(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # r_t = 0.5 < 0.6: p goes down, stays at 0
        controller.update(iteration, global_batch=8)
    assert controller.rt == pytest.approx(0.5) and float(pipe.p) == 0.0
    for iteration in range(5, 9):
        controller.observe(torch.ones(8))  # overfitting D: r_t = 1
        controller.update(iteration, global_batch=8)
    assert controller.rt == 1.0 and float(pipe.p) == pytest.approx(8 * 4 / 1000)
    pipe.p.fill_(0.999)
    for iteration in range(9, 13):
        controller.observe(torch.ones(8))
        controller.update(iteration, global_batch=8)
    assert float(pipe.p) == 1.0


def test_p_stays_when_rt_equals_the_target():
    pipe = AugmentPipe()
    pipe.p.fill_(0.3)
    controller = AdaController(pipe, target=0.5, interval=1, speed_kimg=1.0)
    controller.observe(torch.tensor([1.0, -1.0, 2.0, -2.0]))  # r_t = 0 ... mean sign 0: below target 0.5
    controller.update(1, global_batch=8)
    assert float(pipe.p) == pytest.approx(0.3 - 8 / 1000)
    controller.target = 0.0
    controller.observe(torch.tensor([1.0, -1.0, 2.0, -2.0]))  # r_t = 0 = target: NVlabs' sign(0) moves nothing
    controller.update(2, global_batch=8)
    assert float(pipe.p) == pytest.approx(0.3 - 8 / 1000)


def rank_rt():
    controller = AdaController(AugmentPipe(), interval=1, speed_kimg=1.0)
    logits = torch.ones(6) if dist.get_rank() == 0 else -torch.ones(2)  # 6 positive, 2 negative over all ranks
    controller.observe(logits)
    controller.update(1, global_batch=8)
    return controller.rt, float(controller.pipe.p)


def test_rt_is_the_same_on_every_rank(dask_client):
    results = dispatch.results(dispatch.run(dask_client, rank_rt), timeout=120)
    assert [r[0] for r in results] == [pytest.approx(0.5)] * 2
    assert results[0][1] == results[1][1]


def gaussian_blob(size, cx, cy, sigma=1.2):
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))[None, None].repeat(1, 3, 1, 1)


def test_geometric_resampling_keeps_detail_as_nvlabs_supersampling():
    from daskgan.training.augment import warp

    image = gaussian_blob(32, 16, 16)
    half_pixel = torch.tensor([[[1.0, 0, 1 / 32], [0, 1, 0], [0, 0, 1]]])  # output x samples input x + 0.5 px
    shifted = warp(image, half_pixel)
    exact = gaussian_blob(32, 15.5, 16)
    assert (shifted - exact).abs().max() < 0.01, "2x supersampling between sym6 filters: a sharp sub-pixel shift"
    single_bilinear = torch.nn.functional.grid_sample(
        image, torch.nn.functional.affine_grid(half_pixel[:, :2], list(image.shape), align_corners=False),
        mode="bilinear", padding_mode="reflection", align_corners=False)
    assert (single_bilinear - exact).abs().max() > 0.05, "what one bilinear pass at 1x loses"
    assert (warp(image, torch.eye(3)[None]) - image).abs().max() < 1e-5, "the identity is lossless"


def smooth_batch(n, size=16):
    torch.manual_seed(5)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, size // 2, size // 2) * 2 - 1, size=size,
                                             mode="bilinear", align_corners=False)
    return torch.nn.functional.avg_pool2d(coarse, 3, 1, 1, count_include_pad=False)


def blit_through_warp(images, flip, turns, dx, dy):
    import math

    from daskgan.training.augment import rotate2d, scale2d, translate2d, warp

    size, ones = images.shape[-1], torch.ones(len(images))
    matrix = (scale2d(1 - 2 * flip, ones) @ rotate2d(-math.pi / 2 * turns)
              @ translate2d(dx * 2 / size, dy * 2 / size))
    return warp(images, matrix)


def test_pixel_blits_move_pixels_as_the_general_warp_does_without_resampling():
    """The paper's pixel blitting (x-flip, quarter turns, whole-pixel shifts) done as pixel moves: lossless, and
    what NVlabs' warp makes of the same draws (its shifts exactly; its flips and turns up to its filters'
    smoothing of the finest detail)."""
    from daskgan.training.augment import blit

    n, zeros = 64, torch.zeros(64)
    torch.manual_seed(4)
    flip, turns = torch.randint(0, 2, (n,)).float(), torch.randint(0, 4, (n,)).float()
    dx, dy = torch.randint(-2, 3, (n,)).float(), torch.randint(-2, 3, (n,)).float()
    noise = batch(n=n)
    assert (blit(noise, zeros, zeros, dx, dy) - blit_through_warp(noise, zeros, zeros, dx, dy)).abs().max() < 1e-4
    smooth = smooth_batch(n)
    assert (blit(smooth, flip, turns, dx, dy) - blit_through_warp(smooth, flip, turns, dx, dy)).abs().max() < 0.06
    moved = blit(noise, flip, turns, zeros, zeros)
    assert not torch.equal(moved, noise)
    assert torch.equal(moved.flatten(1).sort(1).values, noise.flatten(1).sort(1).values), "pixels moved, none made"


def test_a_blit_pipeline_does_not_resample(monkeypatch):
    from daskgan.training import augment

    monkeypatch.setattr(augment, "warp", lambda *a: pytest.fail("a blit-only pipeline resampled"))
    out = pipe_with_p(PIPELINES["blit"], 1.0)(batch())
    assert out.shape == batch().shape
