"""daskgan's StyleGAN2 networks with NVlabs' weights give NVlabs' outputs.

Fixtures (``tests/fixtures/nvlabs/``) come from ``shared/parity``: NVlabs/stylegan2-ada-pytorch (commit d72cc7d)
run on the CPU with seeded random weights, eval mode, fp32, conv_clamp 256; see the README there. Tensors only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from nvlabs_pickles import crafted_network, crafted_pickle, generator_kwargs

from daskgan.errors import CheckpointUnreadable, UnsafePickle
from daskgan.models.resample import downsample2d, filter2d, fir_filter, upsample2d
from daskgan.models.stylegan2 import Discriminator, Generator
from daskgan.pretrained import import_weights
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
            assert difference < TOLERANCE, \
                f"{key}: max |difference| {difference:.3g} (outputs of scale {io[key].abs().max():.3g})"


@pytest.mark.parametrize("name", ["sg2-64-uncond", "sg2-64-cond"])
def test_discriminator_reproduces_nvlabs_logits(name):
    _, D, io = networks(name)
    with torch.no_grad():
        logits = D(io["D_images"], labels_of(io))
    difference = (logits - io["D_logits"].flatten()).abs().max()
    assert difference < TOLERANCE, f"max |difference| {difference:.3g}"


# --- NVlabs network pickles ------------------------------------------------------------------------------------
# Written by NVlabs' own code (shared/parity/nvlabs-pkl-16-cond, see tests/fixtures/nvlabs-pkl-16-cond/README.md):
# 16 px, conditioned on 4 classes, as numpy 1 (the released pickles) and numpy 2 name their numpy scalars.

PICKLES = Path(__file__).parent / "fixtures" / "nvlabs-pkl-16-cond"
NVLABS_WRITTEN = [PICKLES / "network-snapshot.pkl", PICKLES / "network-snapshot-np2.pkl"]
NVLABS_CODE = ("torch_utils", "dnnlib", "training")  # what the source stored in the pickles imports


def built_networks(state: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D as a checkpoint state's model description builds them, with its G_ema and D weights, eval mode."""
    from dataclasses import fields

    from daskgan.config import ModelConfig
    from daskgan.models import build_models, load_exactly

    model = state["model"]
    G, D = build_models(ModelConfig(**{f.name: model[f.name] for f in fields(ModelConfig) if f.name in model}),
                        model["resolution"], model["num_classes"])
    load_exactly(G, state["G_ema"], "G_ema")
    load_exactly(D, state["D"], "D")
    return G.eval(), D.eval()


@pytest.mark.parametrize("source", NVLABS_WRITTEN, ids=lambda p: p.name)
def test_a_pickle_nvlabs_wrote_imports_without_running_its_code(source):
    import sys

    state = import_weights(str(source))
    assert not [m for m in sys.modules if m.split(".")[0] in NVLABS_CODE], "the pickle's source code was not run"
    assert state["iteration"] == 0 and state["model"]["family"] == "stylegan2"
    assert (state["model"]["resolution"], state["model"]["num_classes"], state["model"]["z_dim"]) == (16, 4, 64)
    _, D = built_networks(state)
    reference = torch.load(PICKLES / "expected" / "D.pt")
    with torch.no_grad():
        logits = D(reference["images"], reference["labels"].argmax(1))
    difference = (logits - reference["logits"].flatten()).abs().max()
    assert difference < TOLERANCE, f"D's logits: max |difference| {difference:.3g}"


def png_pixels(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).int()


@pytest.mark.parametrize("source", NVLABS_WRITTEN, ids=lambda p: p.name)
def test_generate_from_a_pickle_nvlabs_wrote_writes_nvlabs_images(tmp_path, source):
    from daskgan.tools.cli import main

    for seed in range(4):  # NVlabs' generate.py was run with class seed % 4
        for psi in ("1.0", "0.7"):
            out = tmp_path / f"psi{psi}"
            assert main(["generate", str(source), "--seeds", str(seed), "--class", str(seed % 4), "--trunc", psi,
                         "--out", str(out)]) == 0
            written = png_pixels(out / f"seed{seed:04d}.png")
            expected = png_pixels(PICKLES / "expected" / f"seed{seed:04d}-trunc{psi}.png")
            assert written.shape == expected.shape == (16, 16, 3)
            assert (written - expected).abs().max() <= 1, f"seed {seed}, psi {psi}: within one level per pixel"
    assert main(["import", str(source), "--out", str(tmp_path / "imported.pt")]) == 0
    assert main(["generate", str(tmp_path / "imported.pt"), "--seeds", "3", "--class", "3", "--trunc", "0.7",
                 "--out", str(tmp_path / "again")]) == 0
    again, first = (png_pixels(tmp_path / folder / "seed0003.png") for folder in ("again", "psi0.7"))
    assert torch.equal(again, first), "the imported checkpoint draws the same image"


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("touch exploited",)


