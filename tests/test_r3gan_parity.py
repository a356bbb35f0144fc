"""daskgan's R3GAN networks with R3GAN's weights give R3GAN's outputs.

Fixtures (``tests/fixtures/r3gan-32/``) come from ``shared/parity/r3gan-32``: brownvc/R3GAN (commit 19a7ddf) at
32 px, conditioned on 4 classes, with small widths; see the README there. Tensors only.
"""

from __future__ import annotations

import json
import math
import pickle
import pickletools
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from nvlabs_pickles import crafted_module, crafted_pickle, pushed
from PIL import Image
from test_nvlabs_parity import Exploit

from daskgan.config import ModelConfig
from daskgan.errors import CheckpointMismatch, CheckpointUnreadable, ConfigError, UnsafePickle
from daskgan.models import build_models, load_exactly, model_description
from daskgan.models.r3gan import LRELU_GAIN, reference_state
from daskgan.pretrained import import_weights
from daskgan.training.losses import relativistic_d_loss, relativistic_g_loss

FIXTURES = Path(__file__).parent / "fixtures" / "r3gan-32"
TOLERANCE = 1e-4


def fixture_model() -> ModelConfig:
    """The model config of the fixture's networks, read from the keyword arguments R3GAN's train.py gave them."""
    g = json.loads((FIXTURES / "init_kwargs.json").read_text())["G"]
    widths, cardinalities = g["WidthPerStage"], g["CardinalityPerStage"]
    group = widths[0] * g["ExpansionFactor"] // cardinalities[0]
    assert not g["FP16Stages"]
    return ModelConfig(family="r3gan", z_dim=g["NoiseDimension"], stage_widths=widths, conditional=True,
                       stage_blocks=g["BlocksPerStage"], group_channels=group, expansion=g["ExpansionFactor"])


def fixture_networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    G, D = build_models(fixture_model(), 32, 4)
    G.load_state_dict(reference_state(torch.load(FIXTURES / "G_state.pt"), generator=True))
    D.load_state_dict(reference_state(torch.load(FIXTURES / "D_state.pt"), generator=False))
    return G.eval(), D.eval()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """gen_images.py's conversion: x * 127.5 + 128, clamped, truncated, channels last."""
    return (images.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def test_generator_reproduces_r3gan_images():
    G, _ = fixture_networks()
    io = torch.load(FIXTURES / "io.pt")
    with torch.no_grad():
        images = G(io["z"], io["c"])
    assert images.dtype == torch.float32
    assert (images - io["images"]).abs().max() <= TOLERANCE
    # The uint8 images are equal except where R3GAN's own float pixel lies within float error of a truncation
    # boundary (157.99998 vs our 158.0 at one pixel with torch's mkldnn convolutions, none without).
    ours, theirs = to_uint8(images).int(), io["images_uint8"].int()
    reference_pixels = io["images"].permute(0, 2, 3, 1) * 127.5 + 128
    at_boundary = (reference_pixels - reference_pixels.round()).abs() < 1e-3
    assert (ours - theirs).abs().max() <= 1
    assert torch.equal(ours[~at_boundary], theirs[~at_boundary])
    assert torch.equal(to_uint8(io["images"]), io["images_uint8"])


def test_discriminator_reproduces_r3gan_logits():
    _, D = fixture_networks()
    io = torch.load(FIXTURES / "io.pt")
    with torch.no_grad():
        logits = D(io["D_images"], io["c"])
    assert logits.shape == (4,)
    assert (logits - io["D_logits"]).abs().max() <= TOLERANCE
    with torch.no_grad():  # integer labels are the same classes as one-hot rows
        assert torch.equal(D(io["D_images"], io["c"].argmax(1)), logits)


def test_reference_state_maps_every_tensor_and_refuses_a_foreign_filter():
    G, D = build_models(fixture_model(), 32, 4)
    for network, file, generator in ((G, "G_state.pt", True), (D, "D_state.pt", False)):
        reference = torch.load(FIXTURES / file)
        assert set(reference_state(reference, generator)) == set(network.state_dict())
        kernel = next(name for name in reference if name.endswith("Resampler.Kernel"))
        with pytest.raises(CheckpointMismatch, match="resampling filter"):
            reference_state({**reference, kernel: torch.ones(4, 4) / 16}, generator)
    with pytest.raises(CheckpointMismatch, match="not a parameter of R3GAN's generator"):
        reference_state({"Model.Mapping.weight": torch.zeros(1)}, generator=True)


def blocks_of(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for stage in network.stages for block in stage.blocks]


@pytest.mark.parametrize("network_index", [0, 1])
def test_fresh_blocks_start_as_the_identity_with_variance_scaled_layers(network_index):
    torch.manual_seed(1)
    model = ModelConfig(family="r3gan", z_dim=64, stage_widths=[64, 64, 48, 32], stage_blocks=[3, 1, 2, 2])
    network = build_models(model, 32, 0)[network_index]
    assert [len(stage.blocks) for stage in network.stages] == [[3, 1, 2, 2], [2, 2, 1, 3]][network_index]
    gain = LRELU_GAIN * 8**-0.25  # 8 blocks in all
    for block in blocks_of(network):
        assert not block.conv3.weight.any()  # the last layer of every block is zero
        assert not block.bias1.any() and not block.bias2.any()
        for layer in (block.conv1, block.conv2):
            fan_in = layer.weight[0].numel()
            assert layer.weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.05)
    x = torch.randn(2, 64, 4, 4)
    block = blocks_of(network)[-1 if network_index == 1 else 0]
    assert torch.equal(block(x), x)


