"""daskgan's BigGAN with BigGAN-PyTorch's weights gives its outputs; its weights folders import and fine-tune.

Fixtures (``tests/fixtures/biggan-32/``) come from ``shared/parity/biggan-32``: a weights folder exactly as
ajbrock/BigGAN-PyTorch (commit 9845943) ``utils.save_weights`` writes one (32 px, ch 8, 5 classes, hierarchical
z 60, shared embedding 24, attention at 16, converged SN vectors) and its G/D outputs on fixed inputs, eval mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daskgan.models.biggan import SN, Discriminator
from daskgan.pretrained import import_weights
from daskgan.tools.generate import load_generator

FIXTURES = Path(__file__).parent / "fixtures" / "biggan-32"
WEIGHTS = FIXTURES / "weights"


def test_generator_and_discriminator_reproduce_biggan_pytorch():
    state = import_weights(str(WEIGHTS))
    io = torch.load(FIXTURES / "io.pt")
    assert state["model"]["family"] == "biggan" and state["model"]["num_classes"] == 5
    with torch.no_grad():
        images = load_generator(state, str(WEIGHTS))(io["z"], io["y"])
        model = state["model"]
        D = Discriminator(32, 5, model["d_channels"], model["attention_resolution"], SN(1, 1))
        D.load_state_dict(state["D"])
        logits = D.eval()(io["images"], io["y"])
    assert (images - io["images"]).abs().max() <= 1e-4
    assert (logits - io["logits"].flatten()).abs().max() <= 1e-3


def test_eval_spectral_norm_takes_one_unsaved_power_step():
    from daskgan.models.spectral import SNLinear

    torch.manual_seed(0)
    layer = SNLinear(6, 4)
    stored = layer.u0.clone()
    x = torch.randn(3, 6)
    layer.eval()
    evaluated = layer(x)
    assert torch.equal(layer.u0, stored), "eval keeps the stored vector"
    u = torch.nn.functional.normalize(stored @ layer.weight, dim=1)  # the reference's step: v from the stored u
    u_next = torch.nn.functional.normalize(u @ layer.weight.T, dim=1)
    sigma = (u @ layer.weight.T * u_next).sum()
    assert torch.allclose(evaluated, x @ (layer.weight / sigma).T + layer.bias, atol=1e-6)


def test_attention_convs_have_no_bias_as_the_reference():
    D = Discriminator(32, 5, ch=8, attention=16)
    assert not [name for name, _ in D.named_parameters() if name.startswith("attention") and name.endswith("bias")]
    assert sorted({name.split(".")[1] for name, _ in D.named_parameters() if name.startswith("attention")}) == \
        ["0", "1", "2", "3"], "at 32 px the reference labels every D block 16: attention follows all four"


def five_class_dataset(url: str, options: dict) -> None:
    """The 4-class shapes dataset plus a fifth class folder (copies of the circles), as the weights have 5 classes."""
    from daskgan.data import synthetic
    from daskgan.run import storage

    synthetic.write_dataset(url, images=20, resolution=32, storage_options=options)
    fs, root = storage.filesystem(url, options)
    circles = fs.find(f"{root.rstrip('/')}/circle")
    storage.write_many({f"{url}/zz-fifth/{i}.png": fs.cat_file(path) for i, path in enumerate(circles)}, options)


@pytest.mark.slow
def test_fine_tuning_from_a_biggan_pytorch_folder_on_two_workers(dask_client, s3_bucket):
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig
    from daskgan.run import checkpoint, storage
    from daskgan.run.records import load

    bucket, options = s3_bucket
    five_class_dataset(f"{bucket}/data", options)
    for file in WEIGHTS.iterdir():
        storage.write_bytes(f"{bucket}/biggan/weights/{file.name}", file.read_bytes(), options)
    job = JobConfig.from_dict({
        "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 32, "batch_size": 2},
        "model": {"family": "biggan", "z_dim": 60, "g_channels": 8, "d_channels": 8, "shared_dim": 24,
                  "attention_resolution": 16},
        "train": {"iterations": 2, "init_from": f"{bucket}/biggan/weights", "lr_g": 1e-5, "lr_d": 3e-5},
        "output": {"run_url": f"{bucket}/tuned", "storage_options": options, "checkpoint_every": 2}})
    summary = run_job(dask_client, job)
    assert load(job.output.run_url, options)["iteration"].tolist() == [1, 2]
    tuned, imported = checkpoint.load(summary["checkpoint"], options), import_weights(str(WEIGHTS))
    assert [g["lr"] for g in tuned["opt_G"]["param_groups"]] == [1e-5]
    assert [g["lr"] for g in tuned["opt_D"]["param_groups"]] == [3e-5], "the job's learning rates, not the folder's"
    moved = (tuned["G"]["linear.weight"] - imported["G"]["linear.weight"]).abs().max()
    assert 0 < moved < 0.01, "G continued from the folder's weights"


def test_weights_of_another_class_count_are_refused_naming_the_tensor():
    from daskgan.config import JobConfig
    from daskgan.errors import CheckpointMismatch
    from daskgan.models import build_models, load_exactly

    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 32},
                               "model": {"family": "biggan", "z_dim": 60, "g_channels": 8, "d_channels": 8,
                                         "shared_dim": 24, "attention_resolution": 16},
                               "output": {"run_url": "memory://run"}})
    G, _ = build_models(job.model, 32, 4)
    with pytest.raises(CheckpointMismatch, match=r"shapes \(given vs built\) shared\.weight \(5, 24\) vs \(4, 24\)"):
        load_exactly(G, import_weights(str(WEIGHTS))["G"], "G.pth")


def test_standing_statistics_replace_the_batchnorm_statistics_used_at_sampling(tmp_path):
    from PIL import Image

    from daskgan.models.layers import standing_statistics
    from daskgan.tools.cli import main

    state = import_weights(str(WEIGHTS))
    G = load_generator(state, "folder")
    stored = G.blocks[0].bn1.norm.running_mean.clone()
    z, y = torch.randn(8, 60), torch.arange(8) % 5
    before = G(z, y)
    torch.manual_seed(0)
    standing_statistics(G, lambda: (torch.randn(16, 60), torch.randint(5, (16,))), passes=4)
    assert not G.training and not torch.allclose(G.blocks[0].bn1.norm.running_mean, stored)
    assert G.blocks[0].bn1.norm.momentum == 0.1, "the layer's own momentum comes back"
    assert not torch.allclose(G(z, y), before)
    assert main(["sample", str(WEIGHTS), "--out", str(tmp_path / "plain"), "--per-class", "2"]) == 0
    assert main(["sample", str(WEIGHTS), "--out", str(tmp_path / "standing"), "--per-class", "2",
                 "--standing-stats", "4"]) == 0
    plain, standing = (Image.open(tmp_path / d / "classes.png").tobytes() for d in ("plain", "standing"))
    assert plain != standing


def test_evaluation_with_standing_statistics_leaves_the_runs_generator_alone(tmp_path):
    from daskgan.config import JobConfig
    from daskgan.data import synthetic
    from daskgan.data.index import index_images
    from daskgan.training.evaluation import Evaluator

    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=8, resolution=32)
    G = load_generator(import_weights(str(WEIGHTS)), "folder")
    stored = G.blocks[0].bn1.norm.running_mean.clone()
    scores = {}
    for passes in (0, 3):
        config = JobConfig.from_dict({"name": "m", "data": {"url": data_url, "resolution": 32, "batch_size": 4},
                                      "model": {"family": "biggan", "z_dim": 60},
                                      "metrics": {"every": 1, "images": 8, "standing_stats": passes, "kinds": ["fid"]},
                                      "output": {"run_url": tmp_path.as_uri() + f"/run{passes}"}})
        scores[passes] = Evaluator(config, index_images(data_url), torch.device("cpu")).evaluate(G, 5, 1)["fid"]
    assert scores[0] != scores[3], "the fakes were drawn with other BatchNorm statistics"
    assert torch.equal(G.blocks[0].bn1.norm.running_mean, stored) and not G.training


def folder_with_moments(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """The fixture folder with G_optim.pth/D_optim.pth holding moments: parameter number i (BigGAN-PyTorch's
    parameters() order: the network file's order without its buffers) gets exp_avg = i, exp_avg_sq = 2i, step i+1;
    returns the folder and each network's reference parameter names in that order."""
    import re
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS, folder)
    buffers = re.compile(r"\.(u\d+|sv\d+|stored_mean|stored_var)$")
    names = {}
    for network in ("G", "D"):
        weights = torch.load(folder / f"{network}.pth", weights_only=True)
        names[network] = [n for n in weights if not buffers.search(n)]
        saved = torch.load(folder / f"{network}_optim.pth", weights_only=True)
        saved["param_groups"][0]["lr"], saved["param_groups"][0]["eps"] = 0.123, 0.5  # must not be taken
        saved["state"] = {i: {"step": torch.tensor(i + 1.0), "exp_avg": torch.full_like(weights[n], float(i)),
                              "exp_avg_sq": torch.full_like(weights[n], 2.0 * i)}
                          for i, n in enumerate(names[network])}
        torch.save(saved, folder / f"{network}_optim.pth")
    return folder, names