@pytest.mark.parametrize("payload", [Exploit(), {"G": Exploit()}, {"G": [print]}])
def test_a_pickle_that_imports_anything_else_is_refused_unrun(tmp_path, monkeypatch, payload):
    import pickle

    monkeypatch.chdir(tmp_path)
    url = tmp_path / "evil.pkl"
    url.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickle, match=r"evil.pkl: it asks to import (posix\.system|builtins\.print); only "):
        import_weights(str(url))
    assert not (tmp_path / "exploited").exists()


class ObjectScalar:
    """A numpy scalar of the object dtype, which could hold anything: pickled as numpy pickles scalars."""

    def __reduce__(self):
        import os

        import numpy as np

        return np._core.multiarray.scalar, (np.dtype(object), os.system)


def test_numpy_scalars_other_than_simple_numbers_are_refused_unrun(tmp_path):
    import pickle

    url = tmp_path / "object.pkl"
    url.write_bytes(pickle.dumps({"G": ObjectScalar()}, protocol=3))
    with pytest.raises(UnsafePickle, match="object.pkl: it asks for numpy dtype 'O8'; only simple numeric dtypes"):
        import_weights(str(url))


def test_a_pickle_of_another_shape_is_one_clear_error(tmp_path):
    import pickle

    url = tmp_path / "other.pkl"
    url.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    with pytest.raises(CheckpointUnreadable, match="other.pkl: an NVlabs pickle holds a dict with G and G_ema"):
        import_weights(str(url))


def opcode_text(value: str) -> bytes:
    return b"X" + struct.pack("<I", len(value.encode())) + value.encode()


def opcode_dict(items: dict[str, bytes]) -> bytes:
    """A pickle's opcodes building a dict of ``items`` (their values already opcodes)."""
    return b"}(" + b"".join(opcode_text(key) + value for key, value in items.items()) + b"u"


