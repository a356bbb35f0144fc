"""daskgan generate: images from a checkpoint for seeds and truncation psi."""

from dataclasses import asdict

import pytest
import torch
from PIL import Image

from daskgan.config import ModelConfig
from daskgan.models import build_models
from daskgan.run import checkpoint
from daskgan.tools.cli import main
from daskgan.tools.generate import generate, parse_seeds


def saved_run(tmp_path, family):
    torch.manual_seed(0)
    model = ModelConfig(family=family, z_dim=8, g_channels=4, d_channels=4, w_dim=8, mapping_layers=2,
                        fmaps=1 / 256, channel_max=16)
    G, D = build_models(model, 16, 0)
    run_url = tmp_path.as_uri() + "/run"
    state = {"iteration": 10, "model": {**asdict(model), "resolution": 16, "num_classes": 0}, "G": G.state_dict(),
             "G_ema": G.state_dict(), "D": D.state_dict()}
    if family == "stylegan2":
        state["G_ema"]["mapping.w_avg"] = torch.randn(8)
    return checkpoint.save(run_url, state, 10, keep=1)


def test_same_seed_same_image_and_truncation_to_zero_collapses(tmp_path):
    url = saved_run(tmp_path, "stylegan2")
    out = tmp_path / "out"
    written = generate(url, [1, 2, 3], out.as_uri())
    assert [w.rsplit("/", 1)[1] for w in written] == ["seed0001.png", "seed0002.png", "seed0003.png"]
    images = [Image.open(out / f"seed000{i}.png") for i in (1, 2, 3)]
    assert images[0].size == (16, 16) and images[0].mode == "RGB"
    assert images[0].tobytes() != images[1].tobytes()
    generate(url, [1], (tmp_path / "again").as_uri())
    assert Image.open(tmp_path / "again" / "seed0001.png").tobytes() == images[0].tobytes()
    generate(url, [1, 2], (tmp_path / "psi0").as_uri(), truncation=0.0)
    a, b = (Image.open(tmp_path / "psi0" / f"seed000{i}.png").tobytes() for i in (1, 2))
    assert a == b, "psi = 0 maps every z to the average w"


def test_dcgan_truncates_z_as_sample_does_and_cli_writes_images(tmp_path, capsys):
    url = saved_run(tmp_path, "dcgan")
    generate(url, [0], (tmp_path / "full").as_uri())
    generate(url, [0], (tmp_path / "trunc").as_uri(), truncation=0.3)
    assert main(["sample", url, "--out", str(tmp_path / "sampled"), "--per-class", "1", "--trunc", "0.3"]) == 0
    full, trunc, sampled = (Image.open(tmp_path / d / n) for d, n in
                            (("full", "seed0000.png"), ("trunc", "seed0000.png"), ("sampled", "classes.png")))
    assert full.tobytes() != trunc.tobytes(), "a z threshold changes the image"
    assert sampled.crop((2, 2, 18, 18)).tobytes() == trunc.tobytes(), "--trunc means the same in sample (same z)"
    with pytest.raises(ValueError, match="threshold must be > 0"):
        generate(url, [0], (tmp_path / "x").as_uri(), truncation=0.0)
    assert main(["generate", url, "--seeds", "0-2,5", "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [f"seed000{i}.png" for i in (0, 1, 2, 5)]
    assert "wrote 4 images" in capsys.readouterr().out


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7] and parse_seeds("5") == [5]


def test_conditional_checkpoints_need_a_class(tmp_path, capsys):
    torch.manual_seed(0)
    model = ModelConfig(family="stylegan2", z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 256, channel_max=16,
                        conditional=True)
    G, D = build_models(model, 16, 3)
    state = {"iteration": 1, "model": {**asdict(model), "resolution": 16, "num_classes": 3}, "G": G.state_dict(),
             "D": D.state_dict()}
    url = checkpoint.save(tmp_path.as_uri() + "/run", state, 1, keep=1)
    generate(url, [4], (tmp_path / "c0").as_uri(), class_index=0)
    generate(url, [4], (tmp_path / "c2").as_uri(), class_index=2)
    drawn = [Image.open(tmp_path / folder / "seed0004.png").tobytes() for folder in ("c0", "c2")]
    assert drawn[0] != drawn[1]
    assert main(["generate", url, "--seeds", "1", "--out", str(tmp_path / "none")]) == 2
    assert "conditioned on 3 classes: give a class from 0 to 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unconditional"):
        generate(saved_run(tmp_path, "dcgan"), [0], (tmp_path / "x").as_uri(), class_index=1)


def test_a_checkpoint_declaring_a_huge_model_is_refused_in_one_line(tmp_path, capsys):
    """A crafted checkpoint: its model description asks for 40 GB, its one tensor is a broadcast 4-byte value."""
    model = ModelConfig(family="stylegan2", z_dim=100_000, w_dim=100_000, mapping_layers=2, fmaps=1 / 256,
                        channel_max=16)
    state = {"iteration": 1, "model": {**asdict(model), "resolution": 16, "num_classes": 0},
             "G": {"mapping.w_avg": torch.zeros(1).expand(100_000)}}
    url = checkpoint.save(tmp_path.as_uri() + "/run", state, 1, keep=1)
    assert main(["generate", url, "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "000000001.pt: it declares networks of 20,011,523,263 values, more than" in lines[0], lines


def test_a_biggan_weights_folder_declaring_a_huge_model_is_refused_in_one_line(tmp_path, capsys):
    """A crafted BigGAN-PyTorch weights folder: its config asks for G_ch 100000 (terabytes), G.pth holds nothing."""
    config = {"dim_z": 120, "G_ch": 100_000, "D_ch": 8, "resolution": 32, "n_classes": 5, "shared_dim": 24,
              "hier": True, "G_shared": True, "G_attn": "0", "D_attn": "0"}
    torch.save({"config": config}, tmp_path / "state_dict.pth")
    torch.save({}, tmp_path / "G.pth")
    assert main(["generate", str(tmp_path), "--seeds", "0", "--class", "0", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "it declares networks of" in lines[0] and "more than the" in lines[0], lines