def test_fine_tuning_can_take_the_folders_optimizer_moments_by_parameter_name(tmp_path, process_group):
    from daskgan.config import JobConfig
    from daskgan.training.setup import build_gan, initialise_from

    folder, names = folder_with_moments(tmp_path)
    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 32},
                               "model": {"family": "biggan", "z_dim": 60, "g_channels": 8, "d_channels": 8,
                                         "shared_dim": 24, "attention_resolution": 16},
                               "train": {"init_from": str(folder), "init_optimizers": True, "lr_g": 1e-5,
                                         "adam_eps": 1e-6},
                               "output": {"run_url": (tmp_path / "run").as_uri()}})
    gan = build_gan(job, 5, torch.device("cpu"))
    initialise_from(gan, job)
    for optimizer, network, key in ((gan.opt_G, gan.G.module, "G"), (gan.opt_D, gan.D.module, "D")):
        reference = torch.load(folder / f"{key}.pth", weights_only=True)
        taken = []
        for parameter in network.parameters():
            number = int(optimizer.state[parameter]["exp_avg"].flatten()[0])
            assert torch.equal(parameter.detach(), reference[names[key][number]]), \
                f"moments {number} ({names[key][number]}) landed on a parameter that holds another tensor"
            assert float(optimizer.state[parameter]["step"]) == number + 1
            taken.append(number)
        assert sorted(taken) == list(range(len(names[key]))), "every reference parameter's moments, once"
    assert [g["lr"] for g in gan.opt_G.param_groups] == [1e-5] and gan.opt_G.param_groups[0]["eps"] == 1e-6


