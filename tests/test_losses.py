import copy

import pytest
import torch
from torch import nn

from daskgan.training.ema import ema_beta, update_ema
from daskgan.training.losses import LOSSES, r1_penalty


def test_bce_family_values_on_known_logits():
    bce = LOSSES["bce"]
    logits = torch.tensor([0.0, 2.0])
    expected = (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(-2.0)))).item() / 2
    assert bce.d_real(logits).item() == pytest.approx(expected)
    assert bce.d_fake(torch.tensor([0.0])).item() == pytest.approx(0.6931472)
    assert bce.g(torch.tensor([0.0])).item() == pytest.approx(0.6931472), "non-saturating: -log sigmoid(D(G(z)))"


def test_r1_matches_an_autograd_reference_on_a_toy_discriminator():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 4, requires_grad=True)
    images = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (weight * images.square()).sum(dim=[1, 2, 3])  # D(x) = sum w x²  =>  ∇x D = 2 w x
    penalty = r1_penalty(images, logits)
    expected = (2 * weight * images).square().sum(dim=[1, 2, 3]).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad_w,) = torch.autograd.grad(penalty, weight)  # the penalty trains D: it must reach D's weights
    expected_grad = (8 * weight * images.square()).sum(0) / 5  # d/dw mean over images of sum 4 w² x²
    assert torch.allclose(grad_w, expected_grad, rtol=1e-4)


def test_ema_beta_follows_the_half_life_and_rampup():
    assert ema_beta(32, 10.0, images_seen=10**6) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 10.0, images_seen=1000, rampup=0.05) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(32, 10.0, images_seen=10**9, rampup=0.05) == pytest.approx(0.5 ** (32 / 10_000))


def test_ema_update_matches_its_formula():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    average = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 3))  # moves BatchNorm's running statistics
    before = [p.clone() for p in average.parameters()]
    update_ema(average, model, beta=0.9)
    for old, new, current in zip(before, average.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * current)
    assert torch.equal(average[1].running_mean, model[1].running_mean)
    old_mean = average[1].running_mean.clone()
    model(torch.randn(8, 3))
    update_ema(average, model, beta=0.9, average_buffers=True)  # BigGAN-PyTorch: statistics averaged too
    assert torch.allclose(average[1].running_mean, 0.9 * old_mean + 0.1 * model[1].running_mean)
    assert average[1].num_batches_tracked == model[1].num_batches_tracked


def test_ema_copies_the_generator_until_its_start_iteration():
    from daskgan.config import TrainConfig
    from daskgan.training.ema import ema_beta_at

    train = TrainConfig(ema_kimg=10.0, ema_start=100)
    assert [ema_beta_at(train, i, 32) for i in (1, 50, 99)] == [0.0, 0.0, 0.0]
    assert ema_beta_at(train, 100, 32) == pytest.approx(0.5 ** (32 / 10_000))
    model, average = nn.Linear(2, 2), nn.Linear(2, 2)
    update_ema(average, model, ema_beta_at(train, 99, 32))
    assert all(torch.equal(a, b) for a, b in zip(average.parameters(), model.parameters()))
