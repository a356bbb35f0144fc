"""Metrics during training: every rank embeds its share of real and generated images, every rank gets the same
numbers (``daskgan.metrics``). Real-image features are computed once per dataset, resolution, extractor and count
and cached in the run directory (``metrics/real-<key>.pt``); with ``metrics.fid_reals: dataset`` FID's reference
is instead the mean and covariance of every image of the dataset, streamed once by all ranks and cached the same
way (``metrics/real-stats-<key>.pt``). Each evaluation is also written as ``metrics/<iteration>.json`` with the
extractor that produced it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import logging
from typing import Any, Iterator

import torch
from torch import nn

from daskgan import metrics, ranks
from daskgan.config import JobConfig
from daskgan.data.decode import GONE_OR_UNREADABLE, decode_fetched
from daskgan.data.index import ImageIndex, fetch_images
from daskgan.data.stream import ImageStream
from daskgan.models import stylegan2
from daskgan.models.layers import standing_statistics
from daskgan.ranks import from_rank0
from daskgan.run import layout, storage

logger = logging.getLogger(__name__)

FAKE_SEED_OFFSET = 1_000_000  # generated item i uses z from seed FAKE_SEED_OFFSET + i


class Evaluator:
    """Holds the extractor and the real features of one run."""

    def __init__(self, config: JobConfig, index: ImageIndex, device: torch.device):
        self.config, self.index, self.device = config, index, device
        m = config.metrics
        self.extractor = metrics.load_extractor(m.extractor, m.extractor_url, m.storage_options).to(device)
        self.real_count = min(m.real_images or m.images, len(index))
        self._real: torch.Tensor | None = None  # rank 0 only
        self._real_cached = False  # whether every rank has taken part in computing (or reading) the real features
        self._dataset_statistics: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0 only
        self._statistics_ready = False  # every rank took part in computing (or reading) them

    def evaluate(self, generator: nn.Module, num_classes: int, iteration: int) -> dict[str, Any]:
        """FID/KID of ``generator`` (in eval mode, training RNG untouched) against the real features, and IS of its
        images; every rank embeds a share, rank 0 alone holds the features and scores, every rank gets them."""
        m = self.config.metrics
        real = self._real_features() if m.fid_reals == "sample" or set(m.kinds) - {"fid", "is"} else None
        if m.fid_reals == "dataset" and not self._statistics_ready:  # a collective: every rank, once
            self._dataset_statistics, self._statistics_ready = self._whole_dataset_statistics(), True
        if m.standing_stats:
            generator = copy.deepcopy(generator)  # the run's own statistics stay as they are
            standing_statistics(generator, lambda: self._standing_latents(num_classes), m.standing_stats)
        fake = metrics.embed_share(m.images, lambda items: self.generated_images(generator, num_classes, items),
                                   self._fake_embedding)
        scores = from_rank0(lambda: self._scores(real, fake, iteration))
        return {**scores, "metrics_extractor": self.extractor.name}

    def _standing_latents(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = self.config.data.batch_size
        z = torch.randn(batch, self.config.model.z_dim, device=self.device)
        return z, torch.randint(num_classes, (batch,), device=self.device) if num_classes else None

    def _fake_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The extractor's features, followed by its class probabilities when IS is asked for (one pass of
        generated images serves every metric)."""
        features = self.extractor(images)
        if "is" not in self.config.metrics.kinds:
            return features
        return torch.cat([features, self.extractor.probabilities(images)], dim=1)

    def _scores(self, real: torch.Tensor, fake: torch.Tensor, iteration: int) -> dict[str, float]:
        m = self.config.metrics
        width = self.extractor.feature_width
        scores = metrics.compute(m.kinds, real, fake[:, :width], kid_subset_size=m.kid_subset_size,
                                 probabilities=fake[:, width:], real_statistics=self._dataset_statistics)
        report = {"iteration": iteration, "extractor": self.extractor.name, "images": m.images,
                  "real_images": self.real_count, **scores}
        if self._dataset_statistics is not None:
            report["fid_real_images"] = len(self.index)  # FID's reference: the whole dataset
        storage.write_json(layout.evaluation_url(self.config.output.run_url, iteration), report,
                           self.config.output.storage_options)
        logger.info("iteration %d: %s (%s)", iteration, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
                    self.extractor.name)
        return scores

    def _real_features(self) -> torch.Tensor | None:
        """The real features on rank 0 (``None`` elsewhere): read from the run's cache, or embedded by every rank
        and cached."""
        if not self._real_cached:
            url, options = self._real_cache()
            if from_rank0(lambda: storage.exists(url, options)):
                if ranks.rank() == 0:
                    self._real = torch.load(io.BytesIO(storage.read_bytes(url, options)), weights_only=True).float()
            else:
                order = torch.randperm(len(self.index), generator=torch.Generator().manual_seed(0)).tolist()
                self._real = metrics.embed_share(self.real_count, lambda items: self.real_images(order, items),
                                                 self.extractor)
                if ranks.rank() == 0:
                    storage.write_bytes(url, storage.torch_bytes(self._real), options)
            self._real_cached = True
        return self._real

    def _whole_dataset_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mean and covariance of every dataset image's features on rank 0 (``None`` elsewhere): read from the
        cache, or streamed once by every rank (each its part of one unshuffled epoch) and cached."""
        url, options = self._real_cache("real-stats", len(self.index))
        if from_rank0(lambda: storage.exists(url, options)):
            if ranks.rank() != 0:
                return None
            cached = torch.load(io.BytesIO(storage.read_bytes(url, options)), weights_only=True)
            return cached["mean"], cached["covariance"]
        logger.info("metrics: statistics of all %d images of %s, once (cached at %s)", len(self.index),
                    self.index.url, url)
        mean, covariance, count = metrics.dataset_statistics(self._every_image(), self.extractor)
        if ranks.rank() != 0:
            return None
        storage.write_bytes(url, storage.torch_bytes({"mean": mean, "covariance": covariance, "count": count}), options)
        logger.info("metrics: statistics of %d images cached", count)
        return mean, covariance

    def _every_image(self) -> Iterator[torch.Tensor]:
        """This rank's part of one unshuffled pass over the dataset, as the extractor takes them (unreadable images
        skipped, as in training; tar shards read whole)."""
        data = dataclasses.replace(self.config.data, shuffle=False, mirror=False, batch_size=64)
        stream = ImageStream(self.index, data, rank=ranks.rank(), world_size=ranks.world_size(), epochs=1,
                             drop_last=False, on_gpu=self.device.type == "cuda")
        try:
            for batch in stream:
                yield as_rgb(batch.real_images(self.device))
        finally:
            stream.close()

    def _real_cache(self, prefix: str = "real", count: int | None = None) -> tuple[str, dict]:
        """Where this run's real features (or statistics) are cached: ``metrics.real_cache_url`` (shared by runs on
        the same dataset), else the run directory."""
        m, name = self.config.metrics, f"{prefix}-{self._cache_key(count or self.real_count)}.pt"
        if m.real_cache_url:
            return storage.join(m.real_cache_url, name), m.storage_options
        return layout.metrics_url(self.config.output.run_url, name), self.config.output.storage_options

    def _cache_key(self, count: int) -> str:
        data = self.config.data
        text = f"{data.url}|{data.resolution}|{self.extractor.name}|{self.config.metrics.extractor_url}|{count}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def real_images(self, order: list[int], items: list[int]) -> torch.Tensor:
        """Items ``items`` of the dataset shuffled as ``order``, decoded on this rank's device (see
        ``_real_image`` for one that is gone)."""
        fs, _ = storage.filesystem(self.index.url, self.config.data.storage_options)
        fetched = self._fetch(fs, [self.index.paths[order[i]] for i in items])  # one concurrent fetch
        return as_rgb(torch.stack([self._real_image(fs, order, i, fetched) for i in items])).to(self.device)

    def _fetch(self, fs, paths: list[str]) -> dict[str, bytes | BaseException]:
        """Real images, or why each is gone; throttling and server errors are retried as the stream retries them
        (a retried image is the same image: the reals do not depend on the storage's mood)."""
        return fetch_images(self.index, fs, paths, self.config.data.retry_tries, self.config.data.retry_seconds)

    def _real_image(self, fs, order: list[int], item: int, fetched: dict) -> torch.Tensor:
        """Item ``item`` of the shuffled dataset; an image that is gone or does not decode is replaced by the next
        one ``real_count`` further on (the same choice on every rank), so one corrupt file does not stop the
        evaluation."""
        for position in range(item, len(order), self.real_count):
            path = self.index.paths[order[position]]
            try:
                data = fetched[path] if position == item else self._fetch(fs, [path])[path]
                return decode_fetched(data, self.config.data.resolution, self.config.data.channels)
            except GONE_OR_UNREADABLE as exc:
                logger.warning("metrics: skipping unreadable image %s (%s)", path, type(exc).__name__)
        raise ValueError(f"metrics: no readable image for real item {item} of {self.index.url}")

    def generated_images(self, generator: nn.Module, num_classes: int, items: list[int]) -> torch.Tensor:
        """Generated items ``items``: each from its own seeded z (and class ``item % num_classes``), so the same
        fakes whichever rank draws them."""
        z = torch.stack([torch.randn(self.config.model.z_dim, generator=torch.Generator().manual_seed(
            FAKE_SEED_OFFSET + i)) for i in items]).to(self.device)
        labels = torch.tensor([i % num_classes for i in items], device=self.device) if num_classes else None
        # NVlabs' metrics draw StyleGAN2's per-layer noise at random (grids use the fixed noise)
        noise = {"noise_mode": "random"} if isinstance(generator, stylegan2.Generator) else {}
        return as_rgb(samples(generator, z, labels, **noise)).to(self.device)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale images repeated into three channels for the feature extractor (as NVlabs' metrics)."""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


@torch.no_grad()
def samples(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor | None, **options: Any) -> torch.Tensor:
    """Images in eval mode, leaving the generator's mode and the training random streams untouched (a grid or an
    evaluation at one iteration and not another must not change what training does next)."""
    was_training = generator.training
    generator.eval()
    devices = [z.device] if z.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            return generator(z, labels, **options).cpu()
    finally:
        generator.train(was_training)

