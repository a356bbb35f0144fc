"""A rank's GAN before its first iteration: networks, optimizers, augmentation and EMA built as the job says, then
weights from the run's checkpoint (a resume) or from other weights (fine-tuning, ``train.init_from``)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from daskgan.config import JobConfig
from daskgan.config.families import family_of
from daskgan.errors import CheckpointMismatch, ConfigError
from daskgan.models import REDUCED_PRECISION, build_models, load_exactly
from daskgan.models.layers import sync_batchnorm
from daskgan.pretrained import load_weights, optimizer_moments
from daskgan.seeding import stream_seed
from daskgan.training.augment import PIPELINES, AdaController, AugmentPipe
from daskgan.training.compiled import compile_forward
from daskgan.training.state import load_optimizer
from daskgan.training.steps import Gan

logger = logging.getLogger(__name__)


def adam_settings(config: JobConfig, lr: float, interval: int,
                  beta2: float | None = None) -> tuple[float, tuple[float, float]]:
    """Adam's lr and betas (``beta2``: a scheduled one instead of ``train.beta2``): for StyleGAN2, NVlabs'
    correction for the extra regularisation step every ``interval`` steps (lr x r, betas ** r with
    r = interval / (interval + 1)); as configured otherwise."""
    betas = (config.train.beta1, config.train.beta2 if beta2 is None else beta2)
    if not family_of(config.model).separate_regularisation:
        return lr, betas
    ratio = interval / (interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


def build_gan(config: JobConfig, num_classes: int, device: torch.device) -> Gan:
    """G, D (DDP), optimizers, augmentation and EMA; ``num_classes`` > 0 makes G and D class-conditional."""
    torch.manual_seed(stream_seed(config.train.seed, "weights"))  # identical initial weights on every rank
    G, D = build_models(config.model, config.data.resolution, num_classes, config.data.channels)
    if config.train.freeze_d:
        D.freeze(config.train.freeze_d)  # before DDP: frozen parameters stay out of its reducer
    if config.model.sync_batchnorm:
        G, D = sync_batchnorm(G), sync_batchnorm(D)
    if config.train.precision != "fp32":
        for network in (G, D):
            network.use_reduced_precision(REDUCED_PRECISION[config.train.precision],
                                          config.train.reduced_precision_resolutions)
    G, D = G.to(device), D.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    augment = AugmentPipe(PIPELINES[config.augment.pipeline]).to(device)
    augment.set_probability(config.augment.p if config.augment.mode != "off" else 0.0)
    ada = (AdaController(augment, config.augment.target, config.augment.interval, config.augment.speed_kimg)
           if config.augment.mode == "ada" else None)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if config.train.keeps_average() else None
    if config.train.compile:
        G, D = compile_forward(G), compile_forward(D)
    return Gan(DistributedDataParallel(G, device_ids=device_ids), DistributedDataParallel(D, device_ids=device_ids),
               _adam(G, *adam_settings(config, config.train.lr_g, config.train.pl_interval), config.train.adam_eps),
               _adam(D, *adam_settings(config, config.train.lr_d, config.train.r1_interval), config.train.adam_eps),
               augment, ada, G_ema, num_classes)


def _adam(network: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Adam:
    return torch.optim.Adam(network.parameters(), lr=lr, betas=betas, eps=eps)


def initialise_from(gan: Gan, config: JobConfig) -> None:
    """Fine-tuning (``train.init_from``): G, D and G's average from other weights, a daskgan checkpoint, an NVlabs
    pickle or a BigGAN-PyTorch folder, read with ``output.storage_options``; iteration count and records start
    fresh, and the optimizers too unless ``train.init_optimizers`` (then their moments come from the source,
    under the job's lr, betas and eps)."""
    url = config.train.init_from
    source = load_weights(url, config.output.storage_options)
    load_exactly(gan.G.module, source["G"], f"train.init_from: {url} G")
    if gan.G_ema is not None:
        load_exactly(gan.G_ema, source.get("G_ema", source["G"]), f"train.init_from: {url} G_ema")
    if "D" in source:
        load_exactly(gan.D.module, source["D"], f"train.init_from: {url} D")
    else:
        logger.warning("train.init_from: %s holds no discriminator; D starts from random weights", url)
    if config.train.init_optimizers:
        _initialise_optimizers(gan, source, url, config)
    if dist.get_rank() == 0:
        logger.info("fine-tuning from %s", url)


def _initialise_optimizers(gan: Gan, source: dict, url: str, config: JobConfig) -> None:
    """Adam's moments and step counts from a daskgan checkpoint's optimizers, or by parameter name from an R3GAN
    pickle's (its reader names them: ``optimizer_moments`` in the source) or a BigGAN-PyTorch folder's; a source
    without them is refused."""
    if "opt_G" in source and "opt_D" in source:
        load_optimizer(gan.opt_G, source["opt_G"])
        load_optimizer(gan.opt_D, source["opt_D"])
        return
    from_r3gan = "optimizer_moments" in source
    moments = source["optimizer_moments"] if from_r3gan else optimizer_moments(url, config.output.storage_options)
    if set(moments) != {"opt_G", "opt_D"}:
        raise ConfigError(f"train.init_optimizers: {url} holds no optimizer state for both G and D (NVlabs pickles "
                          f"carry none; an R3GAN pickle needs G_opt_state and D_opt_state, a BigGAN-PyTorch "
                          f"folder G_optim.pth and D_optim.pth)")
    for key, optimizer, network in (("G", gan.opt_G, gan.G.module), ("D", gan.opt_D, gan.D.module)):
        where = f"{url} {key}_opt_state" if from_r3gan else f"{url} {key}_optim.pth"
        load_named_moments(optimizer, network, moments[f"opt_{key}"], where)


def load_named_moments(optimizer: torch.optim.Optimizer, network: torch.nn.Module, moments: dict[str, dict],
                       where: str) -> None:
    """Per-parameter optimizer state given by parameter name into ``optimizer`` (over ``network``'s parameters),
    under the job's hyperparameters; a name missing on either side or a moment of another shape is refused."""
    name_of = {id(parameter): name for name, parameter in network.named_parameters()}
    order = [name_of[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    parameters = dict(network.named_parameters())
    unknown = sorted(set(moments) - set(order))
    wrong = [n for n in order if n in moments and "exp_avg" in moments[n]
             and tuple(moments[n]["exp_avg"].shape) != tuple(parameters[n].shape)]
    if unknown or wrong:
        raise CheckpointMismatch(f"{where}: optimizer state for parameters the network lacks ({', '.join(unknown[:3])})"
                                 if unknown else f"{where}: moments of another shape for {', '.join(wrong[:3])}")
    groups, position = [], 0
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(position, position + len(group["params"])))})
        position += len(group["params"])
    state = {number: moments[name] for number, name in enumerate(order) if name in moments}
    load_optimizer(optimizer, {"state": state, "param_groups": groups})