def test_fresh_generator_layers_outside_blocks_have_unit_gain():
    torch.manual_seed(2)
    G, D = build_models(ModelConfig(family="r3gan", z_dim=64, stage_widths=[128, 128, 128, 64]), 32, 10)
    assert G.stages[0].transition.basis.std().item() == pytest.approx(1, rel=0.1)
    assert G.stages[1].transition.conv is None and G.stages[3].transition.conv is not None
    for layer, fan_in in ((G.stages[0].transition.linear, 128), (G.embed, 10), (G.stages[3].transition.conv, 128),
                          (D.stages[0].transition.conv, 64), (D.stages[-1].transition.depthwise, 16)):
        assert layer.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.15)
    assert D.embed.weight.std().item() == pytest.approx(128**-0.5 / math.sqrt(10), rel=0.15)  # 1/sqrt(width)


def test_bf16_stages_are_the_highest_resolutions_and_outputs_stay_float32():
    torch.manual_seed(3)
    model = ModelConfig(family="r3gan", z_dim=16, stage_widths=[32, 32, 16], bf16_stages=2)
    G, D = build_models(model, 16, 0)
    assert [stage.dtype for stage in G.stages] == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert [stage.dtype for stage in D.stages] == [torch.bfloat16, torch.bfloat16, torch.float32]
    with torch.no_grad():
        images = G(torch.randn(2, 16))
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        assert D(images).dtype == torch.float32


def test_default_widths_follow_r3gans_presets_and_bad_widths_are_refused():
    with torch.device("meta"):  # shapes only: the preset's widths make 50 M parameters
        G, _ = build_models(ModelConfig(family="r3gan", z_dim=8, stage_widths=[], group_channels=16), 64, 0)
    assert [stage.blocks[0].conv1.in_channels for stage in G.stages] == [768, 768, 768, 768, 384]
    assert G.stages[4].blocks[0].conv2.groups == 48  # FFHQ-64's cardinalities: 96 up to 32 px, then 48
    with pytest.raises(ConfigError, match="model.stage_widths: 32 px needs 4 stages"):
        build_models(ModelConfig(family="r3gan", stage_widths=[32, 32]), 32, 0)
    with pytest.raises(ConfigError, match="model.stage_blocks: 32 px needs 4 stages"):
        build_models(ModelConfig(family="r3gan", stage_widths=[32, 32, 24, 16], stage_blocks=[2]), 32, 0)
    with pytest.raises(ConfigError, match="model.stage_widths: .*groups of model.group_channels"):
        build_models(ModelConfig(family="r3gan", stage_widths=[32, 32, 24, 12]), 32, 0)
    with pytest.raises(ConfigError, match="model.bf16_stages"):
        build_models(ModelConfig(family="r3gan", stage_widths=[32, 32, 24, 16], bf16_stages=5), 32, 0)


def test_only_r3gan_checkpoints_record_its_model_fields():
    assert "stage_widths" not in model_description(ModelConfig(family="dcgan"), 32, 0)  # older ones still load
    described = model_description(fixture_model(), 32, 4)
    assert described["stage_widths"] == [32, 32, 24, 16] and described["group_channels"] == 16


def assert_gradients_match(network: torch.nn.Module, reference: dict, generator: bool) -> None:
    expected = reference_state(reference, generator)
    grads = {name: param.grad for name, param in network.named_parameters()}
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert grad is not None and (grad - expected[name]).abs().max() <= 1e-4 * expected[name].abs().max(), name


