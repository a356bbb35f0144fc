"""daskgan's StyleGAN2 networks with NVlabs' weights give NVlabs' outputs.

Fixtures (``tests/fixtures/nvlabs/``) come from ``shared/parity``: NVlabs/stylegan2-ada-pytorch (commit d72cc7d)
run on the CPU with seeded random weights, eval mode, fp32, conv_clamp 256; see the README there. Tensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daskgan.models.resample import downsample2d, filter2d, fir_filter, upsample2d
from daskgan.models.stylegan2 import Discriminator, Generator
from daskgan.pretrained.nvlabs_names import discriminator_state, generator_state

FIXTURES = Path(__file__).parent / "fixtures" / "nvlabs"
TOLERANCE = 1e-4


def test_fir_resampling_reproduces_upfirdn2d():
    reference = torch.load(FIXTURES / "fir_1331.pt")
    kernel = fir_filter()
    assert torch.equal(kernel, reference["filter_1331"])
    x = reference["x"]
    assert (upsample2d(x, kernel) - reference["upsample2d"]).abs().max() < 1e-6
    assert (downsample2d(x, kernel) - reference["downsample2d"]).abs().max() < 1e-6
    assert (filter2d(x, kernel, padding=1) - reference["filter2d_pad1"]).abs().max() < 1e-6


def networks(name: str) -> tuple[Generator, Discriminator, dict]:
    folder = FIXTURES / name
    kwargs = json.loads((folder / "init_kwargs.json").read_text())
    g, d = kwargs["G"], kwargs["D"]
    synthesis = g["synthesis_kwargs"]
    G = Generator(g["img_resolution"], g["z_dim"], g["w_dim"], g["mapping_kwargs"]["num_layers"],
                  fmaps=synthesis["channel_base"] / 32768, channel_max=synthesis["channel_max"],
                  num_classes=g["c_dim"])
    D = Discriminator(d["img_resolution"], fmaps=d["channel_base"] / 32768, channel_max=d["channel_max"],
                      mbstd_group=d["epilogue_kwargs"]["mbstd_group_size"], num_classes=d["c_dim"], mapping_layers=8)
    G.load_state_dict(generator_state(torch.load(folder / "G_state.pt")))
    D.load_state_dict(discriminator_state(torch.load(folder / "D_state.pt"), d["img_resolution"]))
    return G.eval(), D.eval(), torch.load(folder / "io.pt")


def labels_of(io: dict) -> torch.Tensor | None:
    return io["c"] if io["c"].numel() else None


@pytest.mark.parametrize("name", ["sg2-64-uncond", "sg2-64-cond"])
def test_generator_reproduces_nvlabs_images(name):
    G, _, io = networks(name)
    with torch.no_grad():
        ws = G.mapping(io["z"], labels_of(io))
        assert (ws - io["ws"][:, 0]).abs().max() < TOLERANCE
        for key, psi, noise_mode in (("img_const_noise", 1.0, "const"), ("img_const_noise_psi0.7", 0.7, "const"),
                                     ("img_no_noise", 1.0, "none")):
            images = G(io["z"], labels_of(io), truncation_psi=psi, noise_mode=noise_mode)
            difference = (images - io[key]).abs().max()
            assert difference < TOLERANCE, f"{key}: max |difference| {difference:.3g} (outputs of scale {io[key].abs().max():.3g})"


@pytest.mark.parametrize("name", ["sg2-64-uncond", "sg2-64-cond"])
def test_discriminator_reproduces_nvlabs_logits(name):
    _, D, io = networks(name)
    with torch.no_grad():
        logits = D(io["D_images"], labels_of(io))
    difference = (logits - io["D_logits"].flatten()).abs().max()
    assert difference < TOLERANCE, f"max |difference| {difference:.3g}"
