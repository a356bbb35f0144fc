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


@pytest.mark.parametrize("hierarchical, shared, expected", [
    (True, True, (16, 8 + 5)),  # BigGAN: [shared embedding, z chunk] -> (channels, shared_dim + chunk)
    (False, True, (16, 8)),  # non-hierarchical BigGAN-PyTorch: the shared embedding alone (not [y, z])
    (False, False, (3, 16)),  # SA-GAN: the layer's own class embedding (classes, channels)
])
def test_conditional_batchnorm_inputs_follow_biggan_pytorch(hierarchical, shared, expected):
    from daskgan.models.biggan import Generator

    G = Generator(32, 3, z_dim=20, ch=4, shared_dim=8, hierarchical=hierarchical, attention=0, shared=shared)
    assert tuple(G.blocks[0].bn1.gain.weight.shape) == expected
    assert (G.shared is None) == (not shared)
    assert G.linear.weight.shape[1] == (5 if hierarchical else 20), "non-hierarchical: all of z into the linear"
    labels = torch.tensor([0, 2])
    assert G(torch.randn(2, 20), labels).shape == (2, 3, 32, 32)
    blend = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    G.eval()
    assert torch.allclose(G(torch.zeros(2, 20), torch.nn.functional.one_hot(labels, 3).float())[1],
                          G(torch.zeros(2, 20), labels)[1], atol=1e-6), "class weights blend like indices"
    assert G(torch.zeros(2, 20), blend).shape == (2, 3, 32, 32)


def test_initialisations_as_biggan_pytorch():
    from daskgan.models.biggan import Generator

    checks = {"N02": lambda w: abs(w.std().item() - 0.02) < 0.005,
              "ortho": lambda w: torch.allclose(w.T @ w, torch.eye(w.shape[1]), atol=1e-5),  # orthonormal columns
              "xavier": lambda w: w.abs().max().item() <= (6 / sum(w.shape)) ** 0.5 + 1e-6}
    for init, check in checks.items():
        torch.manual_seed(0)
        assert check(Generator(32, 3, z_dim=20, ch=4, shared_dim=8, attention=0, init=init).linear.weight), init
