"""R3GAN network pickles (brownvc/R3GAN's ``network-snapshot-*.pkl`` and released weights) as daskgan checkpoint
states, read without running anything in them.

R3GAN's training loop pickles its networks as torch module objects (``training.networks.Generator`` holding an
``R3GAN.Networks.Generator`` as ``Model``, ...), classes referenced by module path, with no ``init_kwargs``: the
pickle is read by NVlabs' restricted unpickler (``nvlabs_pickle``) with those classes admitted as records of their
name and ``__dict__`` (``ADMITTED``; older pickles' ``BaselineGAN.*`` and ``training.networks_baseline`` names
are R3GAN's ``legacy`` renames of the same classes). The architecture is then recovered from what the records
hold: the stages and blocks from the tensors' names, widths, expansion and group width from their shapes, each
stage's dtype from its ``DataType`` attribute, z and class counts and the resolution from the wrapper's
attributes; daskgan's networks are built for it (bounded first, as every declared network) and take the tensors
under daskgan's names (``daskgan.models.r3gan.reference_state``).

A training snapshot also holds ``G_opt_state`` and ``D_opt_state``: the ``state_dict()`` of the Adam that R3GAN's
training loop makes over ``G.parameters()`` and ``D.parameters()``, its moments numbered in that order. The order
is recovered from the records as torch walks a module (its own parameters, then its children's, in the order
recorded), and each number is given daskgan's name of the parameter it stands for (``optimizer_moments``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from daskgan.config import ModelConfig
from daskgan.errors import CheckpointMismatch, CheckpointUnreadable
from daskgan.models import model_description
from daskgan.models.r3gan import KERNEL_SIZE, reference_state
from daskgan.pretrained.declared import loaded_declared
from daskgan.pretrained.nvlabs_pickle import ModuleRecord, PersistentRecord, module_record
from daskgan.run import checkpoint

CLASSES = {
    "R3GAN.Networks": ("Convolution", "ResidualBlock", "UpsampleLayer", "DownsampleLayer", "GenerativeBasis",
                       "DiscriminativeBasis", "GeneratorStage", "DiscriminatorStage", "Generator", "Discriminator"),
    "R3GAN.FusedOperators": ("BiasedActivationCUDA", "BiasedActivationReference"),
    "R3GAN.Resamplers": ("InterpolativeUpsamplerCUDA", "InterpolativeDownsamplerCUDA",
                         "InterpolativeUpsamplerReference", "InterpolativeDownsamplerReference"),
    "training.networks": ("Generator", "Discriminator"),
    "torch.nn.modules.container": ("ModuleList",),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.linear": ("Linear",),
}
LEGACY_MODULES = {"R3GAN.": "BaselineGAN.", "training.networks": "training.networks_baseline"}  # legacy.py's renames
STAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # a stage's DataType
MAX_BLOCKS = 64  # a stage's residual blocks (R3GAN's presets: 2): building more is refused, as declared.MAX_LOOPS


def _admitted() -> dict[tuple[str, str], Any]:
    admitted: dict[tuple[str, str], Any] = {("torch", name): dtype for name, dtype in STAGE_DTYPES.items()}
    for module, names in CLASSES.items():
        legacy = next((old + module[len(new):] for new, old in LEGACY_MODULES.items() if module.startswith(new)), None)
        for name in names:
            record = module_record(f"{module}.{name}")
            admitted[(module, name)] = record
            if legacy:
                admitted[(legacy, name)] = record
    return admitted


ADMITTED = _admitted()
WRAPPERS = {"G": "training.networks.Generator", "G_ema": "training.networks.Generator",
            "D": "training.networks.Discriminator"}
OPTIMIZER_STATES = {"opt_G": ("G", "G_opt_state"), "opt_D": ("D", "D_opt_state")}  # training_loop's snapshot keys
MOMENTS = ("step", "exp_avg", "exp_avg_sq")  # torch Adam's per-parameter state (without amsgrad)


def is_r3gan_pickle(networks: dict[str, Any]) -> bool:
    """Whether a pickle's top-level dict holds R3GAN's networks (modules pickled as themselves)."""
    generator = networks.get("G_ema") or networks.get("G")
    return isinstance(generator, ModuleRecord) and generator.class_name == WRAPPERS["G"]


def checkpoint_state(networks: dict[str, Any], url: str) -> dict[str, Any]:
    """daskgan's checkpoint state (what ``run.checkpoint.load`` returns; iteration 0) for an R3GAN pickle's
    ``G``, ``G_ema`` and ``D``, with its optimizers' moments by daskgan parameter name under
    ``optimizer_moments`` when it holds any (``train.init_optimizers`` takes them)."""
    present = {key: _wrapped(networks[key], key, url) for key in WRAPPERS if networks.get(key) is not None}
    generator = present.get("G_ema") or present["G"]
    model, resolution, classes = pickle_model(networks.get("G_ema") or networks["G"], generator, url)
    if "D" in present and _stage_dtypes(present["D"], url)[::-1] != _stage_dtypes(generator, url):
        raise CheckpointMismatch(f"{url}: D's bfloat16 stages are not G's mirrored, as R3GAN's presets set them")
    weights = {key: reference_state(record.tensors("Model."), generator=key != "D") for key, record in present.items()}
    state: dict[str, Any] = {"format": checkpoint.FORMAT, "iteration": 0, "source": url,
                             "model": model_description(model, resolution, classes)}
    state.update(loaded_declared(model, resolution, classes, 3, weights, url))
    state.setdefault("G", state.get("G_ema"))
    moments = optimizer_moments(networks, url)
    if moments:
        state["optimizer_moments"] = moments
    return state


def optimizer_moments(networks: dict[str, Any], url: str) -> dict[str, dict[str, dict]]:
    """Adam's per-parameter state in the pickle's ``G_opt_state``/``D_opt_state`` by daskgan parameter name
    (``{"opt_G": {name: {"step", "exp_avg", "exp_avg_sq"}}, "opt_D": ...}``; a state not there, no entry). The
    saved hyperparameters are not taken."""
    moments = {}
    for key, (network, saved) in OPTIMIZER_STATES.items():
        if networks.get(saved) is not None and networks.get(network) is not None:
            moments[key] = _named_moments(networks[saved], networks[network], network, f"{url} {saved}")
    return moments


def _named_moments(saved: Any, wrapper: ModuleRecord, network: str, where: str) -> dict[str, dict]:
    """``saved`` (an optimizer's ``state_dict()`` over ``wrapper.parameters()``) by daskgan parameter name."""
    parameters = _parameters(wrapper, "")
    names = list(reference_state(dict(parameters), generator=network == "G"))
    try:
        numbers = [_integer(number) for group in saved["param_groups"] for number in group["params"]]
        state = dict(saved["state"])
    except (KeyError, TypeError, ValueError) as error:  # a crafted or damaged pickle
        raise CheckpointUnreadable(f"{where}: not an optimizer's state_dict ({type(error).__name__}: "
                                   f"{error})") from None
    if len(numbers) != len(parameters) or len(names) != len(parameters):
        raise CheckpointMismatch(f"{where}: {len(numbers)} parameters, R3GAN's {network} has {len(parameters)}")
    return {names[position]: _moments(state[number], parameters[position], where)
            for position, number in enumerate(numbers) if number in state}


def _parameters(record: ModuleRecord, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """A module's parameters in ``Module.parameters()`` order: its own as recorded, then each child's."""
    found = [(prefix + name, tensor) for name, tensor in (record.state.get("_parameters") or {}).items()
             if tensor is not None]
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, ModuleRecord):
            found += _parameters(child, f"{prefix}{name}.")
    return found


def _moments(entry: Any, parameter: tuple[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """One parameter's Adam state: a step count and moments of the parameter's shape, else refused."""
    name, tensor = parameter
    if (not isinstance(entry, dict) or not all(isinstance(entry.get(key), torch.Tensor) for key in MOMENTS)
            or entry["step"].numel() != 1
            or any(entry[key].shape != tensor.shape for key in ("exp_avg", "exp_avg_sq"))):
        raise CheckpointMismatch(f"{where}: {name}'s state is not Adam's step and moments of shape "
                                 f"{tuple(tensor.shape)}")
    return {key: entry[key] for key in MOMENTS}


def pickle_model(wrapper: ModuleRecord, generator: PersistentRecord, url: str) -> tuple[ModelConfig, int, int]:
    """daskgan's model config, resolution and class count of R3GAN's generator: the wrapper's attributes and
    the structure its ``Model``'s tensors and stages show."""
    tensors = generator.tensors()
    blocks = _blocks(tensors, url)
    try:
        z_dim, classes, resolution = (_integer(wrapper.state[name]) for name in ("z_dim", "c_dim", "img_resolution"))
        widths = [int(tensors[f"MainLayers.{stage}.Layers.1.LinearLayer3.Layer.weight"].shape[0])
                  for stage in range(len(blocks))]
        inner, channels = tensors["MainLayers.0.Layers.1.LinearLayer1.Layer.weight"].shape[:2]
        grouped = tensors["MainLayers.0.Layers.1.LinearLayer2.Layer.weight"].shape
    except (KeyError, TypeError, ValueError, IndexError) as error:  # a crafted or damaged pickle
        raise CheckpointUnreadable(f"{url}: its generator is not R3GAN's ({type(error).__name__}: {error})") from None
    if resolution != 2 ** (len(widths) + 1):
        raise CheckpointUnreadable(f"{url}: img_resolution {resolution} with {len(widths)} stages (4 px up)")
    if inner % channels or grouped[-1] != KERNEL_SIZE:
        raise CheckpointMismatch(f"{url}: blocks of {channels} -> {inner} channels, {grouped[-1]}x{grouped[-1]} "
                                 f"kernels: R3GAN's presets expand by a whole factor, with 3x3 kernels")
    dtypes = _stage_dtypes(generator, url)
    bf16 = dtypes.count(torch.bfloat16)
    if dtypes != [torch.float32] * (len(dtypes) - bf16) + [torch.bfloat16] * bf16:
        raise CheckpointMismatch(f"{url}: bfloat16 stages other than the highest resolutions ({dtypes})")
    model = ModelConfig(family="r3gan", z_dim=z_dim, stage_widths=widths, stage_blocks=blocks,
                        group_channels=int(grouped[1]), expansion=int(inner // channels), bf16_stages=bf16,
                        conditional=classes > 0)
    return model, resolution, classes


def _wrapped(record: Any, key: str, url: str) -> ModuleRecord:
    """The ``R3GAN.Networks`` module inside ``training.networks``' wrapper ``record`` (``key`` of the pickle)."""
    if not isinstance(record, ModuleRecord) or record.class_name != WRAPPERS[key]:
        raise CheckpointUnreadable(f"{url}: its {key} is not R3GAN's {WRAPPERS[key]}")
    model = (record.state.get("_modules") or {}).get("Model")
    if not isinstance(model, ModuleRecord) or model.class_name != f"R3GAN.Networks.{WRAPPERS[key].rsplit('.')[-1]}":
        raise CheckpointUnreadable(f"{url}: its {key} holds no R3GAN.Networks model")
    return model


def _blocks(tensors: dict[str, torch.Tensor], url: str) -> list[int]:
    """The residual blocks of each stage (G's order), from a generator's tensor names: a stage's layer 0 is its
    transition, the blocks follow."""
    layers: dict[int, int] = {}
    for name in tensors:
        match = re.match(r"MainLayers\.(\d+)\.Layers\.(\d+)\.", name)
        if match:
            layers[int(match[1])] = max(layers.get(int(match[1]), 0), int(match[2]))
    blocks = [layers[stage] for stage in sorted(layers)]
    if sorted(layers) != list(range(len(layers))) or not blocks or not all(1 <= b <= MAX_BLOCKS for b in blocks):
        raise CheckpointUnreadable(f"{url}: stages of {blocks} residual blocks; R3GAN's generator has stages "
                                   f"numbered from 0, each of 1 to {MAX_BLOCKS} blocks")
    return blocks


def _stage_dtypes(model: ModuleRecord, url: str) -> list[torch.dtype]:
    """Each stage's ``DataType`` (R3GAN runs a stage in it): float32 or bfloat16."""
    stages = ((model.state.get("_modules") or {}).get("MainLayers"))
    children = stages.state.get("_modules") if isinstance(stages, ModuleRecord) else None
    dtypes = [getattr(child, "state", {}).get("DataType") for child in (children or {}).values()]
    if not dtypes or any(dtype not in STAGE_DTYPES.values() for dtype in dtypes):
        raise CheckpointUnreadable(f"{url}: {model.class_name}'s stages do not each record a float32 or bfloat16 "
                                   f"DataType")
    return dtypes


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value