def test_relativistic_d_loss_with_r1_and_r2_matches_r3gans_step():
    G, D = fixture_networks()
    reference = torch.load(FIXTURES / "losses.pt")
    labels = reference["c"]
    fake = G(reference["z"], labels)  # with G's graph: the D loss must not train G
    terms = relativistic_d_loss(lambda x: D(x, labels), reference["real"], fake, reference["gamma"])
    for ours, theirs in ((terms.relativistic_logits, "D_RelativisticLogits"), (terms.adversarial, "D_AdversarialLoss"),
                         (terms.r1, "R1Penalty"), (terms.r2, "R2Penalty"), (terms.loss, "D_loss")):
        assert ours.shape == reference[theirs].shape
        assert (ours - reference[theirs]).abs().max() <= TOLERANCE, theirs
    assert torch.allclose(terms.relativistic_logits, reference["real_logits"] - reference["fake_logits"], atol=1e-5)
    terms.loss.backward()
    assert_gradients_match(D, reference["D_grads"], generator=False)
    assert all(param.grad is None for param in G.parameters())


def test_relativistic_g_loss_matches_r3gans_step():
    G, D = fixture_networks()
    D.requires_grad_(False)  # as R3GAN steps G: only the stepped network requires grad
    reference = torch.load(FIXTURES / "losses.pt")
    labels = reference["c"]
    fake = G(reference["z"], labels)
    assert (fake - reference["fake"]).abs().max() <= TOLERANCE
    terms = relativistic_g_loss(lambda x: D(x, labels), reference["real"], fake)
    for ours, theirs in ((terms.relativistic_logits, "G_RelativisticLogits"), (terms.adversarial, "G_AdversarialLoss"),
                         (terms.loss, "G_loss")):
        assert (ours - reference[theirs]).abs().max() <= TOLERANCE, theirs
    assert terms.r1 is None and terms.r2 is None
    terms.loss.backward()
    assert_gradients_match(G, reference["G_grads"], generator=True)


# A network snapshot R3GAN's own training loop wrote (shared/parity/r3gan-pkl-uncond, see the README there):
# 32 px, unconditional, after one training iteration, with the PNGs R3GAN's gen_images.py writes for G_ema.

R3GAN_PICKLE = Path(__file__).parent / "fixtures" / "r3gan-pkl-uncond"
R3GAN_CODE = ("R3GAN", "BaselineGAN", "training", "torch_utils", "dnnlib")  # what the pickle names


def png_pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).int()


def imported_networks(source: Path) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """A pickle's checkpoint state and the networks its model description builds, with its G_ema and D."""
    state = import_weights(str(source))
    model = state["model"]
    config = ModelConfig(**{f.name: model[f.name] for f in fields(ModelConfig) if f.name in model})
    G, D = build_models(config, model["resolution"], model["num_classes"])
    load_exactly(G, state["G_ema"], "G_ema")
    load_exactly(D, state["D"], "D")
    return state, G.eval(), D.eval()


def test_a_pickle_r3gan_wrote_gives_its_images_and_logits_without_running_its_code():
    state, G, D = imported_networks(R3GAN_PICKLE / "network-snapshot.pkl")
    assert not [m for m in sys.modules if m.split(".")[0] in R3GAN_CODE], "nothing the pickle names was imported"
    model = state["model"]
    assert state["iteration"] == 0 and model["family"] == "r3gan" and model["num_classes"] == 0
    assert (model["resolution"], model["z_dim"], model["stage_widths"], model["stage_blocks"]) == (
        32, 24, [24, 16, 16, 8], [1, 2, 1, 2])
    assert not torch.equal(state["G"]["to_rgb.weight"], state["G_ema"]["to_rgb.weight"]), "G and G_ema both kept"
    reference = torch.load(R3GAN_PICKLE / "expected" / "D.pt")
    with torch.no_grad():
        assert (D(reference["images"]) - reference["logits"]).abs().max() <= TOLERANCE
        for seed in range(4):  # gen_images.py's z and conversion
            z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim))
            expected = png_pixels(R3GAN_PICKLE / "expected" / f"seed{seed:04d}.png")
            assert torch.equal(to_uint8(G(z))[0].int(), expected), f"seed {seed}"


