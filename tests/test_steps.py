"""Optimiser steps: gradient accumulation over micro-batches equals one step on the whole batch, in one process
and over two DDP ranks; the regularisers against autograd references."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from daskgan import dispatch
from daskgan.data.decode import to_unit_range
from daskgan.data.stream import Batch, StreamPosition
from daskgan.training.augment import PIPELINES, AugmentPipe
from daskgan.training.losses import LOSSES, orthogonal_regularisation, path_lengths
from daskgan.training.steps import Gan, discriminator_step, generator_step

Z_DIM = 6


class ToyGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(Z_DIM, 32), nn.LeakyReLU(0.2), nn.Linear(32, 3 * 4 * 4), nn.Tanh())

    def forward(self, z, labels=None):
        return self.net(z).view(-1, 3, 4, 4)


class ToyDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, images, labels=None):
        return self.net(images).flatten()


class PreparedNoise:
    """Hands out the rows of a fixed z in order, so differently split steps see the same latents."""

    device = torch.device("cpu")

    def __init__(self, z):
        self.z, self.used = z, 0

    def draw(self, n):
        self.used += n
        return self.z[self.used - n:self.used], None


def toy_gan():
    torch.manual_seed(0)
    G, D = ToyGenerator(), ToyDiscriminator()
    return Gan(DistributedDataParallel(G), DistributedDataParallel(D), torch.optim.SGD(G.parameters(), lr=0.5),
               torch.optim.SGD(D.parameters(), lr=0.5), AugmentPipe(PIPELINES["bgc"]), None, None)


def batches(images, micro_batches):
    return [Batch(chunk, torch.zeros(len(chunk), dtype=torch.long), StreamPosition())
            for chunk in images.chunk(micro_batches)]


def one_iteration(gan, images, z_d, z_g, micro_batches, r1_weight=0.0):
    """A D step on ``images`` (split into micro-batches) and a G step; returns G's and D's weights after."""
    hinge = LOSSES["hinge"]
    discriminator_step(gan, hinge, batches(images, micro_batches), PreparedNoise(z_d), r1_weight=r1_weight)
    generator_step(gan, hinge, micro_batches, len(z_g) // micro_batches, PreparedNoise(z_g))
    return [p.detach().clone() for p in (*gan.G.parameters(), *gan.D.parameters())]


def reference_data(size):
    generator = torch.Generator().manual_seed(7)
    return (torch.randint(0, 256, (size, 3, 4, 4), generator=generator, dtype=torch.uint8),
            torch.randn(size, Z_DIM, generator=generator),
            torch.randn(size, Z_DIM, generator=generator))


@pytest.mark.parametrize("r1_weight", [0.0, 5.0])
def test_accumulated_micro_batches_give_the_update_of_one_batch(process_group, r1_weight):
    images, z_d, z_g = reference_data(12)
    whole = one_iteration(toy_gan(), images, z_d, z_g, micro_batches=1, r1_weight=r1_weight)
    accumulated = one_iteration(toy_gan(), images, z_d, z_g, micro_batches=3, r1_weight=r1_weight)
    start = [p.detach() for p in (*toy_gan().G.parameters(), *toy_gan().D.parameters())]
    assert any(not torch.allclose(a, b) for a, b in zip(whole, start)), "the step changed the weights"
    for a, b in zip(whole, accumulated):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def rank_share_update(images, z_d, z_g, micro_batches):
    """On each of 2 ranks: its half of the data as ``micro_batches`` micro-batches; returns the new weights."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    share = lambda t: t.chunk(world)[rank]  # noqa: E731
    return one_iteration(toy_gan(), share(images), share(z_d), share(z_g), micro_batches)


@pytest.mark.slow
def test_accumulation_over_two_ddp_ranks_equals_one_process_on_the_global_batch(dask_client, process_group):
    images, z_d, z_g = reference_data(16)
    ranks = dispatch.results(dispatch.run(dask_client, rank_share_update, images, z_d, z_g, 2), timeout=120)
    single = one_iteration(toy_gan(), images, z_d, z_g, micro_batches=1)
    for rank_weights in ranks:
        for a, b in zip(rank_weights, single):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_hinge_loss_on_known_logits():
    hinge = LOSSES["hinge"]
    logits = torch.tensor([2.0, 0.5, -3.0])
    assert hinge.d_real(logits).item() == pytest.approx((0 + 0.5 + 4.0) / 3)
    assert hinge.d_fake(logits).item() == pytest.approx((3.0 + 1.5 + 0) / 3)
    assert hinge.g(logits).item() == pytest.approx(0.5 / 3)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (40, 5)])  # a wide and a tall weight (the two code paths)
