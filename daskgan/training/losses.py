"""GAN losses on discriminator logits, and the regularisers (R1, path length, orthogonal). A family is three
functions, so the discriminator's real and fake terms can be back-propagated separately (DDP accumulates the first
locally and all-reduces once):
``d_real(real_logits)``, ``d_fake(fake_logits)`` and ``g(fake_logits)``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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


def hinge_real(logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss on D(x): mean of relu(1 - D(x))."""
    return F.relu(1 - logits).mean()


def hinge_fake(logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss on D(G(z)): mean of relu(1 + D(G(z)))."""
    return F.relu(1 + logits).mean()


def hinge_g(logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game (SA-GAN, BigGAN): -mean D(G(z))."""
    return -logits.mean()


LOSSES["hinge"] = GanLoss(d_real=hinge_real, d_fake=hinge_fake, g=hinge_g)


def path_lengths(images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's path lengths: per sample, |J_w^T y| for a random image-space direction y ~ N(0, 1/(H*W)),
    averaged over the w's of the layers. The graph is kept so (length - target)² can train G."""
    direction = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (gradient,) = torch.autograd.grad((images * direction).sum(), ws, create_graph=True)
    return gradient.square().sum(dim=2).mean(dim=1).sqrt()


@torch.no_grad()
def orthogonal_regularisation(module: nn.Module, strength: float) -> None:
    """BigGAN's orthogonal regularisation, added straight to the gradients: for each weight W (as rows), the
    gradient of strength/2 * ||W Wᵀ ⊙ (1 - I)||²_F, i.e. 2·strength·(W Wᵀ ⊙ (1 - I)) W. Only the off-diagonal of
    the Gram matrix is pushed to zero, so filter norms stay free. Class embeddings and vectors are exempt."""
    for layer in module.modules():
        if isinstance(layer, nn.Embedding):
            continue
        for param in layer.parameters(recurse=False):
            if param.ndim < 2 or param.grad is None:
                continue
            param.grad.add_(_off_diagonal_gram_times(param.reshape(param.shape[0], -1)).reshape(param.shape),
                            alpha=2 * strength)


def _off_diagonal_gram_times(rows: torch.Tensor) -> torch.Tensor:
    """(W Wᵀ ⊙ (1 - I)) W, through the smaller of W Wᵀ and WᵀW (a 24k-row linear layer's Gram matrix would not fit)."""
    if rows.shape[0] <= rows.shape[1]:
        gram = rows @ rows.T
        gram.fill_diagonal_(0)
        return gram @ rows
    return rows @ (rows.T @ rows) - rows.square().sum(dim=1, keepdim=True) * rows


class RelativisticTerms(NamedTuple):
    """One side of R3GAN's loss: ``loss`` (the batch mean to back-propagate), and per sample the relativistic
    logits, the adversarial term and, for D, the R1 and R2 penalties (None for G)."""

    loss: torch.Tensor
    relativistic_logits: torch.Tensor
    adversarial: torch.Tensor
    r1: torch.Tensor | None = None
    r2: torch.Tensor | None = None


def relativistic_d_loss(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                        fake: torch.Tensor, gamma: float) -> RelativisticTerms:
    """R3GAN's D loss: the relativistic pairing loss softplus(-(D(real) - D(fake))) of each real with a fake,
    plus gamma/2 times the zero-centred gradient penalties R1 on the reals and R2 on the fakes, every step (not
    lazily). ``discriminator`` maps images to logits (the labels and any augmentation inside it: R3GAN's fakes
    carry the reals' labels); ``fake`` is detached here, so only D is trained."""
    real = real.detach().requires_grad_(True)
    fake = fake.detach().requires_grad_(True)
    real_logits, fake_logits = discriminator(real), discriminator(fake)
    r1, r2 = _per_sample_gradient_penalty(real, real_logits), _per_sample_gradient_penalty(fake, fake_logits)
    relativistic = real_logits - fake_logits
    adversarial = F.softplus(-relativistic)
    loss = (adversarial + gamma / 2 * (r1 + r2)).mean()
    return RelativisticTerms(loss, relativistic, adversarial, r1, r2)


def relativistic_g_loss(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                        fake: torch.Tensor) -> RelativisticTerms:
    """R3GAN's G loss: softplus(-(D(fake) - D(real))), the pairing loss with the roles swapped; ``fake`` keeps
    its graph to G, the reals are constants."""
    relativistic = discriminator(fake) - discriminator(real.detach())
    adversarial = F.softplus(-relativistic)
    return RelativisticTerms(adversarial.mean(), relativistic, adversarial)


def _per_sample_gradient_penalty(images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """||∇_x D(x)||² per sample, the graph kept so the penalty trains D."""
    (gradient,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return gradient.square().sum(dim=list(range(1, gradient.dim())))
