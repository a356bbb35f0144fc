"""FID/KID: the torch matrix root against scipy, behaviour on known sets, and 2 workers = 1 process."""

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from daskgan import dispatch, metrics, ranks
from daskgan.metrics import extractors
from daskgan.run import storage


def random_psd(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim * 2, generator=generator, dtype=torch.float64)
    return a @ a.T / dim


def test_torch_sqrtm_matches_scipy():
    matrix = random_psd(64, 0)
    ours = metrics.sqrtm_psd(matrix).numpy()
    assert np.allclose(ours, scipy.linalg.sqrtm(matrix.numpy()).real, atol=1e-8)
    assert np.allclose(ours @ ours, matrix.numpy(), atol=1e-8)


def test_frechet_distance_matches_the_scipy_formula():
    s1, s2 = random_psd(32, 1), random_psd(32, 2)
    mu1, mu2 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # the usual pytorch-fid / NVlabs computation
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_and_kid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(200, 3, 32, 32, generator=generator) * 2 - 1
    extractor = metrics.load_extractor()
    real = extractor(images)
    assert real.shape == (200, 512) and extractor.name == "random-cnn-v1"
    assert abs(metrics.fid(real, real)) < 1e-6
    fids, kids = [], []
    for noise in (0.1, 0.3, 0.6):
        noisy = extractor((images + noise * torch.randn(images.shape, generator=generator)).clamp(-1, 1))
        fids.append(metrics.fid(real, noisy))
        kids.append(metrics.kid(real, noisy, subsets=10, subset_size=100))
    assert 0 < fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids
    assert abs(metrics.kid(real, real, subsets=10, subset_size=100)) < 0.05 * kids[2], "unbiased: noise around 0"


def distributed_fid(images, fakes):
    extractor = metrics.load_extractor()
    real = metrics.embed_share(len(images), lambda idx: images[idx], extractor, batch_size=7)
    fake = metrics.embed_share(len(fakes), lambda idx: fakes[idx], extractor, batch_size=7)
    scores = ranks.from_rank0(lambda: metrics.compute(["fid", "kid"], real, fake))
    return {**scores, "holds_features": real is not None and fake is not None,
            "dtype": None if real is None else str(real.dtype)}


@pytest.mark.slow
def test_fid_from_two_workers_equals_one_process(dask_client):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(41, 3, 16, 16, generator=generator) * 2 - 1  # an odd count: shares of 21 and 20
    fakes = images.flip(3) * 0.8
    single = distributed_fid(images, fakes)
    per_rank = dispatch.results(dispatch.run(dask_client, distributed_fid, images, fakes), timeout=120)
    assert [r["holds_features"] for r in per_rank] == [True, False], "only rank 0 gathers the features"
    assert per_rank[0]["dtype"] == "torch.float32"
    for result in per_rank:
        # float32 features from differently composed batches
        assert result["fid"] == pytest.approx(single["fid"], rel=1e-6)
        assert result["kid"] == pytest.approx(single["kid"], rel=1e-6)


def test_real_features_skip_a_corrupt_image(tmp_path):
    from daskgan.config import JobConfig
    from daskgan.data import synthetic
    from daskgan.data.index import index_images
    from daskgan.training.evaluation import Evaluator

    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=12, resolution=16)
    index = index_images(data_url)
    (tmp_path / "data" / index.paths[0].split("/data/", 1)[1]).write_bytes(b"not an image")
    config = JobConfig.from_dict({"name": "m", "data": {"url": data_url, "resolution": 16},
                                  "metrics": {"every": 1, "images": 4, "real_images": 4},
                                  "output": {"run_url": tmp_path.as_uri() + "/run"}})
    evaluator = Evaluator(config, index, torch.device("cpu"))
    order = list(range(12))
    images = evaluator.real_images(order, [0, 1])
    assert images.shape == (2, 3, 16, 16)
    assert torch.equal(images[0], evaluator.real_images(order, [4])[0]), "item 0 falls back to item 0 + real_count"


def gathered_items(count):
    """Features whose value is the item's index, gathered by embed_share."""
    features = metrics.embed_share(count, lambda items: torch.tensor(items, dtype=torch.float64)[:, None].repeat(1, 3),
                                   torch.nn.Identity(), batch_size=2)
    return None if features is None else (features.dtype, features[:, 0].tolist(), features.shape[1])


@pytest.mark.slow
@pytest.mark.parametrize("count", [7, 1])
def test_rank0_gathers_float32_features_in_item_order(dask_client, count):
    per_rank = dispatch.results(dispatch.run(dask_client, gathered_items, count), timeout=120)
    assert per_rank[1] is None
    assert per_rank[0] == (torch.float32, [float(i) for i in range(count)], 3), "one item: rank 1 embeds nothing"


