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


def small_pair(num_classes=0, resolution=32):
    torch.manual_seed(0)
    return (Generator(resolution, z_dim=16, w_dim=16, mapping_layers=2, fmaps=1 / 64, channel_max=32,
                      num_classes=num_classes),
            Discriminator(resolution, fmaps=1 / 64, channel_max=32, num_classes=num_classes, mapping_layers=2))


def test_conditional_networks_depend_on_the_label():
    G, D = small_pair(num_classes=3)
    G.eval()
    z = torch.randn(1, 16).repeat(3, 1)
    images = G(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])
    assert torch.allclose(G(z[:1], torch.tensor([[0.0, 1.0, 0.0]])), images[1:2], atol=1e-5), "one-hot rows work"
    same = images[:1].repeat(3, 1, 1, 1)
    logits = D(same, torch.tensor([0, 1, 2]))
    assert logits.shape == (3,) and len(set(logits.tolist())) == 3, "D's verdict is per class"


def test_return_ws_gives_the_styles_the_image_was_made_from():
    G, _ = small_pair()
    G.eval()
    z = torch.randn(2, 16)
    images, ws = G(z, return_ws=True)
    assert torch.equal(images, G(z)) and ws.shape == (2, G.num_ws, 16)
    assert torch.allclose(ws, G.mapping(z).unsqueeze(1).expand_as(ws)), "no mixing outside training"
    G.train()
    G.style_mixing = 1.0
    _, mixed = G(z, return_ws=True)
    assert not torch.allclose(mixed[:, 0], mixed[:, -1]), "while training, mixed styles are what is returned"


def record_block_dtypes(network, blocks):
    seen = {}
    for block in blocks:
        block.register_forward_hook(lambda module, args, out, r=block.resolution: seen.__setitem__(
            r, (out[0] if isinstance(out, tuple) else out).dtype))
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_only_the_top_resolutions_in_low_precision(dtype):
    G, D = small_pair()
    z = torch.randn(4, 16)
    G.eval()
    reference = G(z)
    for network in (G, D):
        network.use_reduced_precision(dtype, resolutions=2)
    g_seen, d_seen = record_block_dtypes(G, G.blocks), record_block_dtypes(D, D.blocks)
    images = G(z)
    assert {r: t for r, t in g_seen.items()} == {4: torch.float32, 8: torch.float32, 16: dtype, 32: dtype}
    assert images.dtype == torch.float32, "the toRGB image path stays fp32"
    relative_error = ((images - reference).norm() / reference.norm()).item()
    assert relative_error < 0.05, relative_error
    logits = D(images)
    assert d_seen == {32: dtype, 16: dtype, 8: torch.float32} and logits.dtype == torch.float32
    logits.sum().backward()
    for name, p in (*G.named_parameters(), *D.named_parameters()):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_style_mixing_takes_one_cutoff_per_batch_and_leaves_the_average_w():
    torch.manual_seed(0)
    mixing = Generator(16, z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 64, channel_max=8, style_mixing=1.0).train()
    plain = Generator(16, z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 64, channel_max=8, style_mixing=0.0).train()
    plain.load_state_dict(mixing.state_dict())
    z = torch.randn(6, 8)
    _, mixed_ws = mixing(z, return_ws=True)
    _, plain_ws = plain(z, return_ws=True)
    assert torch.equal(mixing.mapping.w_avg, plain.mapping.w_avg), "the second z's mapping moves no average"
    changed = (mixed_ws != plain_ws).any(dim=2)  # (sample, layer): layers that took the second w
    assert changed.any() and (changed == changed[0]).all(), "the same cutoff for every sample of the batch"
    first = int(changed[0].float().argmax())
    assert changed[0, first:].all() and not changed[0, :first].any()


def test_orig_discriminator_blocks_have_no_residual_skip_as_nvlabs_cifar():
    from daskgan.config.presets import preset_settings

    assert preset_settings("cifar", 32, 2)["model"]["d_architecture"] == "orig"
    torch.manual_seed(0)
    D = Discriminator(16, fmaps=1 / 64, channel_max=8, architecture="orig")
    assert not any("skip" in name for name, _ in D.named_parameters())
    block, x = D.blocks[0], torch.randn(2, 3, 16, 16)
    assert torch.equal(block(x), block.conv1(block.conv0(block.fromrgb(x)))), "convs alone, no √½ gains"
    assert D(torch.randn(4, 3, 16, 16)).shape == (4,)
