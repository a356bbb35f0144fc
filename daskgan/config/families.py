"""The GAN families as data: one entry per family says where training and validation treat it differently.

The papers' code keeps such differences in the training script of each family; daskgan runs one loop for all of
them, so each difference is a named trait here (as NVlabs keeps its training phases as data) rather than a
comparison of family names spread over the loop, the steps and the schema. A new family is its module under
``daskgan.models`` (a ``build`` function) and one entry in ``FAMILIES``. This module imports no torch: the schema
validates a job with it on a client that may have none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

STYLEGAN2_SETTINGS = frozenset({"train.pl_weight", "train.precision", "model.d_architecture", "train.freeze_d"})
R3GAN_MODEL_FIELDS = frozenset({"stage_widths", "stage_blocks", "group_channels", "expansion", "bf16_stages"})


@dataclass(frozen=True)
class Family:
    """What sets a family apart.

    ``name``: the job's ``model.family`` and the ``daskgan.models`` module whose
    ``build(model_config, resolution, num_classes, channels)`` makes (G, D). ``always_conditional``: conditioned on
    the class folders whatever ``model.conditional`` says (BigGAN); the others only when asked.
    ``separate_regularisation``: lazy regularisers (R1, path length) take their own passes and optimiser steps,
    with NVlabs' Adam correction, rather than riding on the main D step. ``fake_labels_from_dataset``: fakes'
    classes are drawn as the dataset's are distributed (NVlabs draws a random training example's label), rather
    than uniformly (ajbrock). ``ema_averages_buffers``: G_ema averages buffers
    (BatchNorm statistics, spectral norms' vectors) as well as weights (BigGAN-PyTorch), rather than copying them.
    ``settings``: the settings only some families support, of those this one does. ``g_blocks``: the resolutions
    the family is built for, with G's blocks at each (each block takes a chunk of a hierarchical z); None: any.
    ``model_fields``: the ``model`` fields that only this family reads; other families' checkpoints do not record
    them, so their model descriptions stay as they were before the fields existed.
    ``pairing_loss``: D and G are trained with R3GAN's relativistic pairing loss (each real against a fake, in one
    term) rather than ``train.loss``, with the zero-centred R1 on the reals and R2 on the detached fakes at every D
    step (weight ``train.r1_gamma`` / 2 each, never lazy); G's step takes a batch of reals too.
    ``fake_labels_from_reals``: each fake is drawn with the label of the real it is paired with (R3GAN), which the
    pairing loss needs: both go through D under one label. ``defaults``: job settings (``"train.beta1"``) the
    family's paper uses where the job sets none, under a preset's and the job's own (R3GAN: Adam's beta1 = 0).
    ``numpy_seeds``: the family's own image script draws a seed's z as ``numpy.random.RandomState(seed).randn``
    (NVlabs' and R3GAN's ``gen_images.py``), so ``generate`` and ``sample`` do too and its seeds give its images;
    the others draw from ``torch``.
    """

    name: str
    always_conditional: bool = False
    separate_regularisation: bool = False
    fake_labels_from_dataset: bool = False
    ema_averages_buffers: bool = False
    settings: frozenset[str] = frozenset()
    g_blocks: Mapping[int, int] | None = None
    model_fields: frozenset[str] = frozenset()
    pairing_loss: bool = False
    fake_labels_from_reals: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    numpy_seeds: bool = False

    def __post_init__(self) -> None:
        if self.pairing_loss and not self.fake_labels_from_reals:
            raise ValueError(f"{self.name}: the pairing loss judges a real and a fake under one label")


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("dcgan"),
    Family("stylegan2", separate_regularisation=True, fake_labels_from_dataset=True, settings=STYLEGAN2_SETTINGS,
           numpy_seeds=True),
    Family("biggan", always_conditional=True, ema_averages_buffers=True,
           g_blocks={32: 3, 64: 4, 128: 5, 256: 6}),  # daskgan.models.biggan.ARCHITECTURES
    Family("r3gan", model_fields=R3GAN_MODEL_FIELDS, pairing_loss=True, fake_labels_from_reals=True,
           defaults={"train.beta1": 0.0}, numpy_seeds=True),
)}


def fields_of_other_families(model_config) -> frozenset[str]:
    """The ``model`` fields that families other than ``model_config.family`` own (see ``Family.model_fields``)."""
    own = family_of(model_config).model_fields
    return frozenset().union(*(f.model_fields for f in FAMILIES.values())) - own


def family_of(model_config) -> Family:
    """The family ``model_config.family`` names (validated by the schema: one of ``FAMILIES``)."""
    return FAMILIES[model_config.family]
