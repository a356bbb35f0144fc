"""The networks a weights file declares (NVlabs' ``init_kwargs``, BigGAN-PyTorch's ``config``, a checkpoint's model
description), built only once the declaration is known to be modest and to match the tensors the file holds.

Weights made elsewhere name the architecture they were made for, and the loader builds it before it loads them: a
crafted NVlabs pickle of a few hundred bytes declaring ``z_dim = w_dim = 100000`` made it allocate 40 GB. So the
declared networks are first built on torch's meta device (shapes, no memory), bounded in size, and compared tensor by
tensor (names and shapes) with what the file holds; only then are they built for real. Matching shapes alone would
not bound them (a tensor may be a broadcast view of a few bytes), hence ``MAX_VALUES`` as well.
"""

from __future__ import annotations

import torch
from torch import nn

from daskgan.config import ModelConfig
from daskgan.errors import CheckpointUnreadable, UserError, first_line
from daskgan.models import build_models, check_fits, loaded_copy

# Parameters and buffers of G and D together: 2 GiB in float32, about 3 times the largest networks daskgan builds
# (BigGAN at 256 px, 1000 classes: 181 M; NVlabs' StyleGAN2 at 1024 px: 62 M).
MAX_VALUES = 2**29
# What builds layers in a loop (the rest only sizes tensors, which MAX_VALUES bounds): NVlabs' networks use 8
# mapping layers, BigGAN-PyTorch 1 to 4 singular values, and 1024 px is the largest released resolution.
MAX_LOOPS = {"mapping_layers": 64, "sn_singular_values": 64}
MAX_RESOLUTION = 8192


def build_declared(model: ModelConfig, resolution: int, num_classes: int, channels: int,
                   weights: dict[str, dict[str, torch.Tensor]], what: str) -> tuple[nn.Module, nn.Module]:
    """G and D as ``model`` declares them, once every network of ``weights`` (``G``, ``G_ema``: generators;
    ``D``) fits them exactly and they hold at most ``MAX_VALUES`` values; otherwise a one-line error naming ``what``."""
    layout = _shapes_only(model, resolution, num_classes, channels, what)
    values = sum(tensor.numel() for network in layout for tensor in network.state_dict().values())
    if values > MAX_VALUES:
        raise CheckpointUnreadable(f"{what}: it declares networks of {values:,} values, more than the {MAX_VALUES:,} "
                                   f"a weights file may ask to build")
    for key, tensors in weights.items():
        check_fits(layout[1] if key == "D" else layout[0], tensors, f"{what} {key}", "the networks it declares")
    return build_models(model, resolution, num_classes, channels)


def loaded_declared(model: ModelConfig, resolution: int, num_classes: int, channels: int,
                    weights: dict[str, dict[str, torch.Tensor]], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """``weights`` (``G``, ``G_ema``, ``D``) as the networks ``model`` declares hold them (``build_declared``)."""
    G, D = build_declared(model, resolution, num_classes, channels, weights, what)
    return {key: loaded_copy(D if key == "D" else G, tensors, f"{what} {key}") for key, tensors in weights.items()}


def _shapes_only(model: ModelConfig, resolution: int, num_classes: int, channels: int,
                 what: str) -> tuple[nn.Module, nn.Module]:
    """G and D on the meta device, for a declaration whose loops are bounded."""
    too_many = [f"{name} {getattr(model, name)!r}" for name, bound in MAX_LOOPS.items()
                if not _at_most(getattr(model, name), bound)]
    if too_many or not _at_most(resolution, MAX_RESOLUTION):
        raise CheckpointUnreadable(f"{what}: it declares {', '.join(too_many) or f'resolution {resolution!r}'}, "
                                   f"beyond what any released network uses")
    try:
        model.validate()
        with torch.device("meta"):
            return build_models(model, resolution, num_classes, channels)
    except UserError as error:
        raise CheckpointUnreadable(f"{what}: it declares a model daskgan cannot build ({first_line(error)})") from None
    except Exception as error:  # sizes that overflow or that the layers refuse: the file's, not a bug of ours
        raise CheckpointUnreadable(f"{what}: it declares networks that cannot be built ({type(error).__name__}: "
                                   f"{first_line(error)})") from None


def _at_most(value: object, bound: int) -> bool:
    return isinstance(value, int) and value <= bound