def test_generate_from_an_r3gan_pickle_writes_gen_images_pngs(tmp_path):
    from daskgan.tools.cli import main

    source = str(R3GAN_PICKLE / "network-snapshot.pkl")
    assert main(["generate", source, "--seeds", "0-3", "--out", str(tmp_path / "pngs")]) == 0
    assert main(["import", source, "--out", str(tmp_path / "imported.pt")]) == 0
    assert main(["generate", str(tmp_path / "imported.pt"), "--seeds", "2", "--out", str(tmp_path / "again")]) == 0
    for seed in range(4):
        written = png_pixels(tmp_path / "pngs" / f"seed{seed:04d}.png")
        expected = png_pixels(R3GAN_PICKLE / "expected" / f"seed{seed:04d}.png")
        # daskgan rounds (x + 1) * 127.5 where gen_images.py truncates x * 127.5 + 128: ties may differ by one
        assert written.shape == expected.shape and (written - expected).abs().max() <= 1, f"seed {seed}"
    assert torch.equal(png_pixels(tmp_path / "again" / "seed0002.png"), png_pixels(tmp_path / "pngs" / "seed0002.png"))


def unframed(data: bytes) -> bytes:
    """A protocol-4 pickle without its FRAME opcodes (optional), so strings in it can change length."""
    ops = list(pickletools.genops(data))
    ends = [position for _, _, position in ops[1:]] + [len(data)]
    return b"".join(data[position:end] for (op, _, position), end in zip(ops, ends) if op.name != "FRAME")


def test_a_pickle_with_r3gans_older_names_is_read_as_its_legacy_module_maps_them(tmp_path):
    data = unframed((R3GAN_PICKLE / "network-snapshot.pkl").read_bytes())
    renames = [(f"R3GAN.{module}", f"BaselineGAN.{module}") for module in ("Networks", "FusedOperators", "Resamplers")]
    for new, old in renames + [("training.networks", "training.networks_baseline")]:
        text = b"\x8c" + bytes([len(new)]) + new.encode()  # SHORT_BINUNICODE
        assert data.count(text) == 1
        data = data.replace(text, b"\x8c" + bytes([len(old)]) + old.encode())
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(data)
    state = import_weights(str(legacy))
    current = import_weights(str(R3GAN_PICKLE / "network-snapshot.pkl"))
    assert state["model"] == current["model"]
    assert all(torch.equal(state["G_ema"][k], current["G_ema"][k]) for k in current["G_ema"])


EXPLOIT = pickle.dumps(Exploit(), protocol=2)[2:-1]  # posix.system('touch exploited'), called by REDUCE


@pytest.mark.parametrize("network, refusal", [
    (crafted_module("training.networks", "Generator", {"z_dim": EXPLOIT}), r"it asks to import posix\.system"),
    (crafted_module("training.networks", "Generator", {"_modules": pushed({"Model": None})}), None),
    (crafted_module("R3GAN.Networks", "Evil", {}), r"it asks to import R3GAN\.Networks\.Evil"),
    (crafted_module("training.networks", "Generator", {}, arguments=pushed(("x",))),
     "it makes a training.networks.Generator with arguments"),
], ids=["reduce-in-its-state", "no-model", "class-outside-the-list", "newobj-arguments"])
def test_an_r3gan_pickle_carrying_anything_else_is_refused_unrun(tmp_path, monkeypatch, network, refusal):
    monkeypatch.chdir(tmp_path)
    url = tmp_path / "evil.pkl"
    url.write_bytes(crafted_pickle({"G": network, "G_ema": network}))
    with pytest.raises(UnsafePickle if refusal else CheckpointUnreadable,
                       match=f"evil.pkl: {refusal or 'its G holds no R3GAN.Networks model'}"):
        import_weights(str(url))
    assert not (tmp_path / "exploited").exists()


def test_an_r3gan_pickle_declaring_too_many_blocks_is_refused_before_building(tmp_path):
    weight = pushed({"MainLayers.0.Layers.65.LinearLayer1.Layer.weight": torch.zeros(1)})
    model = crafted_module("R3GAN.Networks", "Generator", {"_parameters": weight})
    network = crafted_module("training.networks", "Generator", {"_modules": b"}" + pushed("Model") + model + b"s",
                                                                "z_dim": pushed(8), "c_dim": pushed(0),
                                                                "img_resolution": pushed(8)})
    url = tmp_path / "deep.pkl"
    url.write_bytes(crafted_pickle({"G": network, "G_ema": network}))
    with pytest.raises(CheckpointUnreadable, match=r"deep.pkl: stages of \[65\] residual blocks; .* 1 to 64 blocks"):
        import_weights(str(url))