def test_orthogonal_regularisation_is_the_gradient_of_its_penalty(shape):
    torch.manual_seed(0)
    layer = nn.Linear(1, 1)
    layer.weight = nn.Parameter(torch.randn(shape))
    layer.weight.grad = torch.zeros(shape)
    orthogonal_regularisation(layer, strength=1e-2)

    weight = layer.weight.detach().clone().requires_grad_()
    rows = weight.reshape(shape[0], -1)
    off_diagonal = rows @ rows.T * (1 - torch.eye(shape[0]))
    (expected,) = torch.autograd.grad(1e-2 / 2 * off_diagonal.square().sum(), weight)
    assert torch.allclose(layer.weight.grad, expected, rtol=1e-4, atol=1e-6)
    assert layer.bias.grad is None, "vectors are exempt"


def test_orthogonal_regularisation_skips_class_embeddings():
    embedding = nn.Embedding(5, 4)
    embedding.weight.grad = torch.zeros(5, 4)
    orthogonal_regularisation(nn.Sequential(embedding), strength=1.0)
    assert embedding.weight.grad.abs().sum() == 0


def test_path_lengths_match_the_jacobian_of_a_linear_generator():
    torch.manual_seed(0)
    matrix = torch.randn(3 * 4 * 4, 5, requires_grad=True)  # image = A w for each of the 2 layers' w, summed
    ws = torch.randn(6, 2, 5, requires_grad=True)
    images = (ws @ matrix.T).sum(dim=1).view(6, 3, 4, 4)
    torch.manual_seed(1)
    lengths = path_lengths(images, ws)
    torch.manual_seed(1)
    direction = torch.randn(6, 3, 4, 4) / 4  # 1/sqrt(H*W)
    per_layer = direction.view(6, -1) @ matrix.detach()  # J_w^T y, the same for both layers
    assert torch.allclose(lengths, per_layer.square().sum(dim=1).sqrt(), rtol=1e-5)
    lengths.sum().backward()
    assert matrix.grad is not None and matrix.grad.abs().sum() > 0, "the graph is kept: the penalty trains G"


def test_the_path_length_target_moves_toward_the_mean_length_and_the_penalty_is_taken_against_the_new_one():
    from daskgan.training.steps import path_length_penalty

    torch.manual_seed(0)
    ws = torch.randn(4, 2, 5, requires_grad=True)
    weights = torch.randn(5, 3 * 4 * 4, requires_grad=True)  # G's, which the penalty trains
    images = (ws @ weights).sum(dim=1).view(4, 3, 4, 4)
    torch.manual_seed(1)
    lengths = path_lengths(images, ws).detach()
    old = torch.tensor(2.0)
    torch.manual_seed(1)
    penalty, target = path_length_penalty(images, ws, old, decay=0.25)
    assert torch.allclose(target, 2.0 + 0.25 * (lengths.mean() - 2.0)) and old == 2.0, "a new target; the old kept"
    assert torch.allclose(penalty, (lengths - target).square().mean())
    assert penalty.requires_grad, "the penalty trains G"


def test_compiled_networks_give_the_eager_update_including_r1(process_group):
    from daskgan.training.compiled import compile_forward

    images, z_d, z_g = reference_data(8)
    eager_weights = one_iteration(toy_gan(), images, z_d, z_g, micro_batches=2, r1_weight=5.0)
    gan = toy_gan()
    compile_forward(gan.G.module), compile_forward(gan.D.module)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled_weights = one_iteration(gan, images, z_d, z_g, micro_batches=2, r1_weight=5.0)
    assert counters["stats"]["unique_graphs"] >= 2, "the fake passes ran compiled"
    for a, b in zip(eager_weights, compiled_weights):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert list(gan.D.module.state_dict()) == list(toy_gan().D.module.state_dict()), "checkpoints look the same"


class BatchWithInfinity(Batch):
    """Reals with one infinite value, as an overflowing fp16 activation would give."""

    def real_images(self, device="cpu"):
        images = super().real_images(device)
        images[0, 0, 0, 0] = float("inf")
        return images


def test_a_non_finite_gradient_never_reaches_the_weights(process_group):
    gan = toy_gan()
    images, z_d, _ = reference_data(4)
    batch = BatchWithInfinity(images, torch.zeros(len(images), dtype=torch.long), StreamPosition())
    discriminator_step(gan, LOSSES["hinge"], [batch], PreparedNoise(z_d))
    grads = [p.grad for p in gan.D.parameters()]
    assert all(torch.isfinite(g).all() for g in grads), "gradients sanitised before the update"
    assert all(torch.isfinite(p).all() for p in gan.D.parameters())
    assert any(g.abs().max() == 1e5 for g in grads) or any(g.eq(0).any() for g in grads), "inf -> 1e5, NaN -> 0"


