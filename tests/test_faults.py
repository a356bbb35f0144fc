"""Storage that misbehaves as S3 does under load, through a fault-injecting proxy on loopback in front of the
S3 server: throttling and server errors are retried, never mistaken for bad images; refused credentials stop."""

from __future__ import annotations

import time

import pytest
from fault_proxy import FaultProxy, Faults

from daskgan.config import DataConfig
from daskgan.data import synthetic
from daskgan.data.index import index_images
from daskgan.data.stream import ImageStream
from daskgan.errors import StorageAccessError
from daskgan.run import checkpoint, storage

# botocore's own retries off (s3fs still retries a 503 a few times, a 500 not): injected errors reach daskgan
# without botocore's backoff sleeps
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def read_epochs(url: str, options: dict, epochs: int, images: int, batch_size: int = 8) -> tuple[ImageStream, list]:
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=batch_size, retry_tries=30)
    stream = ImageStream(index_images(url, options), config)
    try:
        batches = [next(stream) for _ in range(epochs * images // batch_size)]
    finally:
        stream.close()
    return stream, batches


@pytest.mark.slow
def test_throttled_reads_deliver_every_image_and_skip_none(s3_server, shapes_in_bucket):
    bucket, options = shapes_in_bucket(32)
    faults = Faults(error_share=0.6, only_object_gets=True)
    started = time.monotonic()
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        stream, batches = read_epochs(f"{bucket}/data", {**options, "endpoint_url": proxy.endpoint_url}, 2, 32)
    seconds = time.monotonic() - started
    assert [b.position.epoch for b in batches] == [0] * 4 + [1] * 4 and batches[-1].position.offset == 32
    assert stream.skipped == 0, "no good image is taken for a bad one"
    errors = faults.counts[503] + faults.counts[500]
    assert errors > 32
    print(f"\n60% of object GETs answered 503/500: {errors} errors, {faults.counts['forwarded']} forwarded; "
          f"2 epochs of 32 images delivered, {stream.skipped} skipped, {stream.retried} fetches retried by "
          f"daskgan (beyond botocore's own), {seconds:.1f}s")


def test_resets_and_delays_are_retried_too(s3_server, shapes_in_bucket):
    bucket, options = shapes_in_bucket(32)
    faults = Faults(reset_share=0.1, delay_share=0.2, delay_s=0.2, only_object_gets=True, seed=1)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        stream, batches = read_epochs(f"{bucket}/data", {**options, "endpoint_url": proxy.endpoint_url}, 1, 32)
    assert len(batches) == 4 and stream.skipped == 0 and faults.counts["reset"] > 0


def test_writes_retry_and_checkpoints_land_whole(s3_server, s3_bucket):
    bucket, options = s3_bucket
    faults = Faults(error_share=0.5, seed=2)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url}
        for iteration in (1, 2, 3):
            checkpoint.save(f"{bucket}/run", {"iteration": iteration}, iteration, keep=2, storage_options=proxied)
    assert faults.counts[503] + faults.counts[500] > 0
    assert [i for i, _ in checkpoint.list_checkpoints(f"{bucket}/run", options)] == [2, 3]
    assert checkpoint.load(checkpoint.latest(f"{bucket}/run", options), options)["iteration"] == 3


@pytest.mark.slow
def test_training_through_failing_storage_keeps_every_record_grid_and_checkpoint(dask_client, s3_server,
                                                                                  shapes_in_bucket):
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig
    from daskgan.run.records import load

    bucket, options = shapes_in_bucket(32)
    faults = Faults(error_share=0.1, seed=3)  # every request type: listings, reads, writes, deletes
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url}
        job = JobConfig.from_dict({
            "data": {"url": f"{bucket}/data", "storage_options": proxied, "resolution": 16, "batch_size": 4},
            "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 12},
            "output": {"run_url": f"{bucket}/run", "storage_options": proxied, "flush_every": 3, "grid_every": 4,
                       "checkpoint_every": 4, "keep_checkpoints": 5}})
        summary = run_job(dask_client, job)
    assert summary["iterations"] == 12 and faults.counts[503] + faults.counts[500] > 10
    run = f"{bucket}/run"
    assert load(run, options)["iteration"].tolist() == list(range(1, 13))
    assert sorted(storage.list_names(f"{run}/grids", options)) == ["000000004.png", "000000008.png",
                                                                   "000000012.png", "reals.png"]
    assert [i for i, _ in checkpoint.list_checkpoints(run, options)] == [4, 8, 12]
    for _, url in checkpoint.list_checkpoints(run, options):
        assert checkpoint.load(url, options)["iteration"] == int(url.rsplit("/", 1)[1][:-3])
    assert storage.exists(f"{run}/records.parquet", options) and storage.exists(f"{run}/summary.png", options)
    print(f"\n10% of all requests answered 503/500: {dict(faults.counts)}")


