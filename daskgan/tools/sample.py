"""``daskgan sample``: class-conditional sample grids and interpolations from a checkpoint, as PNGs.

Three grids, written under the output folder or bucket:

- ``classes.png``: one row per class, ``per_class`` samples each (the same z's in every row, so a column shows
  one latent across classes);
- ``interp_z.png``: one row per class, walking linearly from one z to another;
- ``interp_class.png``: one row per z, blending the class input from the first requested class to the last
  (BigGAN's shared embedding and StyleGAN2's label embedding both take class weights).

Truncation as in ``daskgan.tools.generate``: ψ for StyleGAN2, a truncated-normal z threshold for the other
families. Unconditional models get one row and no class blend.
"""

from __future__ import annotations

import logging

import torch

from daskgan.errors import RequestError
from daskgan.models.layers import standing_statistics
from daskgan.pretrained import load_weights
from daskgan.run import storage
from daskgan.run.images import image_grid, png_bytes
from daskgan.run.storage import StorageOptions
from daskgan.tools.generate import Drawer, checkpoint_family, label_classes, load_generator

logger = logging.getLogger(__name__)

STANDING_BATCH = 64  # latents per standing-statistics pass


@torch.no_grad()
def sample(checkpoint_url: str, out_url: str, *, classes: list[int] | None = None, per_class: int = 8,
           steps: int = 8, seed: int = 0, truncation: float | None = None,
           storage_options: StorageOptions | None = None, standing_stats: int = 0) -> list[str]:
    """Write the grids for ``classes`` (default: all) of the checkpoint's generator; returns the URLs written.
    ``standing_stats``: first average BatchNorm statistics over that many batches of 64 (BigGAN's standing
    statistics; no effect on StyleGAN2)."""
    state = load_weights(checkpoint_url, storage_options)
    generator, num_classes = load_generator(state, checkpoint_url), label_classes(state)
    if standing_stats:
        torch.manual_seed(seed)
        standing_statistics(generator, lambda: (torch.randn(STANDING_BATCH, generator.z_dim), torch.randint(
            num_classes, (STANDING_BATCH,)) if num_classes else None), standing_stats)
    rows = _classes(classes, num_classes)
    draw = Drawer(generator, truncation, checkpoint_family(state))
    z = draw.latents(range(seed, seed + per_class))  # the first is `generate`'s image for `seed`
    grids = {"classes.png": (torch.cat([draw.images(z, _one_hot([c] * per_class, num_classes)) for c in rows]),
                             per_class)}
    ends = draw.latents([seed + per_class, seed + per_class + 1])
    path = torch.stack([torch.lerp(ends[0], ends[1], t) for t in torch.linspace(0, 1, steps)])
    grids["interp_z.png"] = (torch.cat([draw.images(path, _one_hot([c] * steps, num_classes)) for c in rows]), steps)
    if num_classes and len(rows) > 1:
        blends = torch.stack([torch.lerp(_one_hot([rows[0]], num_classes)[0], _one_hot([rows[-1]], num_classes)[0], t)
                              for t in torch.linspace(0, 1, steps)])
        grids["interp_class.png"] = (torch.cat([draw.images(one.expand(steps, -1), blends) for one in z]), steps)
    objects = {storage.join(out_url, name): png_bytes(image_grid(images, columns=columns))
               for name, (images, columns) in grids.items()}
    storage.write_many(objects, storage_options)
    logger.info("wrote %s to %s", ", ".join(grids), out_url)
    return sorted(objects)


def _classes(requested: list[int] | None, num_classes: int) -> list[int | None]:
    if not num_classes:
        if requested:
            raise RequestError("--classes: this checkpoint holds an unconditional model; it takes no classes")
        return [None]
    rows = requested if requested else list(range(num_classes))
    bad = [c for c in rows if not 0 <= c < num_classes]
    if bad:
        raise RequestError(f"--classes: {bad} out of range: the model knows classes 0 to {num_classes - 1}")
    return rows


def _one_hot(labels: list[int | None], num_classes: int) -> torch.Tensor | None:
    if not num_classes:
        return None
    return torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()
