"""WebDataset-style tar shards read straight from the bucket: whole shards per GET, windows shuffled
deterministically, exact mid-shard resume, labels from .cls/.json."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from fault_proxy import FaultProxy, Faults
from test_archive import png

from daskgan.config import DataConfig, OutputConfig
from daskgan.data.decode import decode_uint8
from daskgan.data.index import fetch_objects, index_images
from daskgan.data.manifest import training_index
from daskgan.data.shard_epochs import epoch_windows
from daskgan.data.shard_read import ShardReader
from daskgan.data.shard_scan import expand_braces, sample_key
from daskgan.data.shard_write import tar_shard
from daskgan.data.stream import ImageStream
from daskgan.errors import NotFound
from daskgan.run import storage

SHARDS, PER_SHARD, CLASSES = 6, 5, 3


def labelled_samples(first: int, count: int) -> list[tuple[str, dict[str, bytes]]]:
    """Samples ``first..``: a PNG each, the label as ``.cls`` for even keys and in ``.json`` for odd ones."""
    samples = []
    for i in range(first, first + count):
        label = ({"cls": str(i % CLASSES).encode()} if i % 2 == 0
                 else {"json": json.dumps({"label": i % CLASSES}).encode()})
        samples.append((f"sample{i:06d}", {"png": png(i * 11 % 256), **label}))
    return samples


@pytest.fixture
def shards_in_bucket(s3_bucket):
    """6 shards of 5 labelled images under <bucket>/shards/train-00000{0..5}.tar; returns (pattern, options,
    {path: png bytes} in shard order)."""
    bucket, options = s3_bucket
    images = {}
    for shard in range(SHARDS):
        samples = labelled_samples(shard * PER_SHARD, PER_SHARD)
        name = f"{bucket}/shards/train-{shard:06d}.tar"
        storage.write_bytes(name, tar_shard(samples), options)
        images.update({f"{name.removeprefix('s3://')}/{key}.png": members["png"] for key, members in samples})
    return f"{bucket}/shards/train-{{000000..{SHARDS - 1:06d}}}.tar", options, images


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand_braces("b/train-{000..002}.tar") == ["b/train-000.tar", "b/train-001.tar", "b/train-002.tar"]
    assert expand_braces("b/{1..2}/s-{0..1}.tar") == ["b/1/s-0.tar", "b/1/s-1.tar", "b/2/s-0.tar", "b/2/s-1.tar"]
    assert sample_key("a/b.seg.png") == ("a/b", "seg.png") and sample_key("x.PNG") == ("x", "png")


def test_shards_are_indexed_in_order_with_cls_and_json_labels(shards_in_bucket):
    pattern, options, images = shards_in_bucket
    index = index_images(pattern, options)
    assert list(index.paths) == list(images) and len(index.shards) == SHARDS
    assert list(index.labels) == [i % CLASSES for i in range(SHARDS * PER_SHARD)]
    assert index.classes == ("0", "1", "2")
    folder = index_images(pattern.rsplit("/", 1)[0], options)  # the folder holding only shards: the same set
    assert folder.paths == index.paths and folder.labels == index.labels


def test_shard_manifest_reads_back_with_every_members_place(shards_in_bucket):
    pattern, options, _ = shards_in_bucket
    bucket = pattern.split("/shards/")[0]
    index = training_index(DataConfig(url=pattern, storage_options=options),
                           OutputConfig(run_url=f"{bucket}/run", storage_options=options))
    assert index == index_images(pattern, options)


def test_samples_missing_a_label_or_an_image_are_named(s3_bucket):
    bucket, options = s3_bucket
    samples = labelled_samples(0, 3) + [("nolabel", {"png": png(1)}), ("noimage", {"cls": b"1"})]
    storage.write_bytes(f"{bucket}/mixed/a.tar", tar_shard(samples), options)
    with pytest.raises(NotFound, match=r"1 of 4 samples have no label .* e\.g\. .*a\.tar/nolabel\.png"):
        index_images(f"{bucket}/mixed/a.tar", options)
    storage.write_bytes(f"{bucket}/plain/a.tar", tar_shard([("x", {"png": png(2)}), ("y", {"jpg": b"?"})]), options)
    unlabelled = index_images(f"{bucket}/plain/a.tar", options)
    assert unlabelled.classes == () and len(unlabelled) == 2
    storage.write_bytes(f"{bucket}/bad/a.tar", b"not a tar at all" * 64, options)
    with pytest.raises(NotFound, match=r"a\.tar is not a readable tar shard"):
        index_images(f"{bucket}/bad/a.tar", options)


@pytest.mark.parametrize("member", [{"cls": b"-3"}, {"json": b'{"label": [1]}'}, {"json": b'{"label": 1e999}'},
                                    {"json": b"[" * 100_000}, {"json": b'{"label": true}'}],
                         ids=["negative", "list", "infinity", "nested-too-deep", "boolean"])
def test_a_crafted_label_member_is_no_label_not_an_escaped_error(tmp_path, member):
    """A scraped shard's label member: TypeError, OverflowError and RecursionError escaped the listing; a
    negative label was taken (and its manifest then refused on every start)."""
    (tmp_path / "a.tar").write_bytes(tar_shard(labelled_samples(0, 2) + [("crafted", {"png": png(3), **member})]))
    with pytest.raises(NotFound, match=r"1 of 3 samples have no label .* e\.g\. .*a\.tar/crafted\.png"):
        index_images((tmp_path / "a.tar").as_uri())


def test_compressed_shards_are_one_clear_error(s3_bucket):
    """Training reads a member at its offset in the shard, which a compressed shard does not have."""
    import gzip

    bucket, options = s3_bucket
    for n in range(2):
        shard = gzip.compress(tar_shard(labelled_samples(n, 1)))
        storage.write_bytes(f"{bucket}/gz/train-{n}.tar.gz", shard, options)
    pattern, folder, single = f"{bucket}/gz/train-{{0..1}}.tar.gz", f"{bucket}/gz", f"{bucket}/gz/train-0.tar.gz"
    for url, count in ((pattern, 2), (folder, 2), (single, 1)):
        with pytest.raises(NotFound, match=rf"compressed tar shards \(.*train-0\.tar\.gz, {count} of {count}\) .* "
                                           rf"uncompressed"):
            index_images(url, options)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_rank_reads_whole_shards_of_its_own_in_shuffled_windows(shards_in_bucket, world_size):
    pattern, options, _ = shards_in_bucket
    index = index_images(pattern, options)
    for epoch in range(2):
        read = []
        for rank in range(world_size):
            windows = epoch_windows(index.shard_images, rank, world_size, epoch, seed=5, window=2)
            assert windows == epoch_windows(index.shard_images, rank, world_size, epoch, seed=5, window=2)
            for window in windows:
                assert len(window.shards) <= 2
                assert {index.entries[i].shard for i in window.order} == set(window.shards)
            read += [i for window in windows for i in window.order]
        assert sorted(read) == list(range(SHARDS * PER_SHARD)), "every image once per epoch over the ranks"
    orders = [[i for w in epoch_windows(index.shard_images, 0, 1, e, seed=5, window=3) for i in w.order]
              for e in range(2)]
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0]), "shuffled, differently each epoch"
    with pytest.raises(NotFound, match="6 shards for 7 ranks"):
        epoch_windows(index.shard_images, 0, 7, 0, seed=5, window=2)


def test_the_stream_gets_each_shard_whole_once_per_epoch(s3_server, shards_in_bucket):
    pattern, options, images = shards_in_bucket
    index = index_images(pattern, options)
    faults = Faults()
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        config = DataConfig(url=pattern, storage_options={**options, "endpoint_url": proxy.endpoint_url},
                            resolution=8, batch_size=5, shuffle_shards=2, prefetch_batches=1)
        stream = ImageStream(index, config, seed=1)
        batches = [next(stream) for _ in range(SHARDS)]  # one epoch of 30 images
        got = faults.counts["GET"]
        stream.close()
    decoded = {tuple(decode_uint8(data, 8).flatten().tolist()): i for i, data in enumerate(images.values())}
    seen = [decoded[tuple(image.flatten().tolist())] for b in batches for image in b.images]
    assert sorted(seen) == list(range(SHARDS * PER_SHARD)), "every image once"
    assert torch.cat([b.labels for b in batches]).tolist() == [i % CLASSES for i in seen]
    assert faults.counts["ranged GET"] == 0, "shards are read whole, not member by member"
    assert SHARDS <= got <= SHARDS + 2, f"{got} GETs: one per shard (and the next window's, fetched ahead)"


def test_the_next_epochs_first_window_is_fetched_while_the_last_one_is_read(s3_server, shards_in_bucket):
    pattern, options, _ = shards_in_bucket
    index = index_images(pattern, options)
    faults = Faults()
    windows = [epoch_windows(index.shard_images, 0, 1, epoch, seed=4, window=2) for epoch in range(2)]
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        fs, _ = storage.filesystem(pattern, {**options, "endpoint_url": proxy.endpoint_url})
        reader = ShardReader(fs, index.shards, index.entry_of, ahead=2)

        def read_window(window):
            paths = [index.paths[i] for i in window.order]
            assert all(isinstance(data, bytes) for data in reader.read(paths).values())

        def gets_once_settled():
            for _ in range(100):  # fetches ahead finish in the background
                before = faults.counts["GET"]
                time.sleep(0.05)
                if faults.counts["GET"] == before:
                    return before
            raise AssertionError("GETs still going")

        reader.plan(windows[0], then=windows[1][0].shards)
        for window in windows[0]:
            read_window(window)
        first_epoch = gets_once_settled()
        assert SHARDS <= first_epoch <= SHARDS + 2, "every shard once, and the next epoch's first window's"
        reader.plan(windows[1], then=())
        read_window(windows[1][0])
        assert gets_once_settled() - first_epoch == len(windows[1][1].shards), (
            "the next epoch's first window was already here: only the window after it was fetched (ahead)")
        reader.close()


def test_the_stream_resumes_mid_shard_exactly(shards_in_bucket):
    pattern, options, _ = shards_in_bucket
    index = index_images(pattern, options)
    config = DataConfig(url=pattern, storage_options=options, resolution=8, batch_size=4, shuffle_shards=2,
                        mirror=True)
    stream = ImageStream(index, config, rank=1, world_size=2, seed=3)
    batches = [next(stream) for _ in range(12)]  # 30 images a rank an epoch, mirrored: into the second epoch
    stream.close()
    assert batches[2].position.offset == 12 and 12 % PER_SHARD, "a position inside a shard"
    for cut in (2, 8):
        resumed = ImageStream(index, config, rank=1, world_size=2, seed=3, start=batches[cut].position)
        again = [next(resumed) for _ in range(3)]
        resumed.close()
        for original, repeat in zip(batches[cut + 1:], again):
            assert torch.equal(original.images, repeat.images) and torch.equal(original.labels, repeat.labels)


def test_a_shard_that_fails_transiently_is_fetched_again(s3_server, shards_in_bucket, monkeypatch):
    import s3fs

    pattern, options, _ = shards_in_bucket
    index = index_images(pattern, options)
    faults = Faults(error_share=0.4, only_object_gets=True, seed=2)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # neither s3fs nor botocore retries: daskgan's alone
    no_botocore_retries = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    with FaultProxy(s3_server.endpoint_url, faults) as proxy:
        config = DataConfig(url=pattern, storage_options={**options, **no_botocore_retries,
                                                          "endpoint_url": proxy.endpoint_url},
                            resolution=8, batch_size=5, retry_seconds=60)
        stream = ImageStream(index, config)
        batches = [next(stream) for _ in range(SHARDS)]
        stream.close()
    assert stream.skipped == 0 and sum(len(b.images) for b in batches) == SHARDS * PER_SHARD
    assert stream.retried > 0 and faults.counts[503] + faults.counts[500] > 0, \
        f"failed shard GETs tried again {faults.counts}"


@pytest.mark.slow
def test_a_shard_set_trains_with_its_labels_and_resumes_as_an_uninterrupted_run(dask_client, shards_in_bucket):
    """The resumed half decodes in a process beside each Dask worker, the rest in the worker: the same batches."""
    from daskgan.cluster.driver import run_job
    from daskgan.config import JobConfig
    from daskgan.run import checkpoint
    from daskgan.run.records import load

    pattern, options, _ = shards_in_bucket
    bucket = pattern.split("/shards/")[0]

    def job(run: str, iterations: int, **data) -> JobConfig:
        return JobConfig.from_dict({
            "data": {"url": pattern, "storage_options": options, "resolution": 8, "batch_size": 4,
                     "shuffle_shards": 2, **data},
            "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4, "conditional": True},
            "train": {"iterations": iterations},
            "output": {"run_url": f"{bucket}/{run}", "storage_options": options, "checkpoint_every": 2}})

    straight = run_job(dask_client, job("straight", 6))
    assert checkpoint.load(straight["checkpoint"], options)["model"]["num_classes"] == CLASSES
    run_job(dask_client, job("resumed", 3))  # 12 images a rank: stops inside its third shard
    resumed = run_job(dask_client, job("resumed", 6, decode_processes=1))  # the Dask worker's own decoding process
    assert resumed["resumed_from"].endswith("000000003.pt")
    records = load(f"{bucket}/resumed", options)
    assert records["iteration"].tolist() == list(range(1, 7))
    assert records["loss_G"].tolist() == load(f"{bucket}/straight", options)["loss_G"].tolist(), "the same batches"


@pytest.mark.slow
@pytest.mark.parametrize("crop", ["center", "center-wide", "pad"])
def test_dataset_command_writes_shards_with_a_manifest_and_reports_the_broken_inputs(dask_client, s3_bucket, crop):
    from PIL import Image
    from test_archive import odd_and_broken_images

    from daskgan.data.convert import convert_dataset
    from daskgan.data.manifest import read_manifest
    from daskgan.run.layout import MANIFEST

    bucket, options = s3_bucket
    storage.write_many({f"{bucket}/raw/{name}": data for name, data in odd_and_broken_images().items()}, options)
    dest = f"{bucket}/shards-{crop}"
    report = convert_dataset(dask_client, f"{bucket}/raw", dest, 8, policy=crop, storage_options=options,
                             shard_mb=0.001)  # a kilobyte: an image or two a shard
    assert report["format"] == "shards" and report["images"] == 5 and report["classes"] == ["a", "b"]
    assert sorted(s["path"].rsplit("/", 1)[1] for s in report["skipped"]) == ["empty.png", "garbage.png",
                                                                               "truncated.png"]
    scanned = index_images(dest, options)
    assert len(scanned.shards) > 1 and list(scanned.labels) == [0, 0, 0, 1, 1]
    manifest = read_manifest(storage.join(dest, MANIFEST), options, DataConfig(url=dest, storage_options=options))
    assert manifest.entries == scanned.entries
    assert training_index(DataConfig(url=dest, storage_options=options),
                          OutputConfig(run_url=f"{bucket}/run-{crop}", storage_options=options)).paths == scanned.paths
    fs, _ = storage.filesystem(dest, options)
    wide_path = next(p for p in scanned.paths if p.endswith(f"/{2:09d}.png"))  # a/wide.png: third in source order
    wide = Image.open(io.BytesIO(fetch_objects(scanned, fs, [wide_path])[wide_path]))
    assert wide.size == (8, 8) and wide.mode == "RGB"
    left, centre, top = wide.getpixel((0, 4)), wide.getpixel((4, 4)), wide.getpixel((4, 0))
    if crop == "center":
        assert left[0] > 200 and centre[0] > 200, "the centre square is all red: the blue band is cropped away"
    elif crop == "center-wide":
        assert top == (0, 0, 0) and left[2] > 100 and centre[0] > 200, "a 4:3 band: bars, part of the blue kept"
    else:
        assert top == (0, 0, 0) and left[2] > 200, "black bars above and below, the blue band kept"


@pytest.mark.slow
def test_a_rerun_of_the_dataset_command_keeps_the_shards_already_written(dask_client, s3_bucket):
    from daskgan.data.convert import convert_dataset
    from daskgan.errors import ConfigError

    bucket, options = s3_bucket
    storage.write_many({f"{bucket}/raw/{i % 2}/{i}.png": png(i * 20) for i in range(8)}, options)
    dest = f"{bucket}/shards"
    convert_dataset(dask_client, f"{bucket}/raw", dest, 8, storage_options=options, shard_mb=0.0025)
    names = sorted(n for n in storage.list_names(dest, options) if n.endswith(".tar"))
    assert len(names) >= 3
    kept, lost = storage.join(dest, names[0]), storage.join(dest, names[1])
    original = storage.read_bytes(lost, options)
    marker = storage.read_bytes(kept, options)[:-1024] + bytes(1024)  # same length, last block zeroed
    storage.write_bytes(kept, marker, options)
    storage.remove(lost, options)  # an interrupted run: this shard and its note never got written
    storage.remove(storage.join(dest, ".progress", names[1].replace(".tar", ".json")), options)
    report = convert_dataset(dask_client, f"{bucket}/raw", dest, 8, storage_options=options, shard_mb=0.0025)
    assert report["images"] == 8
    assert storage.read_bytes(kept, options) == marker, "a shard already written is not converted again"
    assert storage.read_bytes(lost, options) == original, "the missing one is written as the first run would have"
    with pytest.raises(ConfigError, match="holds shards of another conversion"):
        convert_dataset(dask_client, f"{bucket}/raw", dest, 16, storage_options=options)


@pytest.mark.slow
def test_dataset_command_line_makes_grayscale_shards_that_a_one_channel_stream_reads(tmp_path):
    from PIL import Image

    from daskgan.tools.cli import main

    source = tmp_path / "raw"
    for i in range(6):
        (source / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (i * 40, 10, 10)).save(source / f"class{i % 2}" / f"{i}.png")
    dest = tmp_path / "gray-shards"
    assert main(["dataset", str(source), str(dest), "--resolution", "8", "--channels", "1", "--shard-mb",
                 "0.002"]) == 0
    assert (dest / "dataset-manifest.json.gz").exists() and len(list(dest.glob("shard-*.tar"))) > 1
    index = training_index(DataConfig(url=str(dest)), OutputConfig(run_url=str(tmp_path / "run")))
    assert index.classes == ("class0", "class1"), "the manifest keeps the source's class names"
    assert sorted(index.labels) == [0, 0, 0, 1, 1, 1]
    stream = ImageStream(index, DataConfig(url=str(dest), resolution=8, batch_size=3, channels=1))
    batch = next(stream)
    stream.close()
    assert batch.images.shape == (3, 1, 8, 8)
