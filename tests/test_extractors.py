"""The feature extractor by name (``metrics.extractor``): NVlabs' Inception fetched once per host into a cache and
loaded only when its sha256 is NVlabs' file's, from NVlabs' URL or from a bucket or path the user gives."""

import hashlib
import re
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import yaml

from daskgan import metrics
from daskgan.config import ConfigError, JobConfig
from daskgan.errors import ChecksumMismatch, UserError
from daskgan.metrics import extractors
from daskgan.run import storage
from daskgan.tools.sandbox import free_port


class FakeInception(torch.nn.Module):
    """Stands in for NVlabs' TorchScript: uint8 images in, their channel means as features."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.uint8
        return images.float().mean(dim=[2, 3])


@pytest.fixture
def fake_inception(tmp_path, monkeypatch):
    """A small TorchScript file made here, taken as NVlabs' file (its digest injected), served as NVlabs' URL;
    the cache is a fresh folder. Returns the file's path."""
    path = tmp_path / "source" / "inception-2015-12-05.pt"
    path.parent.mkdir()
    torch.jit.script(FakeInception()).save(str(path))
    monkeypatch.setattr(extractors, "INCEPTION_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setattr(extractors, "INCEPTION_URL", path.as_uri())
    monkeypatch.setenv("DASKGAN_CACHE", str(tmp_path / "cache"))
    return path


def job(**metrics_section) -> JobConfig:
    return JobConfig.from_dict({"name": "m", "data": {"url": "memory://d"}, "metrics": metrics_section,
                                "output": {"run_url": "memory://run"}})


def cached_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))


def test_the_extractor_is_chosen_by_name():
    assert job().metrics.extractor == "random-cnn", "the default needs no download"
    assert job(extractor="inception").metrics.extractor == "inception"
    assert metrics.load_extractor("random-cnn").name == "random-cnn-v1"


@pytest.mark.parametrize("section, message", [
    ({"extractor": "vgg"}, "metrics.extractor: must be one of ['inception', 'random-cnn'], got 'vgg'"),
    ({"extractor_url": "s3://models/inception-2015-12-05.pt"},  # a job written before the extractor had a name
     "metrics.extractor_url: is only where NVlabs' Inception file is read from: set metrics.extractor: inception"),
    ({"kinds": ["fid", "is"]}, "'is' needs Inception's class probabilities: set metrics.extractor: inception"),
])
def test_extractor_settings_that_cannot_be_used_are_one_line(section, message):
    with pytest.raises(ConfigError) as refused:
        job(**section)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_readmes_offline_inception_settings_are_a_valid_job():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "extractor: inception" in b]
    section = yaml.safe_load(textwrap.dedent(block))["metrics"]
    assert job(**section).metrics.extractor_url == "s3://my-models/inception-2015-12-05.pt"


def test_inception_by_name_comes_from_nvlabs_url_into_the_cache(fake_inception, tmp_path):
    extractor = metrics.load_extractor("inception")
    assert extractor.name == "inception-v3"
    features = extractor(torch.zeros(2, 3, 8, 8))
    assert torch.allclose(features, torch.full((2, 3), 127.0), atol=1.0), "[-1, 1] -> uint8 [0, 255]"
    assert cached_files(tmp_path) == [f"inception-2015-12-05-{extractors.INCEPTION_SHA256[:12]}.pt"]


def test_a_cached_file_is_not_fetched_again(fake_inception, tmp_path):
    metrics.load_extractor("inception")
    fake_inception.unlink()  # NVlabs' URL now answers nothing: only the cache can serve
    assert metrics.load_extractor("inception").name == "inception-v3"


def test_the_ranks_of_a_host_fetch_once(fake_inception, monkeypatch):
    fetched = []
    read_bytes = storage.read_bytes

    def counting(url, storage_options=None):
        fetched.append(url)
        return read_bytes(url, storage_options)

    monkeypatch.setattr(storage, "read_bytes", counting)
    ranks = [threading.Thread(target=extractors.inception_bytes) for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert fetched == [fake_inception.as_uri()]


def test_a_file_that_is_not_nvlabs_is_refused_in_one_line_and_not_cached(fake_inception, tmp_path, monkeypatch):
    expected = "0" * 64
    monkeypatch.setattr(extractors, "INCEPTION_SHA256", expected)
    actual = hashlib.sha256(fake_inception.read_bytes()).hexdigest()
    with pytest.raises(ChecksumMismatch) as refused:
        metrics.load_extractor("inception")
    message = str(refused.value)
    assert fake_inception.as_uri() in message and expected in message and actual in message
    assert "\n" not in message
    assert cached_files(tmp_path) == []


def test_a_damaged_cached_file_is_fetched_again(fake_inception, tmp_path):
    metrics.load_extractor("inception")
    [name] = cached_files(tmp_path)
    (tmp_path / "cache" / name).write_bytes(b"damaged")
    assert metrics.load_extractor("inception").name == "inception-v3"
    assert (tmp_path / "cache" / name).read_bytes() == fake_inception.read_bytes()


def test_the_file_from_a_local_path_instead_of_nvlabs(fake_inception, tmp_path, monkeypatch):
    monkeypatch.setattr(extractors, "INCEPTION_URL", "https://127.0.0.1:9/unreachable.pt")
    copy = tmp_path / "offline" / "inception-2015-12-05.pt"
    copy.parent.mkdir()
    copy.write_bytes(fake_inception.read_bytes())
    assert metrics.load_extractor("inception", str(copy)).name == "inception-v3"


def test_the_file_from_a_bucket_instead_of_nvlabs(fake_inception, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    monkeypatch.setattr(extractors, "INCEPTION_URL", "https://127.0.0.1:9/unreachable.pt")
    storage.write_bytes(f"{bucket}/models/inception-2015-12-05.pt", fake_inception.read_bytes(), options)
    extractor = metrics.load_extractor("inception", f"{bucket}/models/inception-2015-12-05.pt", options)
    assert extractor.name == "inception-v3"


def test_a_file_from_a_bucket_that_is_not_nvlabs_is_refused(s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    monkeypatch.setenv("DASKGAN_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.pt"
    torch.jit.script(FakeInception()).save(str(other))
    url = f"{bucket}/models/inception-2015-12-05.pt"
    storage.write_bytes(url, other.read_bytes(), options)
    with pytest.raises(ChecksumMismatch, match=f"{url}: sha256 .* is not NVlabs' inception-2015-12-05.pt"):
        metrics.load_extractor("inception", url, options)
    assert cached_files(tmp_path) == []


def test_nvlabs_out_of_reach_says_to_set_extractor_url(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/inception-2015-12-05.pt"  # nothing listens there
    monkeypatch.setattr(extractors, "INCEPTION_URL", url)
    monkeypatch.setenv("DASKGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)  # the retries, without their waits
    with pytest.raises(UserError, match=f"{url}: cannot fetch NVlabs' Inception .* set metrics.extractor_url"):
        metrics.load_extractor("inception")


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DASKGAN_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match="a-file/cache: cannot be written .* set DASKGAN_CACHE"):
        metrics.load_extractor("inception")
