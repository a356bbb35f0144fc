"""NVlabs StyleGAN2-ADA parameter names -> daskgan's, for G and D state dicts.

NVlabs names blocks by resolution (``synthesis.b64.conv0.weight``, ``b32.skip.weight``, ``b4.fc.weight``) and the
mapping layers ``fc0``.. ; daskgan keeps blocks in lists (``blocks.4.convs.0.weight``) and the mapping layers in a
``net`` sequence. Their ``resample_filter`` buffers are the fixed [1, 3, 3, 1] filter, which daskgan builds
itself: a state dict with another filter is refused rather than silently resampled differently.
"""

from __future__ import annotations

import math
import re

import torch

from daskgan.errors import CheckpointMismatch
from daskgan.models.resample import fir_filter


def generator_state(nvlabs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A daskgan ``Generator`` state dict from an NVlabs ``Generator``'s."""
    return {_generator_name(name): tensor for name, tensor in _without_filters(nvlabs).items()}


def discriminator_state(nvlabs: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
    """A daskgan ``Discriminator`` state dict from an NVlabs ``Discriminator``'s at ``resolution``."""
    return {_discriminator_name(name, resolution): tensor for name, tensor in _without_filters(nvlabs).items()}


def _without_filters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = fir_filter()
    for name, tensor in state.items():
        if name.endswith("resample_filter") and not (tensor.shape == expected.shape
                                                      and torch.allclose(tensor.float(), expected)):
            raise CheckpointMismatch(f"{name}: a resampling filter other than NVlabs' [1, 3, 3, 1] default")
    return {name: tensor for name, tensor in state.items() if not name.endswith("resample_filter")}


def _renamed_mapping(name: str, module: str) -> str | None:
    """``mapping.fc<i>.x`` -> ``<module>.net.<i>.x`` (``embed``, ``w_avg`` keep their names); None otherwise."""
    if not name.startswith("mapping."):
        return None
    return module + "." + re.sub(r"^fc(\d+)\.", r"net.\1.", name[len("mapping."):])


def _block(name: str, pattern: str, network: str) -> tuple[int, str]:
    """The resolution and the rest of a block parameter's name."""
    match = re.fullmatch(pattern, name)
    if not match:
        raise CheckpointMismatch(f"{name}: not a parameter of NVlabs' StyleGAN2 {network}")
    return int(match[1]), match[2]


def _generator_name(name: str) -> str:
    mapping = _renamed_mapping(name, "mapping")
    if mapping:
        return mapping
    resolution, rest = _block(name, r"synthesis\.b(\d+)\.(.+)", "generator")
    block = int(math.log2(resolution)) - 2
    layer = re.fullmatch(r"conv([01])\.(.+)", rest)
    if layer:
        index = 0 if resolution == 4 or layer[1] == "0" else 1  # the 4x4 block has only conv1
        return f"blocks.{block}.convs.{index}.{layer[2]}"
    return f"blocks.{block}.{rest}"


def _discriminator_name(name: str, resolution: int) -> str:
    mapping = _renamed_mapping(name, "cmap")
    if mapping:
        return mapping
    block_resolution, rest = _block(name, r"b(\d+)\.(.+)", "discriminator")
    if block_resolution == 4:  # the epilogue: conv, fc, out
        return rest
    return f"blocks.{int(math.log2(resolution)) - int(math.log2(block_resolution))}.{rest}"