@pytest.mark.slow
def test_a_throttled_conversion_converts_every_image_and_skips_none(dask_client, s3_server, shapes_in_bucket):
    from daskgan.data.convert import convert_dataset

    bucket, options = shapes_in_bucket(24)
    faults = Faults(error_share=0.3, only_object_gets=True, seed=4)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        report = convert_dataset(dask_client, f"{bucket}/data", f"{bucket}/converted.zip", 8,
                                 storage_options={**options, "endpoint_url": proxy.endpoint_url,
                                                  **NO_BOTOCORE_RETRIES})
    assert faults.counts[503] + faults.counts[500] > 3
    assert report["skipped"] == [], "a throttled GET is retried, never reported as a broken image"
    assert report["images"] == 24 and len(index_images(f"{bucket}/converted.zip", options)) == 24


@pytest.mark.slow
def test_evaluation_reads_the_same_real_images_through_throttling(s3_server, shapes_in_bucket):
    import torch

    from daskgan.config import JobConfig
    from daskgan.training.evaluation import Evaluator

    bucket, options = shapes_in_bucket(48)

    def reals(storage_options: dict) -> torch.Tensor:
        config = JobConfig.from_dict({"name": "m", "data": {"url": f"{bucket}/data", "resolution": 16,
                                                            "storage_options": storage_options},
                                      "metrics": {"every": 1, "images": 24, "real_images": 24},
                                      "output": {"run_url": f"{bucket}/run", "storage_options": options}})
        evaluator = Evaluator(config, index_images(f"{bucket}/data", options), torch.device("cpu"))
        return evaluator.real_images(list(range(48)), list(range(24)))

    faults = Faults(error_share=0.3, only_object_gets=True, seed=5)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        throttled = reals({**options, "endpoint_url": proxy.endpoint_url, **NO_BOTOCORE_RETRIES})
    assert faults.counts[503] + faults.counts[500] > 3
    assert torch.equal(throttled, reals(options)), "a throttled GET is retried, not replaced by another image"


@pytest.mark.slow
def test_the_real_examples_beside_the_samples_are_read_through_throttling(s3_server, shapes_in_bucket):
    import torch

    from daskgan.config import JobConfig
    from daskgan.training.loop import real_examples

    bucket, options = shapes_in_bucket(16)
    faults = Faults(error_share=0.5, only_object_gets=True, seed=6)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url, **NO_BOTOCORE_RETRIES}
        config = JobConfig.from_dict({"name": "g", "data": {"url": f"{bucket}/data", "resolution": 16,
                                                            "storage_options": proxied},
                                      "output": {"run_url": f"{bucket}/run", "grid_images": 16}})
        reals = real_examples(config, index_images(f"{bucket}/data", options), None)
    assert faults.counts[503] + faults.counts[500] > 3
    grey = torch.zeros(3, 16, 16)
    assert not any(torch.equal(image, grey) for image in reals), "a throttled example is fetched again, not greyed"


