"""BigGAN-PyTorch weights folders (``G.pth``, ``G_ema.pth``, ``D.pth``, ``state_dict.pth`` with ``config``), as
ajbrock's ``utils.save_weights`` writes them and its released checkpoints ship, as daskgan checkpoint states.

Names: their blocks are ``blocks.<i>.0`` (the residual block) and ``blocks.<i>.1`` (attention after it), the
shortcut ``conv_sc``, attention's output conv ``o``, conditional BatchNorm statistics ``stored_mean``/``stored_var``
and the output BatchNorm ``output_layer.0`` with ``gain``; daskgan keeps attention beside the blocks
(``attention.<i>``) and uses torch's BatchNorm names. Everything else matches, spectral-norm vectors included.
Only plain tensors and containers are read (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from daskgan.config import ModelConfig
from daskgan.errors import CheckpointMismatch, CheckpointUnreadable, NotFound
from daskgan.models import model_description
from daskgan.pretrained.declared import loaded_declared
from daskgan.run import checkpoint, storage
from daskgan.run.storage import StorageOptions

NETWORK_FILES = {"G": "G.pth", "G_ema": "G_ema.pth", "D": "D.pth"}
OPTIMIZER_FILES = {"opt_G": ("G_optim.pth", "G"), "opt_D": ("D_optim.pth", "D")}
BUFFER = re.compile(r"\.(u\d+|sv\d+|stored_mean|stored_var)$")  # spectral-norm vectors and BatchNorm statistics


def is_weights_folder(url: str, storage_options: StorageOptions | None = None) -> bool:
    return storage.exists(storage.join(url, "state_dict.pth"), storage_options) and storage.exists(
        storage.join(url, "G.pth"), storage_options)


def checkpoint_state(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """The daskgan checkpoint state (iteration 0) of the BigGAN-PyTorch weights folder at ``url``."""
    config = _read(url, "state_dict.pth", storage_options).get("config")
    if not isinstance(config, dict):
        raise CheckpointUnreadable(f"{url}/state_dict.pth holds no 'config': not a BigGAN-PyTorch weights folder")
    model, resolution, classes = folder_model(config, url)
    state: dict[str, Any] = {"format": checkpoint.FORMAT, "iteration": 0, "source": url,
                             "model": model_description(model, resolution, classes)}
    weights = {}
    for key, file in NETWORK_FILES.items():
        if key != "G" and not storage.exists(storage.join(url, file), storage_options):
            continue
        reference = _read(url, file, storage_options)
        weights[key] = discriminator_state(reference) if key == "D" else generator_state(reference)
    state.update(loaded_declared(model, resolution, classes, 3, weights, url))
    return state


def folder_model(config: dict, url: str) -> tuple[ModelConfig, int, int]:
    """daskgan's model config, resolution and class count from BigGAN-PyTorch's training ``config``."""
    if str(config.get("G_attn", "64")) != str(config.get("D_attn", "64")) or "_" in str(config.get("G_attn", "")):
        raise CheckpointMismatch(f"{url}: attention at one resolution in G and D is supported, got G "
                                 f"{config.get('G_attn')!r}, D {config.get('D_attn')!r}")
    model = ModelConfig(family="biggan", z_dim=int(config["dim_z"]), g_channels=int(config["G_ch"]),
                        d_channels=int(config["D_ch"]), shared_dim=int(config.get("shared_dim") or config["dim_z"]),
                        hierarchical=bool(config.get("hier", False)),
                        shared_embedding=bool(config.get("G_shared", False)),
                        attention_resolution=int(config.get("G_attn", 64)),
                        sn_singular_values=int(config.get("num_G_SVs", 1)),
                        sn_iterations=int(config.get("num_G_SV_itrs", 1)))
    return model, int(config["resolution"]), int(config["n_classes"])


def optimizer_moments(url: str, storage_options: StorageOptions | None = None) -> dict[str, dict[str, dict]]:
    """Adam's per-parameter state in the folder's ``G_optim.pth``/``D_optim.pth`` by daskgan parameter name
    (``{"opt_G": {name: {"step", "exp_avg", "exp_avg_sq"}}, "opt_D": ...}``; a file that is not there, no entry).

    ajbrock's optimizers number parameters in ``parameters()`` order, which is the network file's order without
    its buffers; their names are then mapped as the weights' are. Saved hyperparameters are not taken."""
    moments = {}
    for key, (file, network) in OPTIMIZER_FILES.items():
        if not storage.exists(storage.join(url, file), storage_options):
            continue
        saved = _read(url, file, storage_options)
        rename = generator_name if network == "G" else _block_name
        names = [rename(n) for n in _read(url, NETWORK_FILES[network], storage_options) if not BUFFER.search(n)]
        numbers = [i for group in saved["param_groups"] for i in group["params"]]
        if len(numbers) != len(names):
            raise CheckpointMismatch(f"{url}/{file}: {len(numbers)} parameters, {NETWORK_FILES[network]} has "
                                     f"{len(names)}")
        moments[key] = {names[position]: saved["state"][number] for position, number in enumerate(numbers)
                        if number in saved["state"]}
    return moments


def generator_name(name: str) -> str:
    """daskgan's name of a BigGAN-PyTorch generator tensor."""
    new = _block_name(name)
    new = re.sub(r"\.bn(\d)\.stored_mean$", r".bn\1.norm.running_mean", new)
    new = re.sub(r"\.bn(\d)\.stored_var$", r".bn\1.norm.running_var", new)
    new = re.sub(r"^output_layer\.0\.gain$", "output.0.weight", new)
    new = re.sub(r"^output_layer\.0\.stored_mean$", "output.0.running_mean", new)
    new = re.sub(r"^output_layer\.0\.stored_var$", "output.0.running_var", new)
    return re.sub(r"^output_layer\.", "output.", new)


def generator_state(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {generator_name(name): tensor for name, tensor in reference.items()}
    for name in [n for n in state if n.endswith("running_mean")]:  # torch's BatchNorm also counts its batches
        state[name.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    return state


def discriminator_state(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_block_name(name): tensor for name, tensor in reference.items()}


def _block_name(name: str) -> str:
    name = re.sub(r"^blocks\.(\d+)\.0\.conv_sc\.", r"blocks.\1.shortcut.", name)
    name = re.sub(r"^blocks\.(\d+)\.0\.", r"blocks.\1.", name)
    name = re.sub(r"^blocks\.(\d+)\.1\.o\.", r"attention.\1.out.", name)
    return re.sub(r"^blocks\.(\d+)\.1\.", r"attention.\1.", name)


def _read(url: str, file: str, storage_options: StorageOptions | None) -> dict:
    path = storage.join(url, file)
    try:
        data = storage.read_bytes(path, storage_options)
    except NotFound:
        raise NotFound(f"{path} does not exist: a BigGAN-PyTorch weights folder holds "
                       f"{', '.join(NETWORK_FILES.values())} and state_dict.pth") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointUnreadable(f"{path} is not a readable torch file of tensors ({type(error).__name__})") from None
