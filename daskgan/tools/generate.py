"""Images from a checkpoint: one PNG per seed (``daskgan generate``), and the drawing ``sample`` shares.

The generator is rebuilt from the model description stored in the checkpoint, and its EMA weights are used when
the run kept them (as NVlabs' snapshots do). An NVlabs network pickle is accepted wherever a checkpoint is
(``daskgan.pretrained``), and so is an R3GAN one. z for a seed is, for StyleGAN2 and (untruncated) R3GAN,
``numpy.random.RandomState(seed).randn`` as NVlabs' and R3GAN's scripts draw it (so their seeds give their images),
for the other families ``torch.randn`` from a generator seeded with it.

Truncation means one thing in ``generate`` and ``sample``: for StyleGAN2, ψ (w pulled toward its average; 1 is
none, 0 the average image); for the other families, the threshold of a truncated normal z (values beyond ±t are
redrawn: BigGAN's truncation trick). ``None`` is no truncation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import numpy as np
import torch
from torch import nn

from daskgan.config import ModelConfig
from daskgan.config.families import Family, family_of
from daskgan.errors import CheckpointUnreadable, RequestError
from daskgan.models import conditioning_classes
from daskgan.pretrained import load_weights
from daskgan.pretrained.declared import build_declared
from daskgan.run import storage
from daskgan.run.images import png_bytes, to_uint8
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)


def load_generator(state: dict, url: str = "checkpoint") -> nn.Module:
    """The generator of a checkpoint (EMA weights when present), in eval mode."""
    if not isinstance(state.get("model"), dict) or "G" not in state:
        raise CheckpointUnreadable(f"{url} holds no generator and model description: not a training checkpoint")
    model, weights = state["model"], state.get("G_ema", state["G"])
    generator, _ = build_declared(_model_config(state), model.get("resolution"), label_classes(state),
                                  model.get("channels", 3), {"G": weights}, url)
    generator.load_state_dict(weights)
    return generator.eval()


def takes_truncation_psi(generator: nn.Module) -> bool:
    """StyleGAN2 truncates in w space (ψ toward the average w); other families truncate z instead."""
    return hasattr(generator, "mapping")


def checkpoint_family(state: dict) -> Family:
    """The family of the checkpoint's networks."""
    return family_of(_model_config(state))


def label_classes(state: dict) -> int:
    """How many classes the checkpoint's generator is conditioned on (0: unconditional)."""
    return conditioning_classes(_model_config(state), state["model"]["num_classes"])


def _model_config(state: dict) -> ModelConfig:
    model = state["model"]
    return ModelConfig(**{f.name: model[f.name] for f in dataclasses.fields(ModelConfig) if f.name in model})


def truncated_normal(n: int, dim: int, threshold: float | None, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) samples, each value beyond ±``threshold`` redrawn until inside (no truncation when None)."""
    z = torch.randn(n, dim, generator=generator)
    if threshold is None:
        return z
    outside = z.abs() > threshold
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
        outside = z.abs() > threshold
    return z


class Drawer:
    """Latents and images of one generator under one truncation setting (see the module docstring); ``family``:
    the checkpoint's (``checkpoint_family``), whose ``numpy_seeds`` says how a seed's z is drawn."""

    def __init__(self, generator: nn.Module, truncation: float | None, family: Family):
        self.generator, self.truncation = generator, truncation
        self.uses_psi = takes_truncation_psi(generator)
        # a truncated z that is no psi is redrawn in torch (BigGAN's trick) whatever the family's script does
        self.numpy_seeds = family.numpy_seeds and (self.uses_psi or truncation is None)
        if truncation is not None and not self.uses_psi and truncation <= 0:
            raise RequestError(f"--trunc: the z threshold must be > 0, got {truncation}")

    def latents(self, seeds: Iterable[int]) -> torch.Tensor:
        """One z per seed (see the module docstring)."""
        return torch.cat([self._latent(seed) for seed in seeds])

    def _latent(self, seed: int) -> torch.Tensor:
        if self.numpy_seeds:
            return torch.from_numpy(np.random.RandomState(seed).randn(1, self.generator.z_dim)).float()
        return truncated_normal(1, self.generator.z_dim, self.truncation, torch.Generator().manual_seed(seed))

    def images(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        extra = {"truncation_psi": self.truncation} if self.uses_psi and self.truncation is not None else {}
        return self.generator(z, labels, **extra)


@torch.no_grad()
def generate(checkpoint_url: str, seeds: list[int], out_url: str, truncation: float | None = None,
             storage_options: StorageOptions | None = None, class_index: int | None = None) -> list[str]:
    """Write ``seed<NNNN>.png`` under ``out_url`` for each seed (of class ``class_index`` for a conditional
    model); returns the URLs written."""
    state = load_weights(checkpoint_url, storage_options)
    draw = Drawer(load_generator(state, checkpoint_url), truncation, checkpoint_family(state))
    labels = _labels(label_classes(state), class_index, checkpoint_url)
    objects = {}
    for seed in seeds:
        z = draw.latents([seed])
        objects[storage.join(out_url, f"seed{seed:04d}.png")] = png_bytes(to_uint8(draw.images(z, labels)[0]))
    storage.write_many(objects, storage_options)
    logger.info("wrote %d images to %s", len(objects), out_url)
    return sorted(objects)


def _labels(num_classes: int, class_index: int | None, checkpoint_url: str) -> torch.Tensor | None:
    if not num_classes:
        if class_index is not None:
            raise RequestError(f"--class: {checkpoint_url} holds an unconditional model; it takes no class")
        return None
    if class_index is None or not 0 <= class_index < num_classes:
        raise RequestError(f"--class: {checkpoint_url} holds a model conditioned on {num_classes} classes: "
                           f"give a class from 0 to {num_classes - 1}")
    return torch.tensor([class_index])


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7] (seeds, classes); anything else raises ValueError."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last.isdigit() or last == "") or int(last or first) < int(first):
            raise ValueError(f"{text!r} is not a list of numbers and ranges such as 0-7 or 1,5,9")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds
