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
from daskgan.errors import NotFound
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
    assert all(b.images.dtype == torch.uint8 for b in batches), "batches stay uint8 until the device"
    assert torch.equal(torch.cat([b.real_images() for b in batches]), expected)
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


@pytest.mark.parametrize("label, why", [([0.5, 0.25], "class numbers"), (-1, "class numbers"),
                                        (1.5, "class numbers")])
def test_dataset_json_labels_that_are_not_class_numbers_are_one_clear_error(tmp_path, label, why):
    """NVlabs' loader also takes float vectors as labels; daskgan's conditional models take a class."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    (folder / "b.png").write_bytes(png(2))
    (folder / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", label]]}))
    with pytest.raises(NotFound, match=rf"dataset\.json: .*b\.png.* {why}"):
        index_images(str(folder))


def odd_and_broken_images() -> dict[str, bytes]:
    """Class folders holding what real datasets hold: non-square, grayscale, RGBA, palette, CMYK JPEG, and broken."""
    def encoded(image, fmt="PNG"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return buffer.getvalue()

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left
    good = {"a/wide.png": encoded(wide), "a/gray.png": encoded(Image.new("L", (16, 16), 77)),
            "a/rgba.png": encoded(Image.new("RGBA", (16, 16), (1, 2, 3, 4))),
            "b/palette.png": encoded(Image.new("P", (16, 16), 3)),
            "b/cmyk.jpg": encoded(Image.new("CMYK", (16, 24), (0, 255, 0, 0)), "JPEG")}
    truncated = good["a/wide.png"][: len(good["a/wide.png"]) // 2]
    return {**good, "b/garbage.png": b"not an image at all", "b/truncated.png": truncated, "b/empty.png": b""}


@pytest.mark.slow
@pytest.mark.parametrize("crop", ["center", "pad"])
def test_dataset_command_converts_odd_images_and_reports_the_broken_ones(dask_client, s3_bucket, tmp_path, crop):
    from distributed import get_task_stream
    from distributed.utils import key_split

    from daskgan.data.convert import convert_dataset

    bucket, options = s3_bucket
    storage.write_many({f"{bucket}/raw/{name}": data for name, data in odd_and_broken_images().items()}, options)
    progress = []
    with get_task_stream(dask_client) as tasks:
        report = convert_dataset(dask_client, f"{bucket}/raw", f"{bucket}/out-{crop}.zip", 8, policy=crop,
                                 storage_options=options, on_chunk=lambda done, total: progress.append((done, total)))
    assert "write_zip" in {key_split(task["key"]) for task in tasks.data}, "a worker writes the zip, not the client"
    assert progress and progress[-1] == (1, 1)
    assert report["images"] == 5 and report["classes"] == ["a", "b"]
    assert sorted(s["path"].rsplit("/", 1)[1] for s in report["skipped"]) == ["empty.png", "garbage.png",
                                                                               "truncated.png"]
    assert all(s["reason"] for s in report["skipped"])
    index = index_images(f"{bucket}/out-{crop}.zip", options)
    assert len(index) == 5 and index.classes == ("0", "1") and list(index.labels) == [0, 0, 0, 1, 1]
    fs, path = storage.filesystem(f"{bucket}/out-{crop}.zip", options)
    with fs.open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".png"))
        assert members[0] == "00000/img00000000.png"
        images = {n: Image.open(io.BytesIO(archive.read(n))) for n in members}
    assert all(image.size == (8, 8) and image.mode == "RGB" for image in images.values())
    wide = images[members[2]]  # a/wide.png, third in the source's sorted order (gray, rgba, wide)
    corner, middle = wide.getpixel((0, 4)), wide.getpixel((4, 4))
    if crop == "pad":
        assert wide.getpixel((4, 0)) == (0, 0, 0) and corner[2] > 200, "black bars above and below, blue kept"
    else:
        assert corner[0] > 200 and middle[0] > 200, "the centre square is all red: the blue band is cropped away"


@pytest.mark.slow
def test_dataset_command_line_makes_a_grayscale_zip(tmp_path):
    from test_cli_errors import daskgan

    source = tmp_path / "raw"
    source.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (i * 80, 10, 10)).save(source / f"{i}.png")
    dest = tmp_path / "datasets" / "gray.zip"  # in a folder not made yet
    result = daskgan("dataset", str(source), str(dest), "--resolution", "8", "--channels", "1")
    assert result.returncode == 0, result.stderr
    assert "dataset: 1 of 1 chunks converted" in result.stdout, "without a terminal, progress is logged"
    with zipfile.ZipFile(dest) as archive:
        image = Image.open(io.BytesIO(archive.read("00000/img00000000.png")))
        assert image.mode == "L" and image.size == (8, 8)
        assert json.loads(archive.read("dataset.json"))["labels"] is None, "no class folders: unlabelled"


def test_a_zip_of_many_chunks_keeps_the_source_order_and_one_that_fails_part_way_leaves_nothing(tmp_path,
                                                                                                 monkeypatch):
    """Chunks are converted a few at a time ahead of the writer. A zip cut short (a worker's error, ^C) would
    still be a readable archive, of fewer images and without its labels: training would take it for the
    dataset."""
    from distributed import Client

    from daskgan.data import convert

    source = tmp_path / "raw"
    for i in range(7):
        (source / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (i * 30, 10, 10)).save(source / f"class{i % 2}" / f"{i}.png")
    monkeypatch.setattr(convert, "CHUNK", 2)  # 4 chunks, 2 ahead of the writer on one worker thread
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        progress = []
        convert.convert_dataset(client, str(source), str(tmp_path / "ok.zip"), 8,
                                on_chunk=lambda done, total: progress.append((done, total)))
        with zipfile.ZipFile(tmp_path / "ok.zip") as archive:
            reds = [Image.open(io.BytesIO(archive.read(f"00000/img{n:08d}.png"))).getpixel((4, 4))[0]
                    for n in range(7)]
            labels = json.loads(archive.read("dataset.json"))["labels"]
        assert reds == [0, 60, 120, 180, 30, 90, 150], "class0's images, then class1's, each in name order"
        assert [label for _, label in labels] == [0, 0, 0, 0, 1, 1, 1] and progress[-1] == (4, 4)

        converted = convert.convert_image

        def failing_on_the_last_chunk(data: bytes, *args, **kwargs) -> bytes:
            if Image.open(io.BytesIO(data)).getpixel((0, 0))[0] == 150:
                raise RuntimeError("the worker fell over")
            return converted(data, *args, **kwargs)

        monkeypatch.setattr(convert, "convert_image", failing_on_the_last_chunk)
        with pytest.raises(RuntimeError, match="fell over"):
            convert.convert_dataset(client, str(source), str(tmp_path / "cut.zip"), 8)
    assert not (tmp_path / "cut.zip").exists()