def test_fid_fakes_of_stylegan2_carry_random_noise_as_nvlabs_metrics(tmp_path):
    from daskgan.config import JobConfig
    from daskgan.data.index import ImageIndex
    from daskgan.models.stylegan2 import Generator
    from daskgan.training.evaluation import Evaluator, samples

    config = JobConfig.from_dict({"name": "m", "data": {"url": "memory://none", "resolution": 16},
                                  "model": {"family": "stylegan2", "z_dim": 8, "w_dim": 8},
                                  "metrics": {"every": 1, "images": 2},
                                  "output": {"run_url": tmp_path.as_uri() + "/run"}})
    evaluator = Evaluator(config, ImageIndex("memory://none", ("a",), (0,), ()), torch.device("cpu"))
    G = Generator(16, z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 64, channel_max=8)
    for block in G.blocks:
        for layer in block.convs:
            layer.noise_strength.data.fill_(0.5)
    fakes = evaluator.generated_images(G, 0, [0, 1])
    z = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(1_000_000 + i)) for i in (0, 1)])
    assert not torch.allclose(fakes, samples(G, z, None)), "not the fixed (const) noise of the grids"
    assert torch.allclose(fakes, samples(G, z, None, noise_mode="random"))


def test_inception_score_of_known_distributions():
    classes = 10
    confident_and_diverse = torch.eye(classes).repeat(50, 1)  # every class equally often, each image certain
    assert metrics.inception_score(confident_and_diverse) == pytest.approx(classes)
    assert metrics.inception_score(torch.full((500, classes), 1 / classes)) == pytest.approx(1.0), "no confidence"
    one_class = torch.zeros(500, classes)
    one_class[:, 3] = 1
    assert metrics.inception_score(one_class) == pytest.approx(1.0), "no diversity"
    mixed = torch.eye(classes).repeat(50, 1) * 0.5 + 0.05  # half certain: between the two
    assert 1 < metrics.inception_score(mixed) < classes


class FakeClassifyingInception(torch.nn.Module):
    """Features from the mean colour (as test_extractors' FakeInception, padded to Inception's 2048), and class
    probabilities from it (3 classes), as a detector would."""

    def forward(self, images: torch.Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        colours = images.float().mean(dim=[2, 3])
        if return_features:
            return torch.cat([colours, torch.zeros(len(images), 2045)], dim=1)
        return torch.softmax(colours / 10, dim=1)


def test_evaluation_scores_is_beside_fid_and_ranks_checkpoints_high_to_low(tmp_path, monkeypatch):
    from daskgan.config import JobConfig
    from daskgan.config.schema import HIGHER_IS_BETTER
    from daskgan.data import synthetic
    from daskgan.data.index import index_images
    from daskgan.models.dcgan import Generator
    from daskgan.run import checkpoint
    from daskgan.training.evaluation import Evaluator

    detector = tmp_path / "inception.pt"
    torch.jit.script(FakeClassifyingInception()).save(str(detector))
    monkeypatch.setattr(extractors, "INCEPTION_SHA256", hashlib.sha256(detector.read_bytes()).hexdigest())
    monkeypatch.setenv("DASKGAN_CACHE", str(tmp_path / "cache"))
    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=8, resolution=16)
    config = JobConfig.from_dict({"name": "m", "data": {"url": data_url, "resolution": 16},
                                  "metrics": {"every": 1, "images": 20, "kinds": ["is", "fid"],
                                              "extractor": "inception", "extractor_url": detector.as_uri()},
                                  "output": {"run_url": tmp_path.as_uri() + "/run", "keep_best": 1}})
    assert config.ranking_metric == "is" and "is" in HIGHER_IS_BETTER
    scores = Evaluator(config, index_images(data_url), torch.device("cpu")).evaluate(Generator(16, 100, 8), 0, 1)
    assert scores["is"] >= 1 and scores["fid"] >= 0 and scores["metrics_extractor"] == "inception-v3"
    run = tmp_path.as_uri() + "/ranked"
    for iteration, score in ((1, 2.0), (2, 5.0), (3, 3.0)):
        checkpoint.save(run, {"iteration": iteration}, iteration, keep=1, score=score, keep_best=1, metric="is",
                        higher_is_better=True)
    assert [entry["iteration"] for entry in checkpoint.index(run)["best"]] == [2], "the highest IS is the best"


