"""The dataset manifest: listed once by rank 0, reused on restart, read by every rank; and a listing may take longer
than a collective."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from daskgan import dispatch
from daskgan.config import DataConfig, OutputConfig
from daskgan.data import synthetic
from daskgan.data.index import index_images
from daskgan.data.manifest import training_index
from daskgan.errors import ConfigError
from daskgan.ranks import from_rank0
from daskgan.run import layout, storage


def configs(data_url, run_url, options, **data):
    return (DataConfig(url=data_url, storage_options=options, **data),
            OutputConfig(run_url=run_url, storage_options=options))


def test_the_manifest_is_written_once_and_reused(shapes_in_bucket):
    bucket, options = shapes_in_bucket(12)
    data, output = configs(f"{bucket}/data", f"{bucket}/run", options)
    first = training_index(data, output)
    assert first == index_images(data.url, options)
    fs, _ = storage.filesystem(data.url, options)
    assert len(first.sizes) == 12, "every image listed"
    assert list(first.sizes) == [len(fs.cat_file(path)) for path in first.paths], "object sizes from the listing"
    synthetic.write_dataset(f"{bucket}/data/extra", images=3, resolution=16, storage_options=options)
    assert training_index(data, output) == first, "a restart reads the manifest instead of listing again"
    storage.filesystem(bucket, options)[0].rm(f"{bucket}/run/{layout.MANIFEST}")
    assert len(training_index(data, output)) == 15, "deleting the manifest lists again"


def test_a_run_manifest_of_another_dataset_is_replaced(shapes_in_bucket):
    bucket, options = shapes_in_bucket(6)
    synthetic.write_dataset(f"{bucket}/other", images=4, resolution=16, storage_options=options)
    _, output = configs(None, f"{bucket}/run", options)
    assert len(training_index(DataConfig(url=f"{bucket}/data", storage_options=options), output)) == 6
    assert len(training_index(DataConfig(url=f"{bucket}/other", storage_options=options), output)) == 4


def test_a_shared_manifest_must_describe_data_url(shapes_in_bucket):
    bucket, options = shapes_in_bucket(6)
    synthetic.write_dataset(f"{bucket}/other", images=4, resolution=16, storage_options=options)
    shared = f"{bucket}/manifests/shapes.json.gz"
    data, output = configs(f"{bucket}/data", f"{bucket}/run-a", options, manifest=shared)
    training_index(data, output)
    assert storage.exists(shared, options) and not storage.exists(f"{bucket}/run-a/{layout.MANIFEST}", options)
    other, _ = configs(f"{bucket}/other", f"{bucket}/run-b", options, manifest=shared)
    with pytest.raises(ConfigError, match=f"data.manifest: {shared} lists {bucket}/data, not data.url"):
        training_index(other, output)


def label_out_of_range(dataset: str) -> bytes:
    return gzip.compress(json.dumps({"format": "daskgan-manifest/2", "dataset": dataset, "classes": [],
                                     "images": [["a.png", 1, 3]]}).encode())


@pytest.mark.parametrize("content", [lambda _: b"not gzip", lambda _: gzip.compress(b"[1, 2]"), label_out_of_range])
def test_a_broken_manifest_is_one_clear_error(shapes_in_bucket, content):
    bucket, options = shapes_in_bucket(2)
    data, output = configs(f"{bucket}/data", f"{bucket}/run", options)
    storage.write_bytes(f"{bucket}/run/{layout.MANIFEST}", content(data.url), options)
    with pytest.raises(ConfigError, match=f"{bucket}/run/{layout.MANIFEST} is not a daskgan dataset manifest"):
        training_index(data, output)


def slow_rank0_value(seconds, timeout_s):
    return from_rank0(lambda: time.sleep(seconds) or "listed", timeout_s=timeout_s)


@pytest.mark.slow
def test_ranks_wait_for_a_listing_longer_than_the_collective_timeout(dask_client):
    with pytest.raises(RuntimeError, match=r"(?i)timed out|timeout"):  # the defect: bounded by the collective timeout
        dispatch.results(dispatch.run(dask_client, slow_rank0_value, 6, None, timeout=2), timeout=60)
    futures = dispatch.run(dask_client, slow_rank0_value, 6, 60, timeout=2)
    assert dispatch.results(futures, timeout=60) == ["listed", "listed"]


def rank0_fails(timeout_s):
    def unreachable():
        time.sleep(3)  # the other ranks wait in the broadcast meanwhile
        raise ConnectionRefusedError("storage unreachable")

    return from_rank0(unreachable, timeout_s=timeout_s)


@pytest.mark.slow
def test_when_rank0s_work_fails_every_rank_stops_at_once_not_at_the_timeout(dask_client):
    """The other ranks waited for rank 0's answer until the listing timeout: a cancelled rank kept its worker's
    only thread that long, and the restart's ranks could not start there."""
    futures = dispatch.run(dask_client, rank0_fails, 600, timeout=600)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match="storage unreachable"):
        dispatch.results(futures, timeout=60)
    assert all(future.status == "error" for future in futures), [future.status for future in futures]
    assert time.monotonic() - started < 30
