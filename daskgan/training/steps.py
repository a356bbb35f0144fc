"""The optimiser steps of one iteration, in NVlabs' phase order: discriminator step(s), then one generator step.

Each step runs over ``accumulate`` micro-batches: DDP's ``no_sync`` keeps the gradients of all but the last
micro-batch local, so one all-reduce per step carries their sum and the update equals one step on the whole batch
(per-worker batch x workers x accumulate). Lazy regularisation (every n-th step, scaled by n): for StyleGAN2 as
NVlabs, R1 and path length are passes with their own optimiser steps (``r1_step``, ``path_length_step``: their
'Dreg' and 'Greg' phases, path length on half the batch); for the other families R1 rides on the D step's loss.
BigGAN's orthogonal regularisation is added to G's gradients just before its update, and non-finite gradients are
sanitised. Passes that need double backward run eagerly when the networks are compiled (``daskgan.compiled``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from daskgan.config.families import Family
from daskgan.data.stream import Batch
from daskgan.training.augment import AdaController, AugmentPipe
from daskgan.training.compiled import eager
from daskgan.training.losses import (
    GanLoss,
    orthogonal_regularisation,
    path_lengths,
    r1_penalty,
    relativistic_d_loss,
    relativistic_g_loss,
)


@dataclass
class Gan:
    """The networks and optimizers of one rank (G and D wrapped in DDP) and the state the steps carry."""

    G: DistributedDataParallel
    D: DistributedDataParallel
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    augment: AugmentPipe  # applied to every image D sees; p = 0 (mode off) makes it the identity
    ada: AdaController | None  # adapts augment.p in mode ada
    G_ema: nn.Module | None  # moving average of G's weights (train.ema_kimg > 0), used for grids
    num_classes: int = 0  # labels G and D are conditioned on; 0: unconditional
    pl_target: torch.Tensor = field(default_factory=lambda: torch.zeros([]))  # path-length moving average


@dataclass(frozen=True)
class Noise:
    """Where a rank's latents come from: z of ``z_dim`` and, for conditional models, class labels: uniform, or
    drawn with ``label_weights`` (StyleGAN2-ADA draws fakes' labels as the dataset's labels are distributed), or
    with ``labels_from_reals`` those of the reals the fakes are paired with (R3GAN)."""

    generator: torch.Generator
    z_dim: int
    num_classes: int
    device: torch.device
    label_weights: torch.Tensor | None = None
    labels_from_reals: bool = False

    def draw(self, n: int, real_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` latents and their labels (None when unconditional); ``real_labels``: those of the reals the fakes
        are paired with, which they take with ``labels_from_reals``."""
        z = torch.randn(n, self.z_dim, generator=self.generator).to(self.device, non_blocking=True)
        if not self.num_classes:
            return z, None
        if self.labels_from_reals and real_labels is not None:
            return z, real_labels
        if self.label_weights is not None:
            labels = torch.multinomial(self.label_weights, n, replacement=True, generator=self.generator)
        else:
            labels = torch.randint(self.num_classes, (n,), generator=self.generator)
        return z, labels.to(self.device, non_blocking=True)


def fake_label_weights(family: Family, labels: tuple[int, ...], num_classes: int) -> torch.Tensor | None:
    """How fakes' labels are drawn: as the dataset's are distributed (StyleGAN2: NVlabs draws a random training
    example's label), else uniformly (BigGAN and DCGAN: ajbrock draws uniform classes); None: uniformly."""
    if not family.fake_labels_from_dataset or not num_classes:
        return None
    return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).double()


