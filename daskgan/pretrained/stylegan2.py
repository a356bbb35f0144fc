"""An NVlabs StyleGAN2-ADA pickle as a daskgan checkpoint state: model description from the ``init_kwargs`` the
pickle records, G, G_ema and D mapped onto daskgan's modules, every tensor used and shape-checked."""

from __future__ import annotations

from typing import Any

from daskgan.config import ModelConfig
from daskgan.errors import CheckpointMismatch, CheckpointUnreadable
from daskgan.models import model_description
from daskgan.pretrained.declared import loaded_declared
from daskgan.pretrained.nvlabs_names import discriminator_state, generator_state
from daskgan.pretrained.nvlabs_pickle import PersistentRecord
from daskgan.run import checkpoint

CHANNEL_BASE_PER_FMAP = 32768  # NVlabs' channel_base = 32768 * daskgan's fmaps


def checkpoint_state(networks: dict[str, Any], url: str) -> dict[str, Any]:
    """daskgan's checkpoint state (what ``run.checkpoint.load`` returns) for an NVlabs pickle's networks."""
    generator = networks.get("G_ema") or networks.get("G")
    model, resolution, classes = pickle_model(generator, networks.get("D"), url)
    channels = int(generator.init_kwargs.get("img_channels", 3))
    _require(channels in (1, 3), url, f"img_channels {channels}: RGB (3) or grayscale (1) networks only")
    state: dict[str, Any] = {"format": checkpoint.FORMAT, "iteration": 0, "source": url,
                             "model": model_description(model, resolution, classes, channels)}
    weights = {key: generator_state(networks[key].tensors()) for key in ("G", "G_ema")
               if isinstance(networks.get(key), PersistentRecord)}
    if isinstance(networks.get("D"), PersistentRecord):
        weights["D"] = discriminator_state(networks["D"].tensors(), resolution)
    state.update(loaded_declared(model, resolution, classes, channels, weights, url))
    state.setdefault("G", state.get("G_ema"))
    return state


def pickle_model(generator: PersistentRecord, discriminator: PersistentRecord | None,
                 url: str) -> tuple[ModelConfig, int, int]:
    """daskgan's model config, resolution and class count from the generator's (and D's) ``init_kwargs``."""
    g = generator.init_kwargs
    if not g or "z_dim" not in g:
        raise CheckpointUnreadable(f"{url}: its generator records no init_kwargs (not a StyleGAN2-ADA pickle)")
    synthesis, mapping = dict(g.get("synthesis_kwargs") or {}), dict(g.get("mapping_kwargs") or {})
    d = discriminator.init_kwargs if discriminator is not None else {}
    _require(synthesis.get("architecture", "skip") == "skip", url,
             f"G architecture {synthesis.get('architecture')!r}: only NVlabs' default 'skip' is supported yet")
    _require(d.get("architecture", "resnet") in ("resnet", "orig"), url,
             f"D architecture {d.get('architecture')!r}: NVlabs' 'resnet' and 'orig' are supported")
    try:
        model = ModelConfig(family="stylegan2", z_dim=int(g["z_dim"]), w_dim=int(g["w_dim"]),
                            mapping_layers=int(mapping.get("num_layers", 8)),
                            fmaps=float(synthesis.get("channel_base", CHANNEL_BASE_PER_FMAP)) / CHANNEL_BASE_PER_FMAP,
                            channel_max=int(synthesis.get("channel_max", 512)),
                            mbstd_group=int(dict(d.get("epilogue_kwargs") or {}).get("mbstd_group_size", 4)),
                            conditional=int(g.get("c_dim", 0)) > 0, d_architecture=d.get("architecture", "resnet"))
        return model, int(g["img_resolution"]), int(g.get("c_dim", 0))
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # a crafted or damaged pickle
        raise CheckpointUnreadable(f"{url}: its init_kwargs are not a StyleGAN2-ADA network's "
                                   f"({type(error).__name__}: {error})") from None


def _require(condition: bool, url: str, message: str) -> None:
    if not condition:
        raise CheckpointMismatch(f"{url}: {message}")