@pytest.mark.slow
def test_a_zip_is_listed_and_its_members_read_through_throttling(s3_server, s3_bucket):
    """zipfile calls a failed read of the archive's end "not a zip file"; a member whose local extra field
    outgrows the first ranged GET takes a second GET. Both are retried like any other read."""
    import io
    import struct
    import zipfile

    from test_archive import png

    bucket, options = s3_bucket
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(8):
            info = zipfile.ZipInfo(f"00000/img{i:08d}.png")
            info.extra = struct.pack("<HH", 0xCAFE, 200) + bytes(200)  # an unknown 204-byte extra field
            archive.writestr(info, png(i * 13))
    storage.write_bytes(f"{bucket}/extra.zip", buffer.getvalue(), options)
    faults = Faults(error_share=0.3, only_object_gets=True, seed=7)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint_url, **NO_BOTOCORE_RETRIES}
        for _ in range(10):  # each listing's first read is of the archive's end
            assert len(index_images(f"{bucket}/extra.zip", proxied)) == 8
        config = DataConfig(url=f"{bucket}/extra.zip", storage_options=proxied, resolution=16, batch_size=4,
                            retry_tries=30)
        stream = ImageStream(index_images(f"{bucket}/extra.zip", options), config, epochs=2)
        try:
            assert len(list(stream)) == 4 and stream.skipped == 0
        finally:
            stream.close()
    assert faults.counts[503] + faults.counts[500] > 8


@pytest.fixture
def revocable_key(credential_checking_s3):
    """A fresh access key of the checking server's user, a bucket with 32 images, and a function that revokes
    the key (IAM deletes it: every later request is refused as S3 refuses an expired or revoked key)."""
    import s3fs

    server, iam, _ = credential_checking_s3
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    options = {"endpoint_url": server.endpoint_url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    bucket = f"revoke-{key['AccessKeyId'][-8:].lower()}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    synthetic.write_dataset(f"s3://{bucket}/data", images=32, resolution=16, storage_options=options)

    def revoke() -> None:
        iam.delete_access_key(UserName="trainer", AccessKeyId=key["AccessKeyId"])

    return f"s3://{bucket}", options, revoke


def test_credentials_revoked_mid_run_stop_the_stream_at_once_naming_the_dataset(revocable_key):
    bucket, options, revoke = revocable_key
    config = DataConfig(url=f"{bucket}/data", storage_options=options, resolution=16, batch_size=8, fetch_batch=8,
                        prefetch_batches=1)
    stream = ImageStream(index_images(f"{bucket}/data", options), config)
    try:
        next(stream)
        revoke()
        started = time.monotonic()
        with pytest.raises(StorageAccessError, match=f"{bucket}/data: access denied .* credentials are taken from"):
            for _ in range(8):  # past the batches fetched before the revocation
                next(stream)
        assert time.monotonic() - started < 30, "refused credentials are not retried like throttling"
    finally:
        stream.close()
    assert stream.skipped == 0, "no image is blamed for the refusal"


def set_environment(values: dict) -> None:
    import os

    os.environ.update(values)


@pytest.mark.slow
def test_credentials_revoked_mid_training_stop_the_job_with_one_clear_error(dask_client, revocable_key):
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig

    bucket, options, revoke = revocable_key
    dask_client.run(set_environment, {"DASKGAN_TEST_KEY": options["key"], "DASKGAN_TEST_SECRET": options["secret"]})
    from_workers = {"endpoint_url": options["endpoint_url"], "key": "${DASKGAN_TEST_KEY}",
                    "secret": "${DASKGAN_TEST_SECRET}"}  # credentials live only in the workers' environment
    job = JobConfig.from_dict({
        "data": {"url": f"{bucket}/data", "storage_options": from_workers, "resolution": 16, "batch_size": 4,
                 "prefetch_batches": 1},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 10_000},
        "output": {"run_url": f"{bucket}/run", "storage_options": from_workers, "flush_every": 1}})
    seen = []

    def revoke_after_the_first_record(record):
        if not seen:
            revoke()
        seen.append(record["iteration"])

    started = time.monotonic()
    with pytest.raises(StorageAccessError, match=f"{bucket}/(data|run).*: access denied") as caught:
        run_job(dask_client, job, on_record=revoke_after_the_first_record, timeout=60)
    assert "credentials are taken from" in str(caught.value)
    assert seen and seen[-1] < 10_000 and time.monotonic() - started < 120