def discriminator_step(gan: Gan, loss: GanLoss, batches: list[Batch], noise: Noise,
                       r1_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One D update over the micro-batches ``batches`` (reals and as many fakes), with R1 folded in when
    ``r1_weight`` > 0."""
    gan.opt_D.zero_grad(set_to_none=True)
    stats = _Means()
    for last, batch in _marking_last(batches):
        real = batch.real_images(noise.device).requires_grad_(r1_weight > 0)  # R1 differentiates through augment
        real_labels = batch.labels.to(noise.device) if gan.num_classes else None
        z, fake_labels = noise.draw(real.shape[0])
        with torch.no_grad():
            fake = gan.G(z, fake_labels)
        # the real half stays local; the fake half's backward all-reduces both (last micro-batch only)
        with gan.D.no_sync(), eager(gan.D, when=r1_weight > 0):
            real_logits = gan.D(gan.augment(real), real_labels)
            loss_real = loss.d_real(real_logits)
            r1 = r1_penalty(real, real_logits) if r1_weight > 0 else None
            ((loss_real if r1 is None else loss_real + r1 * r1_weight) / len(batches)).backward()
        if gan.ada is not None:
            gan.ada.observe(real_logits)
        with _sync_when(gan.D, last):
            fake_logits = gan.D(gan.augment(fake), fake_labels)
            loss_fake = loss.d_fake(fake_logits)
            (loss_fake / len(batches)).backward()
        stats.add(loss_D_real=loss_real, loss_D_fake=loss_fake, D_x=torch.sigmoid(real_logits).mean(),
                  D_G_z=torch.sigmoid(fake_logits).mean(), **({"r1_penalty": r1} if r1 is not None else {}))
    _update(gan.opt_D, gan.D.module)
    return stats.means()


def r1_step(gan: Gan, batches: list[Batch], device: torch.device, r1_weight: float) -> dict[str, torch.Tensor]:
    """NVlabs' lazy R1 as its own pass and optimiser step ('Dreg'), on the reals of the D step just taken."""
    gan.opt_D.zero_grad(set_to_none=True)
    stats = _Means()
    for last, batch in _marking_last(batches):
        real = batch.real_images(device).requires_grad_(True)
        labels = batch.labels.to(device) if gan.num_classes else None
        with _sync_when(gan.D, last), eager(gan.D):
            logits = gan.D(gan.augment(real), labels)
            penalty = r1_penalty(real, logits)
            # logits x 0 puts every parameter in the graph (as NVlabs): DDP expects a gradient for each
            (logits.sum() * 0 + penalty * r1_weight / len(batches)).backward()
        stats.add(r1_penalty=penalty)
    _update(gan.opt_D, gan.D.module)
    return stats.means()


def generator_step(gan: Gan, loss: GanLoss, micro_batches: int, batch_size: int, noise: Noise,
                   ortho: float = 0.0) -> dict[str, torch.Tensor]:
    """One G update over ``micro_batches`` fresh batches of fakes, judged by D (whose weights stay untouched)."""
    gan.opt_G.zero_grad(set_to_none=True)
    stats = _Means()
    with _d_held(gan):
        for last, _ in _marking_last(range(micro_batches)):
            z, labels = noise.draw(batch_size)
            with _sync_when(gan.G, last):
                loss_G = loss.g(gan.D.module(gan.augment(gan.G(z, labels)), labels))
                (loss_G / micro_batches).backward()
            stats.add(loss_G=loss_G)
    if ortho:
        orthogonal_regularisation(gan.G.module, ortho)
    _update(gan.opt_G, gan.G.module)
    return stats.means()


def pairing_discriminator_step(gan: Gan, batches: list[Batch], noise: Noise,
                               gamma: float) -> dict[str, torch.Tensor]:
    """One D update with R3GAN's relativistic pairing loss over the micro-batches ``batches``: each real against a
    fake (drawn under the real's label), plus gamma/2 times R1 on the reals and R2 on the detached fakes, every
    step. Records its pairing term as ``loss_D_real`` (real and fake are one term: ``loss_D_fake`` is 0, so the
    two still sum to D's loss wherever runs are compared)."""
    gan.opt_D.zero_grad(set_to_none=True)
    stats = _Means()
    for last, batch in _marking_last(batches):
        real = batch.real_images(noise.device)
        labels = batch.labels.to(noise.device) if gan.num_classes else None
        z, fake_labels = noise.draw(real.shape[0], labels)
        with torch.no_grad():
            fake = gan.G(z, fake_labels)
        with _sync_when(gan.D, last), eager(gan.D):  # R1 and R2 differentiate through augment
            terms = relativistic_d_loss(lambda images: gan.D(gan.augment(images), labels), real, fake, gamma)
            (terms.loss / len(batches)).backward()
        if gan.ada is not None:  # ADA's overfitting sign: of D(real) - D(fake), what the pairing loss trains
            gan.ada.observe(terms.relativistic_logits)
        pairing = terms.adversarial.mean()
        stats.add(loss_D_real=pairing, loss_D_fake=torch.zeros_like(pairing), r1_penalty=terms.r1.mean(),
                  r2_penalty=terms.r2.mean())
    _update(gan.opt_D, gan.D.module)
    return stats.means()


def pairing_generator_step(gan: Gan, batches: list[Batch], noise: Noise) -> dict[str, torch.Tensor]:
    """One G update with the pairing loss the other way round: fakes (under the reals' labels) against the reals of
    ``batches``, judged by D (whose weights stay untouched)."""
    gan.opt_G.zero_grad(set_to_none=True)
    stats = _Means()
    with _d_held(gan):
        for last, batch in _marking_last(batches):
            real = batch.real_images(noise.device)
            labels = batch.labels.to(noise.device) if gan.num_classes else None
            z, fake_labels = noise.draw(real.shape[0], labels)
            with _sync_when(gan.G, last):
                terms = relativistic_g_loss(lambda images: gan.D.module(gan.augment(images), labels), real,
                                            gan.G(z, fake_labels))
                (terms.loss / len(batches)).backward()
            stats.add(loss_G=terms.loss)
    _update(gan.opt_G, gan.G.module)
    return stats.means()


@contextmanager
def _d_held(gan: Gan) -> Iterator[None]:
    """D's weights out of G's step: G's loss goes through the bare D, which stays out of DDP's reducer; layers
    that were frozen (Freeze-D) stay frozen afterwards."""
    trainable = [p.requires_grad for p in gan.D.module.parameters()]
    gan.D.module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(gan.D.module.parameters(), trainable):
            parameter.requires_grad_(flag)


def path_length_step(gan: Gan, micro_batches: int, batch_size: int, noise: Noise, pl_weight: float,
                     pl_decay: float = 0.01) -> dict[str, torch.Tensor]:
    """NVlabs' lazy path-length regularisation as its own pass and optimiser step ('Greg'), on fresh latents
    (NVlabs: half the batch, ``pl_batch_shrink`` 2)."""
    gan.opt_G.zero_grad(set_to_none=True)
    stats = _Means()
    for last, _ in _marking_last(range(micro_batches)):
        z, labels = noise.draw(batch_size)
        with _sync_when(gan.G, last), eager(gan.G):
            fake, ws = gan.G(z, labels, return_ws=True)
            penalty, gan.pl_target = path_length_penalty(fake, ws, gan.pl_target, pl_decay)
            # fake's term keeps every parameter in the graph
            (fake[:, 0, 0, 0].sum() * 0 + penalty * pl_weight / micro_batches).backward()
        stats.add(pl_penalty=penalty, pl_mean=gan.pl_target)
    _update(gan.opt_G, gan.G.module)
    return stats.means()


def _update(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    sanitise_gradients(module)
    optimizer.step()


def sanitise_gradients(module: nn.Module) -> None:
    """Replace NaN gradients by 0 and infinities by ±1e5 before the update (NVlabs does so on every step): one
    overflowing reduced-precision activation must not write NaN into the weights and the optimiser's moments."""
    for parameter in module.parameters():
        if parameter.grad is not None:
            torch.nan_to_num(parameter.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=parameter.grad)


def path_length_penalty(fake: torch.Tensor, ws: torch.Tensor, target: torch.Tensor,
                        decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(The path-length penalty, the new target): the target moves toward this rank's mean length and the
    penalty is taken against it. Each rank keeps its own target, as NVlabs' loop does, so the pass joins no other
    rank (checkpoints keep every rank's)."""
    lengths = path_lengths(fake, ws)
    mean_length = lengths.detach().mean()
    target = target.to(mean_length.device).lerp(mean_length, decay)
    return (lengths - target).square().mean(), target


def _sync_when(module: DistributedDataParallel, sync: bool):
    return nullcontext() if sync else module.no_sync()


def _marking_last(items: Iterable) -> Iterable[tuple[bool, object]]:
    items = list(items)
    return [(i == len(items) - 1, item) for i, item in enumerate(items)]


class _Means:
    """Per-step statistics averaged over micro-batches, as detached tensors on the device: the loop reads them only
    when it writes the records (``daskgan.training.loop``)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().float()
            self._counts[name] = self._counts.get(name, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / self._counts[name] for name, total in self._sums.items()}