def persistent_object(modules: bytes, memo: int) -> bytes:
    """Opcodes making an NVlabs persistent network (a generator's init_kwargs, these ``_modules``), memoized at
    ``memo``: what ``torch_utils.persistence`` pickles, written here opcode by opcode to share objects as a
    crafted pickle's memo can."""
    kwargs = opcode_dict({name: b"K" + bytes([value]) for name, value in
                          {"z_dim": 8, "w_dim": 8, "c_dim": 0, "img_resolution": 16, "img_channels": 3}.items()})
    meta = opcode_dict({"type": opcode_text("class"), "class_name": opcode_text("training.networks.Generator"),
                        "state": opcode_dict({"_init_kwargs": kwargs, "_modules": modules})})
    return (b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n" + meta + b"\x85R" + b"q" + bytes([memo]))


def top_level_networks(memo: int) -> bytes:
    """Opcodes ending a pickle with NVlabs' top-level dict, its G and G_ema the network memoized at ``memo``."""
    return opcode_dict({"G": b"h" + bytes([memo]), "G_ema": b"h" + bytes([memo])}) + b"."


HOLDS_ITSELF = (b"\x80\x02" + persistent_object(b"}q\x01", 2) + b"h\x01" + opcode_text("self") + b"h\x02" + b"s00"
                + top_level_networks(2))
CHILD_HELD_TWICE = (b"\x80\x02" + persistent_object(b"}", 1) + b"0"
                    + persistent_object(opcode_dict({"a": b"h\x01", "b": b"h\x01"}), 2) + b"0" + top_level_networks(2))


@pytest.mark.parametrize("crafted", [HOLDS_ITSELF, CHILD_HELD_TWICE], ids=["holds-itself", "child-held-twice"])
def test_a_pickle_sharing_a_sub_network_is_one_clear_error(tmp_path, crafted):
    """A network holding itself escaped as RecursionError; children held twice, chained, make 2**depth names."""
    url = tmp_path / "shared.pkl"
    url.write_bytes(crafted)
    with pytest.raises(CheckpointUnreadable, match="a sub-network held twice"):
        import_weights(str(url))


@pytest.mark.parametrize("crafted", [
    b"\x80\x04" + opcode_text("os\n" + "x" * 100_000) + opcode_text("system") + b"\x93.",
    b"\x80\x02cnumpy\ndtype\n" + opcode_text("f8") + b"\x88\x88\x87R" + opcode_text("<" * 100_000) + b"b.",
], ids=["import-name", "dtype-state"])
def test_a_crafted_pickles_names_make_a_short_one_line_error(tmp_path, crafted):
    """A module name holding a line break and 100 KB went whole into the message, as did a dtype's state."""
    url = tmp_path / "crafted.pkl"
    url.write_bytes(crafted)
    with pytest.raises(UnsafePickle) as refused:
        import_weights(str(url))
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400, str(refused.value)[:400]


@pytest.mark.slow
def test_fine_tuning_from_an_nvlabs_pickle_on_two_workers(dask_client, shapes_in_bucket):
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig
    from daskgan.run import checkpoint, storage
    from daskgan.run.records import load

    bucket, options = shapes_in_bucket(16, resolution=16)  # 4 classes of shapes, as the pickle's 4
    source = f"{bucket}/released/network-snapshot.pkl"
    storage.write_bytes(source, NVLABS_WRITTEN[0].read_bytes(), options)
    job = JobConfig.from_dict({
        "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16, "batch_size": 2},
        "model": {"family": "stylegan2", "z_dim": 64, "w_dim": 64, "mapping_layers": 2, "fmaps": 2048 / 32768,
                  "channel_max": 64, "mbstd_group": 2, "conditional": True},
        "train": {"iterations": 3, "init_from": source, "freeze_d": 2, "ema_kimg": 0.01, "r1_gamma": 1.0},
        "augment": {"mode": "ada"},
        "output": {"run_url": f"{bucket}/tuned", "storage_options": options, "grid_every": 3,
                   "checkpoint_every": 3, "flush_every": 1}})
    assert job.augment.speed_kimg == 100 and job.train.ema_rampup is None, "NVlabs' transfer settings"
    summary = run_job(dask_client, job)
    assert load(job.output.run_url, options)["iteration"].tolist() == [1, 2, 3], "a new run counts from 0"
    assert storage.exists(f"{job.output.run_url}/grids/000000003.png", options)
    tuned = checkpoint.load(summary["checkpoint"], options)
    imported = import_weights(source, options)
    frozen = ("blocks.0.fromrgb.weight", "blocks.0.conv0.weight")
    assert all(torch.equal(tuned["D"][k], imported["D"][k]) for k in frozen), "Freeze-D: the first 2 layers kept"
    assert not torch.equal(tuned["D"]["blocks.0.conv1.weight"], imported["D"]["blocks.0.conv1.weight"])
    moved = [k for k in imported["G"] if not torch.equal(tuned["G"][k], imported["G"][k])]
    assert moved and (tuned["G"]["blocks.0.const"] - imported["G"]["blocks.0.const"]).abs().max() < 0.1, \
        "G trained on from the pickle's weights, not from scratch"


def test_weights_of_another_resolution_are_refused_naming_the_tensor():
    from daskgan.config import JobConfig
    from daskgan.errors import CheckpointMismatch
    from daskgan.models import build_models, load_exactly

    source = NVLABS_WRITTEN[0]  # 16 px
    job = JobConfig.from_dict({"name": "t", "data": {"url": "memory://x", "resolution": 32},
                               "model": {"family": "stylegan2", "z_dim": 64, "w_dim": 64, "mapping_layers": 2,
                                         "fmaps": 2048 / 32768, "channel_max": 64, "conditional": True},
                               "output": {"run_url": "memory://run"}})
    G, _ = build_models(job.model, 32, 4)
    with pytest.raises(CheckpointMismatch, match=r"snapshot.pkl G does not fit the job's network: missing .*blocks\.3"):
        load_exactly(G, import_weights(str(source))["G"], f"{source} G")


# --- crafted weights: what a file declares is built only when modest and matching the tensors it holds ----------


@pytest.mark.parametrize("init_kwargs, refusal", [
    (generator_kwargs(100_000, 100_000), "it declares networks of 20,051,946,751 values, more than the 536,870,912"),
    (generator_kwargs(64, 64, mapping_layers=10**6), "it declares mapping_layers 1000000, beyond what"),
    ({**generator_kwargs(64, 64), "img_resolution": 2**40}, "it declares resolution 1099511627776, beyond what"),
    ({**generator_kwargs(64, 64), "z_dim": 10**30}, "it declares networks that cannot be built"),
    ({**generator_kwargs(64, 64), "w_dim": "wide"}, "its init_kwargs are not a StyleGAN2-ADA network's"),
], ids=["40GB", "million_layers", "huge_resolution", "overflow", "not_a_number"])
def test_crafted_init_kwargs_are_refused_in_one_line_before_anything_is_built(tmp_path, capsys, init_kwargs, refusal):
    from daskgan.tools.cli import main

    source = tmp_path / "crafted.pkl"
    source.write_bytes(crafted_pickle({"G_ema": crafted_network(init_kwargs)}))
    assert main(["generate", str(source), "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"crafted.pkl: {refusal}" in lines[0], lines


PEAK_MEMORY = """
import resource, sys
from daskgan.tools.cli import main
out, sources = sys.argv[1], sys.argv[2:]
for number, source in enumerate(sources):
    main(["import", source, "--out", f"{out}/{number}.pt"])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)  # MiB (Linux: KiB)
"""


def test_declared_networks_without_their_tensors_are_refused_unbuilt(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "crafted.pkl"  # within the bound: 2 mapping layers of 8192 x 8192 (540 MB) if built
    source.write_bytes(crafted_pickle({"G_ema": crafted_network(generator_kwargs(8192, 8192))}))
    child = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(tmp_path), str(NVLABS_WRITTEN[0]), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert "crafted.pkl G_ema does not fit the networks it declares: missing blocks.0.const" in child.stderr
    genuine, crafted = (int(line) for line in child.stdout.split("\n") if line.isdigit())
    assert crafted - genuine < 200, f"peak memory grew {crafted - genuine} MiB reading the crafted pickle"