def test_each_image_costs_one_get_and_no_head(s3_server, shapes_in_bucket):
    bucket, options = shapes_in_bucket(16)
    index = index_images(f"{bucket}/data", options)
    faults = Faults()
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        config = DataConfig(url=f"{bucket}/data", storage_options={**options, "endpoint_url": proxy.endpoint_url},
                            resolution=16, batch_size=8, fetch_batch=16, prefetch_batches=1)
        stream = ImageStream(index, config, epochs=1)  # one epoch: no GETs of the next one under way at the end
        batches = list(stream)
        stream.close()
    assert len(batches) == 2
    assert faults.counts["HEAD"] == 0, "s3fs asks each object's size before a whole-object GET unless told not to"
    assert faults.counts["GET"] == stream.images_read >= 16, "one GET per image read"


@pytest.mark.parametrize("connections", [None, 4])
def test_enough_gets_are_in_flight_to_hide_first_byte_latency(s3_server, shapes_in_bucket, connections):
    """botocore's pool of 10 connections would cap a rank at 100 images/s with 100 ms to a first byte; the user's
    own setting still wins."""
    bucket, options = shapes_in_bucket(48)
    index = index_images(f"{bucket}/data", options)
    faults = Faults(delay_share=1.0, delay_s=0.2, only_object_gets=True)
    mine = {"config_kwargs": {"max_pool_connections": connections}} if connections else {}
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        proxied = {**options, **mine, "endpoint_url": proxy.endpoint_url}
        config = DataConfig(url=f"{bucket}/data", storage_options=proxied, resolution=16, batch_size=48)
        stream = ImageStream(index, config)
        next(stream)
        stream.close()
    if connections is None:
        assert faults.counts["most in flight"] > 10, f"more than botocore's pool of 10: {faults.counts}"
    else:
        assert faults.counts["most in flight"] <= connections, faults.counts


def test_an_image_waiting_for_its_retry_holds_up_no_fetch_behind_it(s3_server, shapes_in_bucket):
    """The first image of the epoch fails its first 4 GETs: the next chunks' images are fetched while it waits
    for its retries (before, every image behind a failed one waited for its retry to end), and each failure
    is the stream's own retry, not botocore's too (their sleeps multiplied)."""
    bucket, options = shapes_in_bucket(32)
    index = index_images(f"{bucket}/data", options)
    first = index.paths[0]  # unshuffled: the first entry of the first chunk of 8
    faults = Faults(fail_first={first: 4}, only_object_gets=True)
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        config = DataConfig(url=f"{bucket}/data", storage_options={**options, "endpoint_url": proxy.endpoint_url},
                            resolution=16, batch_size=8, shuffle=False)
        stream = ImageStream(index, config, epochs=1)
        try:
            batches = list(stream)
        finally:
            stream.close()
    assert len(batches) == 4 and stream.skipped == 0
    arrivals = [path.lstrip("/") for path, _ in faults.object_gets]
    its_gets = [n for n, path in enumerate(arrivals) if path == first]
    before_its_answer = arrivals[:its_gets[-1]]
    assert set(before_its_answer) & set(index.paths[8:]), f"later chunks waited for its retries: {arrivals}"
    assert stream.retried == 4 and arrivals.count(first) == 5, "one GET per try: botocore does not retry too"


def test_storage_that_answers_only_errors_stops_the_stream_naming_the_dataset(s3_server, shapes_in_bucket):
    """Retrying image by image still gives up: after its tries (``retry_tries`` of botocore's 5 attempts each,
    which the stream makes itself) or its time."""
    from daskgan.errors import StorageUnavailable

    bucket, options = shapes_in_bucket(16)
    index = index_images(f"{bucket}/data", options)
    with FaultProxy(s3_server.endpoint_url, Faults(error_share=1.0, only_object_gets=True)) as proxy:
        config = DataConfig(url=f"{bucket}/data", storage_options={**options, "endpoint_url": proxy.endpoint_url},
                            resolution=16, batch_size=8, retry_tries=1, retry_seconds=60)
        stream = ImageStream(index, config)
        try:
            with pytest.raises(StorageUnavailable, match=f"under {bucket}/data: still failing after 5 tries"):
                next(stream)
        finally:
            stream.close()
    assert stream.skipped == 0