def test_stylegan2_fakes_take_the_dataset_label_distribution_others_uniform():
    from daskgan.config.families import FAMILIES
    from daskgan.training.steps import Noise, fake_label_weights

    labels = (0,) * 90 + (1,) * 10
    stylegan2, biggan, dcgan = (FAMILIES[name] for name in ("stylegan2", "biggan", "dcgan"))
    assert fake_label_weights(biggan, labels, 2) is None and fake_label_weights(dcgan, labels, 2) is None
    assert fake_label_weights(stylegan2, (), 0) is None
    weights = fake_label_weights(stylegan2, labels, 3)
    assert weights.tolist() == [90, 10, 0], "a class without images is never drawn"
    drawn = Noise(torch.Generator().manual_seed(0), 4, 3, torch.device("cpu"), weights).draw(4000)[1]
    assert abs(float((drawn == 0).float().mean()) - 0.9) < 0.03 and not (drawn == 2).any()
    uniform = Noise(torch.Generator().manual_seed(0), 4, 3, torch.device("cpu")).draw(3000)[1]
    assert all(abs(float((uniform == c).float().mean()) - 1 / 3) < 0.03 for c in range(3))


def test_stylegan2_adam_is_corrected_for_the_lazy_regularisation_steps_as_nvlabs():
    from daskgan.config import JobConfig
    from daskgan.training.setup import adam_settings

    def job(family):
        return JobConfig.from_dict({"name": "t", "data": {"url": "memory://x"}, "model": {"family": family},
                                    "train": {"beta1": 0.0, "beta2": 0.99},
                                    "output": {"run_url": "memory://run"}})

    lr, betas = adam_settings(job("stylegan2"), 0.0025, 16)
    assert lr == pytest.approx(0.0025 * 16 / 17) and betas == (0.0, pytest.approx(0.99 ** (16 / 17)))
    assert adam_settings(job("dcgan"), 0.0002, 16) == (0.0002, (0.0, 0.99)), "other families: as configured"


def test_r1_pass_steps_d_by_the_penalty_gradient_alone(process_group):
    from daskgan.training.losses import r1_penalty
    from daskgan.training.steps import r1_step

    gan = toy_gan()
    images, _, _ = reference_data(6)
    reference = ToyDiscriminator()
    reference.load_state_dict(gan.D.module.state_dict())
    real = to_unit_range(images).requires_grad_(True)
    (r1_penalty(real, reference(real)) * 2.5).backward()  # one batch = the mean over its micro-batches
    expected = [p.detach() - (0.0 if p.grad is None else 0.5 * p.grad) for p in reference.parameters()]  # SGD lr 0.5
    stats = r1_step(gan, batches(images, 3), torch.device("cpu"), r1_weight=2.5)
    assert stats["r1_penalty"] > 0
    for got, want in zip(gan.D.module.parameters(), expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_adam_eps_reaches_both_optimizers(process_group):
    from daskgan.config import JobConfig
    from daskgan.training.setup import build_gan

    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 8},
                               "model": {"z_dim": 4, "g_channels": 4, "d_channels": 4},
                               "train": {"adam_eps": 1e-6}, "output": {"run_url": "memory://run"}})
    gan = build_gan(job, 0, torch.device("cpu"))
    assert [g["eps"] for g in (*gan.opt_G.param_groups, *gan.opt_D.param_groups)] == [1e-6, 1e-6]


def test_g_accumulates_its_own_number_of_micro_batches(process_group):
    from daskgan.config import JobConfig
    from daskgan.training.loop import train_iteration
    from daskgan.training.setup import build_gan
    from daskgan.training.steps import Noise

    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 8, "batch_size": 2},
                               "model": {"z_dim": 4, "g_channels": 4, "d_channels": 4},
                               "train": {"accumulate": 2, "g_accumulate": 3}, "output": {"run_url": "memory://run"}})
    gan = build_gan(job, 0, torch.device("cpu"))
    calls = []
    gan.G.module.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    batch = Batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), StreamPosition())
    stream = iter([batch] * 2)
    noise = Noise(torch.Generator().manual_seed(0), 4, 0, torch.device("cpu"))
    train_iteration(job, gan, stream, noise, 1)
    assert calls == [2, 2, 2, 2, 2], "2 fake micro-batches for D's step, then 3 for G's (BigGAN-PyTorch's counts)"
