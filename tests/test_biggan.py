"""BigGAN: spectral norm's estimate, shapes, conditioning, attention."""

import pytest
import torch

from daskgan.config import ModelConfig
from daskgan.models import build_models
from daskgan.models.biggan import SN, SelfAttention
from daskgan.models.spectral import SNLinear, power_iteration


def test_power_iteration_finds_the_largest_singular_values_within_2_percent():
    torch.manual_seed(0)
    weight = torch.randn(64, 3 * 3 * 32)
    true = torch.linalg.svdvals(weight)
    us = [torch.nn.functional.normalize(torch.randn(1, 64), dim=1) for _ in range(2)]
    _, svs = power_iteration(weight, us, iterations=200)
    assert svs[0].item() == pytest.approx(true[0].item(), rel=0.02)
    assert svs[1].item() == pytest.approx(true[1].item(), rel=0.02), "Gram-Schmidt keeps the second apart"


def test_spectral_norm_layer_converges_to_unit_sigma_over_training_steps():
    torch.manual_seed(0)
    layer = SNLinear(40, 30, num_svs=1, num_itrs=1)
    for _ in range(100):  # each training forward does one power iteration, as in BigGAN
        layer(torch.randn(2, 40))
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    assert layer.sv0.item() == pytest.approx(sigma.item(), rel=0.02)
    assert torch.linalg.matrix_norm(layer.normalised_weight().detach(), ord=2).item() == pytest.approx(1, rel=0.02)
    before = layer.u0.clone()
    layer.eval()
    layer(torch.randn(2, 40))
    assert torch.equal(layer.u0, before), "no power iteration in eval mode"


def biggan(resolution=32, **extra):
    torch.manual_seed(0)
    config = ModelConfig(family="biggan", z_dim=20, g_channels=4, d_channels=4, shared_dim=8,
                         attention_resolution=16, **extra)
    return build_models(config, resolution, num_classes=3)


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_and_every_parameter_trains(resolution):
    G, D = biggan(resolution)
    z, labels = torch.randn(4, 20), torch.tensor([0, 1, 2, 0])
    images = G(z, labels)
    assert images.shape == (4, 3, resolution, resolution) and images.abs().max() <= 1
    logits = D(images, labels)
    assert logits.shape == (4,)
    logits.sum().backward()
    missing = [n for n, p in (*G.named_parameters(), *D.named_parameters()) if p.grad is None]
    assert missing == [], missing
    # at 32 px BigGAN-PyTorch labels all four D blocks 16, so attention at 16 follows each of them
    assert len(G.attention) == 1 and len(D.attention) == (4 if resolution == 32 else 1)


def test_class_conditioning_and_blends():
    G, D = biggan()
    G.eval()
    z = torch.randn(1, 20).repeat(3, 1)
    images = G(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(images[0], images[1])
    assert torch.allclose(G(z[:1], torch.tensor([[0.0, 0.0, 1.0]])), images[2:], atol=1e-5)
    D.eval()
    logits = D(images[:1].repeat(3, 1, 1, 1), torch.tensor([0, 1, 2]))
    assert len(set(logits.tolist())) == 3, "the projection makes D's verdict per class"


def test_self_attention_starts_as_the_identity():
    block = SelfAttention(16, SN(1, 1))
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)
    block.gamma.data.fill_(1.0)
    assert not torch.allclose(block(x), x)
