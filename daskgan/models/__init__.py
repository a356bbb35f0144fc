"""The networks: a family's module (``daskgan.config.families``) builds its (generator, discriminator); loading
weights into them only when every tensor fits."""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import nn

from daskgan.config.families import family_of, fields_of_other_families
from daskgan.errors import CheckpointMismatch, ConfigError


def build_models(model_config, resolution: int, num_classes: int, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """Build G and D for ``model_config.family`` making and judging ``channels``-channel images (seed the RNG
    first: every rank must start identical)."""
    module = importlib.import_module(f"daskgan.models.{family_of(model_config).name}")
    return module.build(model_config, resolution, num_classes, channels)


REDUCED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def conditioning_classes(model_config, dataset_classes: int) -> int:
    """How many classes G and D are conditioned on: the dataset's for conditional models, else 0."""
    if family_of(model_config).always_conditional or model_config.conditional:
        if dataset_classes < 2:
            raise ConfigError(f"model.family: a conditional {model_config.family} model needs class folders in "
                              f"data.url (found {dataset_classes} class)")
        return dataset_classes
    return 0


def model_description(model_config, resolution: int, num_classes: int, channels: int = 3) -> dict:
    """What a checkpoint records of its networks (and a job's must match to load it): the model config, resolution,
    class count and, for grayscale networks only, the channels (RGB checkpoints stay as they were); without the
    fields that only other families read (their checkpoints stay as they were too)."""
    grayscale = {"channels": 1} if channels == 1 else {}
    others = fields_of_other_families(model_config)
    fields = {k: v for k, v in dataclasses.asdict(model_config).items() if k not in others}
    return {**fields, "resolution": resolution, "num_classes": num_classes, **grayscale}


def load_exactly(network: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``network`` only if every tensor is used and every shape equal; otherwise refuse,
    naming the tensors (a network of another resolution, width or class count)."""
    check_fits(network, state, what)
    network.load_state_dict(state)


def check_fits(network: nn.Module, state: dict[str, torch.Tensor], what: str,
               target: str = "the job's network") -> None:
    """Refuse ``state`` (naming the tensors) unless it holds exactly ``network``'s tensors with their shapes;
    ``network`` may be on the meta device (shapes only)."""
    expected = network.state_dict()
    missing, unused = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unused or wrong:
        problems = [f"{label} {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
                    for label, items in (("missing", missing), ("unused", unused), ("shapes (given vs built)", wrong))
                    if items]
        raise CheckpointMismatch(f"{what} does not fit {target}: {'; '.join(problems)}")


def loaded_copy(network: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` loaded into ``network`` (``load_exactly``), returned as the network holds it, copied: the same
    network can then take another set of weights."""
    load_exactly(network, state, what)
    return {name: tensor.clone() for name, tensor in network.state_dict().items()}
