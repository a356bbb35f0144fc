"""NVlabs zip datasets read straight from the bucket, member by member, with their dataset.json labels."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from fault_proxy import FaultProxy, Faults
from PIL import Image

from daskgan.config import DataConfig, OutputConfig
from daskgan.data.decode import decode_image
from daskgan.data.index import index_images
from daskgan.data.manifest import training_index
from daskgan.data.stream import ImageStream
from daskgan.run import storage


def png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (value * 7) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def nvlabs_zip(count: int, classes: int | None = 3) -> tuple[bytes, dict[str, bytes]]:
    """An archive as NVlabs' dataset_tool writes one: 00000/img00000000.png, ..., dataset.json with labels;
    every other member deflated (their tool stores, zip tools often deflate)."""
    images = {f"{i // 1000:05d}/img{i:08d}.png": png(i * 9 % 256) for i in range(count)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (name, data) in enumerate(reversed(list(images.items()))):  # stored out of order
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
        labels = [[name, i % classes] for i, name in enumerate(images)] if classes else None
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    return buffer.getvalue(), images


@pytest.fixture
def zip_in_bucket(s3_bucket):
    bucket, options = s3_bucket
    data, images = nvlabs_zip(20)
    storage.write_bytes(f"{bucket}/ffhq-mini.zip", data, options)
    return f"{bucket}/ffhq-mini.zip", options, images, len(data)


def test_a_zip_is_indexed_in_member_order_with_its_labels(zip_in_bucket):
    url, options, images, _ = zip_in_bucket
    index = index_images(url, options)
    assert list(index.paths) == sorted(images) and index.archive is not None
    assert list(index.labels) == [i % 3 for i in range(20)] and index.classes == ("0", "1", "2")


def test_members_stream_by_ranged_gets_without_downloading_the_archive(s3_server, zip_in_bucket):
    url, options, images, archive_size = zip_in_bucket
    index = index_images(url, options)
    faults = Faults()
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        config = DataConfig(url=url, storage_options={**options, "endpoint_url": proxy.endpoint_url},
                            resolution=8, batch_size=5, shuffle=False, prefetch_batches=1)
        stream = ImageStream(index, config)
        batches = [next(stream) for _ in range(4)]
        stream.close()
    expected = torch.stack([decode_image(images[name], 8) for name in sorted(images)])
    assert torch.equal(torch.cat([b.images for b in batches]), expected)
    assert torch.cat([b.labels for b in batches]).tolist() == [i % 3 for i in range(20)]
    assert faults.counts["GET"] == faults.counts["ranged GET"] >= 20, "every read is a range request"


def test_a_corrupt_member_is_skipped_and_counted(s3_bucket):
    bucket, options = s3_bucket
    data, images = nvlabs_zip(10, classes=None)
    archive = zipfile.ZipFile(io.BytesIO(data))
    deflated = next(i for i in archive.infolist() if i.compress_type == zipfile.ZIP_DEFLATED)
    start = deflated.header_offset + 30 + len(deflated.filename) + 4
    broken = data[:start] + bytes(b ^ 0xFF for b in data[start:start + 8]) + data[start + 8:]
    storage.write_bytes(f"{bucket}/broken.zip", broken, options)
    index = index_images(f"{bucket}/broken.zip", options)
    assert index.classes == () and set(index.labels) == {0}, "dataset.json labels null: unlabelled"
    stream = ImageStream(index, DataConfig(url=f"{bucket}/broken.zip", storage_options=options, resolution=8,
                                           batch_size=3, shuffle=False))
    batches = [next(stream) for _ in range(3)]
    stream.close()
    assert stream.skipped == 1 and sum(len(b.images) for b in batches) == 9


def test_a_zip_manifest_reads_back_with_its_member_positions(zip_in_bucket):
    url, options, _, _ = zip_in_bucket
    bucket = url.rsplit("/", 1)[0]
    index = training_index(DataConfig(url=url, storage_options=options),
                           OutputConfig(run_url=f"{bucket}/run", storage_options=options))
    assert index == index_images(url, options)


def test_a_file_that_is_not_a_zip_is_one_clear_error(s3_bucket):
    from daskgan.errors import NotFound

    bucket, options = s3_bucket
    storage.write_bytes(f"{bucket}/not.zip", b"plain text", options)
    with pytest.raises(NotFound, match=r"not\.zip is not a readable zip archive"):
        index_images(f"{bucket}/not.zip", options)


@pytest.mark.slow
def test_an_nvlabs_zip_trains_with_its_labels_on_two_workers(dask_client, zip_in_bucket):
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig
    from daskgan.run import checkpoint
    from daskgan.run.records import load

    url, options, _, _ = zip_in_bucket
    bucket = url.rsplit("/", 1)[0]
    job = JobConfig.from_dict({
        "data": {"url": url, "storage_options": options, "resolution": 8, "batch_size": 4},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4, "conditional": True},
        "train": {"iterations": 3},
        "output": {"run_url": f"{bucket}/zip-run", "storage_options": options, "checkpoint_every": 3}})
    summary = run_job(dask_client, job)
    assert load(job.output.run_url, options)["iteration"].tolist() == [1, 2, 3]
    assert checkpoint.load(summary["checkpoint"], options)["model"]["num_classes"] == 3, "dataset.json's 3 classes"


def test_a_folder_with_nvlabs_dataset_json_takes_its_labels(s3_bucket):
    bucket, options = s3_bucket
    _, images = nvlabs_zip(6)
    storage.write_many({f"{bucket}/folder/{name}": data for name, data in images.items()}, options)
    labels = [[name, 5 - i] for i, name in enumerate(sorted(images))]
    storage.write_bytes(f"{bucket}/folder/dataset.json", json.dumps({"labels": labels}).encode(), options)
    index = index_images(f"{bucket}/folder", options)
    assert list(index.labels) == [5, 4, 3, 2, 1, 0] and len(index.classes) == 6
    assert all(path.endswith(name) for path, name in zip(index.paths, sorted(images)))
