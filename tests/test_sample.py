"""daskgan sample: class grids, z and class interpolations, truncation."""

from dataclasses import asdict

import pytest
import torch
from PIL import Image

from daskgan.config import ModelConfig
from daskgan.models import build_models
from daskgan.run import checkpoint
from daskgan.tools.cli import main
from daskgan.tools.generate import truncated_normal
from daskgan.tools.sample import sample


def biggan_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ModelConfig(family="biggan", z_dim=20, g_channels=4, d_channels=4, shared_dim=8, attention_resolution=0)
    G, D = build_models(model, 32, 3)
    state = {"iteration": 1, "model": {**asdict(model), "resolution": 32, "num_classes": 3}, "G": G.state_dict(),
             "D": D.state_dict()}
    return checkpoint.save(tmp_path.as_uri() + "/run", state, 1, keep=1)


def tiles(path, columns, rows, size=32, padding=2):
    image = torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32).view(
        rows * (size + padding) + padding, columns * (size + padding) + padding, 3)
    return [[image[padding + r * (size + padding):][:size, padding + c * (size + padding):][:, :size]
             for c in range(columns)] for r in range(rows)]


def test_grids_have_a_row_per_class_and_interpolations_move(tmp_path, capsys):
    url = biggan_checkpoint(tmp_path)
    assert main(["sample", url, "--out", str(tmp_path / "out"), "--classes", "0,2", "--per-class", "4",
                 "--steps", "5"]) == 0
    assert "classes.png, interp_class.png, interp_z.png" in capsys.readouterr().out
    grid = tiles(tmp_path / "out" / "classes.png", columns=4, rows=2)
    assert not torch.equal(grid[0][0], grid[1][0]), "the same z differs by class"
    blend = tiles(tmp_path / "out" / "interp_class.png", columns=5, rows=4)
    assert torch.equal(blend[0][0], grid[0][0]) and torch.equal(blend[0][4], grid[1][0]), "ends are the two classes"
    walk = tiles(tmp_path / "out" / "interp_z.png", columns=5, rows=2)
    assert all(not torch.equal(walk[0][i], walk[0][i + 1]) for i in range(4))


def test_bad_classes_and_truncation_are_refused(tmp_path, capsys):
    url = biggan_checkpoint(tmp_path)
    assert main(["sample", url, "--out", str(tmp_path / "x"), "--classes", "5"]) == 2
    assert "out of range: the model knows classes 0 to 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threshold must be > 0"):
        sample(url, (tmp_path / "y").as_uri(), truncation=0.0)


def test_truncated_normal_stays_inside_the_threshold():
    z = truncated_normal(500, 16, 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5 and z.std() > 0.2
