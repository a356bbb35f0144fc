"""StyleGAN2 networks: shapes, modulation statistics, mapping, and a short distributed run with ADA."""

import pytest
import torch

from daskgan.models.stylegan2 import Discriminator, Generator, MinibatchStd, modulated_conv2d


def test_demodulated_conv_keeps_unit_std():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16)
    out = modulated_conv2d(x, torch.randn(32, 64, 3, 3), styles=torch.randn(8, 64) * 3 + 1)
    inner = out[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert 0.9 < inner.std().item() < 1.1
    undemodulated = modulated_conv2d(x, torch.randn(32, 64, 3, 3), torch.randn(8, 64) * 3 + 1, demodulate=False)
    assert undemodulated[:, :, 1:-1, 1:-1].std().item() > 5, "without demodulation the styles' scale leaks through"


@pytest.mark.parametrize("resolution", [32, 64])
def test_generator_and_discriminator_shapes(resolution):
    torch.manual_seed(0)
    G = Generator(resolution, z_dim=16, w_dim=16, mapping_layers=2, fmaps=1 / 64, channel_max=32)
    D = Discriminator(resolution, fmaps=1 / 64, channel_max=32)
    images = G(torch.randn(4, 16))
    assert images.shape == (4, 3, resolution, resolution) and torch.isfinite(images).all()
    assert G.num_ws == 2 * (resolution.bit_length() - 3) + 2
    logits = D(images)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters()), "every generator parameter is trained"


def test_truncation_to_zero_gives_the_average_w_for_every_z():
    torch.manual_seed(0)
    G = Generator(16, z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 256, channel_max=16).eval()
    G.mapping.w_avg.copy_(torch.randn(8))
    images = G(torch.randn(3, 8), truncation_psi=0.0, noise_mode="const")
    assert torch.allclose(images[0], images[1], atol=1e-6) and torch.allclose(images[1], images[2], atol=1e-6)


def test_style_mixing_only_while_training():
    torch.manual_seed(0)
    G = Generator(16, z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 256, channel_max=16, style_mixing=1.0)
    z = torch.randn(2, 8)
    G.eval()
    a, b = G(z, noise_mode="const"), G(z, noise_mode="const")
    assert torch.equal(a, b), "deterministic in eval mode"
    G.train()
    assert not torch.allclose(G(z, noise_mode="const"), a), "training mixes in a second w"


def test_minibatch_std_adds_the_group_deviation():
    x = torch.zeros(4, 2, 3, 3)
    x[0] = 2.0  # one sample differs: std over the group of 4 is sqrt(mean((v-mean)^2)) = sqrt(0.75)
    out = MinibatchStd(4)(x)
    assert out.shape == (4, 3, 3, 3)
    assert torch.allclose(out[:, 2], torch.full((4, 3, 3), (0.75 * 4) ** 0.5 / 2 * 1.0), atol=1e-4)