def test_optimizer_moments_from_a_source_without_them_are_one_clear_error(tmp_path, process_group):
    from daskgan.config import JobConfig
    from daskgan.errors import ConfigError
    from daskgan.training.setup import build_gan, initialise_from

    folder, _ = folder_with_moments(tmp_path)
    (folder / "D_optim.pth").unlink()
    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 32},
                               "model": {"family": "biggan", "z_dim": 60, "g_channels": 8, "d_channels": 8,
                                         "shared_dim": 24, "attention_resolution": 16},
                               "train": {"init_from": str(folder), "init_optimizers": True},
                               "output": {"run_url": (tmp_path / "run").as_uri()}})
    with pytest.raises(ConfigError, match="holds no optimizer state for both G and D"):
        initialise_from(build_gan(job, 5, torch.device("cpu")), job)
    with pytest.raises(ConfigError, match="train.init_optimizers: needs train.init_from"):
        JobConfig.from_dict({"name": "t", "data": {"url": "memory://x"}, "train": {"init_optimizers": True},
                             "output": {"run_url": "memory://run"}})


def test_import_of_a_biggan_pytorch_folder_writes_a_checkpoint_and_says_it_is_biggan(tmp_path, capsys):
    from daskgan.run import checkpoint
    from daskgan.tools.cli import main

    assert main(["import", str(WEIGHTS), "--out", str(tmp_path / "imported.pt")]) == 0
    said = capsys.readouterr().out
    assert "biggan 32x32, 5 classes" in said and "StyleGAN2" not in said, said
    assert checkpoint.load(str(tmp_path / "imported.pt"))["model"]["family"] == "biggan"
