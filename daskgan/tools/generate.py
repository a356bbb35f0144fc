"""Images from a checkpoint: one PNG per seed, with truncation ψ for StyleGAN2 (``daskgan generate``).

The generator is rebuilt from the model description stored in the checkpoint, and its EMA weights are used when
the run kept them (as NVlabs' snapshots do). z for a seed is ``torch.randn`` from a generator seeded with it, so
the same seed gives the same image on any machine with the same torch.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from daskgan.config import ModelConfig
from daskgan.models import build_models, conditioning_classes
from daskgan.run import checkpoint, storage
from daskgan.run.images import png_bytes, to_uint8
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)


def load_generator(state: dict) -> nn.Module:
    """The generator of a checkpoint (EMA weights when present), in eval mode."""
    generator, _ = build_models(_model_config(state), state["model"]["resolution"], label_classes(state))
    generator.load_state_dict(state.get("G_ema", state["G"]))
    return generator.eval()


def takes_truncation_psi(generator: nn.Module) -> bool:
    """StyleGAN2 truncates in w space (ψ toward the average w); other families truncate z instead."""
    return hasattr(generator, "mapping")


def label_classes(state: dict) -> int:
    """How many classes the checkpoint's generator is conditioned on (0: unconditional)."""
    return conditioning_classes(_model_config(state), state["model"]["num_classes"])


def _model_config(state: dict) -> ModelConfig:
    model = state["model"]
    return ModelConfig(**{f.name: model[f.name] for f in dataclasses.fields(ModelConfig) if f.name in model})


@torch.no_grad()
def generate(checkpoint_url: str, seeds: list[int], out_url: str, truncation_psi: float = 1.0,
             storage_options: StorageOptions | None = None, class_index: int | None = None) -> list[str]:
    """Write ``seed<NNNN>.png`` under ``out_url`` for each seed (of class ``class_index`` for a conditional
    model); returns the URLs written."""
    state = checkpoint.load(checkpoint_url, storage_options)
    generator = load_generator(state)
    if truncation_psi != 1 and not takes_truncation_psi(generator):
        raise ValueError(f"truncation needs a StyleGAN2 checkpoint; {checkpoint_url} holds another family")
    labels = _labels(label_classes(state), class_index, checkpoint_url)
    extra = {"truncation_psi": truncation_psi} if truncation_psi != 1 else {}
    objects = {}
    for seed in seeds:
        z = torch.randn(1, generator.z_dim, generator=torch.Generator().manual_seed(seed))
        objects[storage.join(out_url, f"seed{seed:04d}.png")] = png_bytes(to_uint8(generator(z, labels, **extra)[0]))
    storage.write_many(objects, storage_options)
    logger.info("wrote %d images to %s", len(objects), out_url)
    return sorted(objects)


def _labels(num_classes: int, class_index: int | None, checkpoint_url: str) -> torch.Tensor | None:
    if not num_classes:
        if class_index is not None:
            raise ValueError(f"{checkpoint_url} holds an unconditional model; it takes no class")
        return None
    if class_index is None or not 0 <= class_index < num_classes:
        raise ValueError(f"{checkpoint_url} holds a model conditioned on {num_classes} classes: "
                         f"give a class from 0 to {num_classes - 1}")
    return torch.tensor([class_index])


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7] (seeds, classes)."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds
