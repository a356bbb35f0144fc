"""Conditional DCGAN: G and D read the class, as indices or as class weights."""

import torch

from daskgan.config import ModelConfig
from daskgan.models import build_models, conditioning_classes


def test_conditional_dcgan_depends_on_the_class_and_takes_blends():
    torch.manual_seed(0)
    model = ModelConfig(family="dcgan", z_dim=8, g_channels=4, d_channels=4, conditional=True)
    G, D = build_models(model, 16, conditioning_classes(model, 3))
    G.eval()
    z = torch.randn(1, 8).repeat(3, 1)
    images = G(z, torch.tensor([0, 1, 2]))
    assert images.shape == (3, 3, 16, 16)
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    one_hot_rows = torch.eye(3)
    assert torch.allclose(G(z, one_hot_rows), images), "indices and one-hot rows are the same input"
    blend = G(z[:1], torch.tensor([[0.5, 0.5, 0.0]]))
    assert not torch.allclose(blend, images[0]) and not torch.allclose(blend, images[1])
    same_image = images[:1].repeat(3, 1, 1, 1)
    logits = D(same_image, torch.tensor([0, 1, 2]))
    assert logits.shape == (3,) and len(set(logits.tolist())) == 3, "D's verdict depends on the class from the start"
    assert logits.std() > 0.1 * D.net(same_image).abs().mean(), \
        "the class moves D's verdict by more than a rounding error of the unconditional logit"


def test_unconditional_dcgan_ignores_labels():
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(family="dcgan", z_dim=8, g_channels=4, d_channels=4), 16, 0)
    G.eval()
    z = torch.randn(2, 8)
    assert torch.equal(G(z), G(z, torch.tensor([0, 1])))