def test_is_without_an_inception_extractor_is_one_clear_error():
    from daskgan.config import ConfigError, JobConfig

    with pytest.raises(ConfigError, match="'is' needs Inception's class probabilities"):
        JobConfig.from_dict({"name": "m", "data": {"url": "memory://d"}, "metrics": {"kinds": ["fid", "is"]},
                             "output": {"run_url": "memory://run"}})


def test_real_features_cached_beside_the_dataset_serve_another_run(tmp_path):
    from daskgan.config import JobConfig
    from daskgan.data import synthetic
    from daskgan.data.index import index_images
    from daskgan.models.dcgan import Generator
    from daskgan.training.evaluation import Evaluator

    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=8, resolution=16)
    shared = tmp_path / "feature-cache"

    def evaluate(run: str) -> float:
        config = JobConfig.from_dict({"name": run, "data": {"url": data_url, "resolution": 16},
                                      "metrics": {"every": 1, "images": 6, "kinds": ["fid"],
                                                  "real_cache_url": shared.as_uri()},
                                      "output": {"run_url": tmp_path.as_uri() + f"/{run}"}})
        torch.manual_seed(0)
        evaluator = Evaluator(config, index_images(data_url), torch.device("cpu"))
        return evaluator.evaluate(Generator(16, 100, 8), 0, 1)["fid"]

    first = evaluate("run-a")
    cached = list(shared.glob("real-*.pt"))
    assert len(cached) == 1 and not list((tmp_path / "run-a").rglob("real-*.pt"))
    torch.save(torch.load(cached[0]) + 1.0, cached[0])  # a second run must use the cache, not embed again
    assert evaluate("run-b") != first


def rank_statistics(images):
    """The dataset statistics of ``images`` with every rank holding every other item, in batches of 3."""
    mine = images[ranks.rank()::ranks.world_size()]
    mean, covariance, count = metrics.dataset_statistics((mine[i:i + 3] for i in range(0, len(mine), 3)),
                                                         metrics.load_extractor())
    return mean, covariance, count


@pytest.mark.slow
def test_dataset_statistics_from_two_workers_equal_those_of_all_features_at_once(dask_client):
    images = torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = metrics.feature_statistics(metrics.load_extractor()(images))
    for mean, covariance, count in dispatch.results(dispatch.run(dask_client, rank_statistics, images), timeout=120):
        assert count == 11
        assert torch.allclose(mean, expected[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(covariance, expected[1], rtol=1e-4, atol=1e-6)


def test_fid_against_the_whole_dataset_streams_every_image_once_and_caches_its_statistics(tmp_path):
    from daskgan.config import JobConfig
    from daskgan.data import synthetic
    from daskgan.data.decode import decode_image
    from daskgan.data.index import index_images
    from daskgan.models.dcgan import Generator
    from daskgan.training.evaluation import Evaluator

    data_url = tmp_path.as_uri() + "/data"
    synthetic.write_dataset(data_url, images=70, resolution=16)  # more than a batch of 64: a short last batch
    config = JobConfig.from_dict({"name": "m", "data": {"url": data_url, "resolution": 16},
                                  "metrics": {"every": 1, "images": 6, "real_images": 4, "kinds": ["fid"],
                                              "fid_reals": "dataset"},
                                  "output": {"run_url": tmp_path.as_uri() + "/run"}})
    index = index_images(data_url)
    evaluator = Evaluator(config, index, torch.device("cpu"))
    torch.manual_seed(0)
    generator = Generator(16, 100, 8)
    score = evaluator.evaluate(generator, 0, 1)["fid"]

    cached, = (tmp_path / "run" / "metrics").glob("real-stats-*.pt")
    stats = torch.load(cached, weights_only=True)
    assert stats["count"] == 70 and not list((tmp_path / "run" / "metrics").glob("real-[!s]*.pt"))
    fs, _ = storage.filesystem(data_url)
    every = torch.stack([decode_image(fs.cat_file(path), 16) for path in index.paths])
    mean, covariance = metrics.feature_statistics(evaluator.extractor(every))
    assert torch.allclose(stats["mean"], mean, atol=1e-6) and torch.allclose(stats["covariance"], covariance, atol=1e-6)
    fakes = evaluator.extractor(evaluator.generated_images(generator, 0, list(range(6))))
    assert score == pytest.approx(metrics.frechet_distance(mean, covariance, *metrics.feature_statistics(fakes)),
                                  rel=1e-6)
    report = json.loads((tmp_path / "run" / "metrics" / "000000001.json").read_text())
    assert report["fid_real_images"] == 70
