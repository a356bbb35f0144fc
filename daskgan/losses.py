"""GAN losses on discriminator logits. A family is three functions, so the discriminator's real and fake terms can
be back-propagated separately (DDP accumulates the first locally and all-reduces once):
``d_real(real_logits)``, ``d_fake(fake_logits)`` and ``g(fake_logits)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor], torch.Tensor]


class GanLoss(NamedTuple):
    d_real: LossFn
    d_fake: LossFn
    g: LossFn


def bce_real(logits: torch.Tensor) -> torch.Tensor:
    """BCE of D(x) against the label 1."""
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def bce_fake(logits: torch.Tensor) -> torch.Tensor:
    """BCE of D(G(z)) against the label 0."""
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


# DCGAN: the generator uses the non-saturating form, BCE of D(G(z)) against 1, i.e. -log D(G(z)).
LOSSES: dict[str, GanLoss] = {"bce": GanLoss(d_real=bce_real, d_fake=bce_fake, g=bce_real)}


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of ||∇_x D(x)||² on real images (scale by gamma/2 outside).

    ``real_images`` must require grad and ``real_logits`` come from them; the graph is kept so the penalty can be
    back-propagated into D.
    """
    (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return gradient.square().sum(dim=list(range(1, gradient.dim()))).mean()
