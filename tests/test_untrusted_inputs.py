"""Datasets scraped from the web or handed over by a third party (issue #23, items 2, 3 and 13): a crafted image,
a file in another format under an image's name, a zip or gzip bomb, a manifest pointing elsewhere, a crafted
dataset.json or label and an object too large for an image cost the bad input (skipped and counted) or one clear
error, never the run, a program started or unbounded memory."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import tracemalloc
import zipfile
import zlib

import pytest
from hostile_inputs import eps_named_png, overflow_tiff, path_with, png, stub_gs, zeros_deflated, zip_archive, zip_bomb
from PIL import EpsImagePlugin, Image

from daskgan.config import DataConfig, OutputConfig
from daskgan.data.convert import convert_image
from daskgan.data.decode import UnreadableImage, decode_image
from daskgan.data.folder import S3ImageFolder
from daskgan.data.index import index_images
from daskgan.data.manifest import dataset_base, manifest_bytes, training_index
from daskgan.data.stream import ImageStream
from daskgan.errors import ConfigError, NotFound
from daskgan.run import layout, storage

MiB = 2**20
DECODINGS = [{"decode_threads": 1}, {"decode_threads": 2}, {"decode_processes": 1}]  # inline, threads, processes


@pytest.fixture
def gs_on_path(tmp_path, monkeypatch):
    """A stub ``gs`` first on PATH (decoding processes inherit it) and Pillow's memory of Ghostscript cleared;
    yields the note it writes when run."""
    folder, note = stub_gs(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(folder))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return note


def stream_all(url: str, images: int, **data) -> ImageStream:
    """A stream over one epoch of ``url``, read to its end (batches of 1, nothing dropped)."""
    config = DataConfig(url=url, resolution=8, batch_size=1, shuffle=False, **data)
    stream = ImageStream(index_images(url), config, epochs=1, drop_last=False)
    try:
        assert sum(len(batch.images) for batch in stream) == images
    finally:
        stream.close()
    return stream


def test_a_crafted_tiff_is_an_unreadable_image_not_an_escaped_error(tmp_path):
    tiff = overflow_tiff()
    with pytest.raises(OverflowError):  # the reproduction, on the installed Pillow
        Image.open(io.BytesIO(tiff)).load()
    for decode in (lambda: decode_image(tiff, 8), lambda: convert_image(tiff, 8, 3, "center")):
        with pytest.raises(UnreadableImage, match="OverflowError"):
            decode()


@pytest.mark.parametrize("decoding", DECODINGS, ids=["inline", "threads", "processes"])
def test_a_stream_skips_and_counts_a_crafted_tiff_and_an_eps_named_png(tmp_path, gs_on_path, decoding):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        (folder / f"good{i}.png").write_bytes(png(i * 60))
    (folder / "fuzzed.tif").write_bytes(overflow_tiff())
    (folder / "x.png").write_bytes(eps_named_png())
    stream = stream_all(folder.as_uri(), 4, **decoding)
    assert stream.skipped == 2 and not gs_on_path.exists(), "both skipped, Ghostscript never started"


def test_an_eps_named_png_starts_no_program_anywhere_images_are_decoded(s3_bucket, gs_on_path):
    eps = eps_named_png()
    with pytest.raises(UnreadableImage):
        decode_image(eps, 8)
    with pytest.raises(UnreadableImage):
        convert_image(eps, 8, 3, "center")
    bucket, options = s3_bucket
    storage.write_bytes(f"{bucket}/data/a/x.png", eps, options)
    with pytest.raises(UnreadableImage, match="x.png"):
        S3ImageFolder(bucket.removeprefix("s3://"), "data", storage_options=options)[0]
    assert not gs_on_path.exists()


def test_dataset_conversion_skips_a_crafted_tiff_and_an_eps_named_png_with_their_reasons(tmp_path, gs_on_path):
    from daskgan.data.convert import convert_chunk

    url = f"memory://convert-{tmp_path.name}"
    storage.write_many({f"{url}/good.png": png(9), f"{url}/fuzzed.tif": overflow_tiff(),
                        f"{url}/x.png": eps_named_png()}, {})
    index = index_images(url)
    converted = {index.paths[n].rsplit("/", 1)[1]: (png_bytes is not None, reason)
                 for n, png_bytes, reason in convert_chunk(index, [0, 1, 2], {}, 8, 3, "center")}
    assert converted["good.png"] == (True, None)
    assert not converted["fuzzed.tif"][0] and "OverflowError" in converted["fuzzed.tif"][1]
    assert not converted["x.png"][0] and "cannot identify image" in converted["x.png"][1]
    assert not gs_on_path.exists()


def test_a_zip_bomb_member_is_skipped_and_counted_within_bounded_memory(tmp_path):
    """~300 KB members inflating to 300 MiB: one declaring its size (over the cap: not even fetched), one
    declaring 1 KB (inflated no further). Before, each read grew the process by the whole 300 MiB."""
    honest, lying = (tmp_path / "honest.zip", tmp_path / "lying.zip")
    honest.write_bytes(zip_bomb())
    lying.write_bytes(zip_bomb(declared=1024))
    assert honest.stat().st_size < 400_000
    tracemalloc.start()
    try:
        streams = [stream_all(archive.as_uri(), 6) for archive in (honest, lying)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [stream.skipped for stream in streams] == [1, 1]
    assert peak < 32 * MiB, f"reading the bombs peaked at {peak / MiB:.0f} MiB"


def gzip_bomb(mib: int) -> bytes:
    """A gzip of ``mib`` MiB of zeros."""
    packer = gzip.GzipFile(fileobj=(out := io.BytesIO()), mode="wb", compresslevel=1)
    for _ in range(mib):
        packer.write(bytes(MiB))
    packer.close()
    return out.getvalue()


def test_a_gzip_bomb_manifest_is_refused_within_bounded_memory(tmp_path, monkeypatch):
    from daskgan.data import manifest

    monkeypatch.setattr(manifest, "MAX_DOCUMENT_BYTES", 4 * MiB)  # the same bound as 512 MiB, at a test's size
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(png(1))
    data = DataConfig(url=(tmp_path / "data").as_uri(), manifest=(tmp_path / "m.json.gz").as_uri())
    (tmp_path / "m.json.gz").write_bytes(gzip_bomb(64))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="is not a daskgan dataset manifest .*TooLarge"):
            training_index(data, OutputConfig(run_url=(tmp_path / "run").as_uri()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"reading the bomb peaked at {peak / MiB:.0f} MiB"


def test_a_manifest_nested_too_deeply_is_one_clear_error(tmp_path):
    """json's RecursionError escaped as a traceback on every rank."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(png(1))
    (tmp_path / "m.json.gz").write_bytes(gzip.compress(b"[" * 100_000))
    data = DataConfig(url=(tmp_path / "data").as_uri(), manifest=(tmp_path / "m.json.gz").as_uri())
    with pytest.raises(ConfigError, match="is not a daskgan dataset manifest .RecursionError"):
        training_index(data, OutputConfig(run_url=(tmp_path / "run").as_uri()))


def test_a_dataset_json_over_the_limit_is_one_clear_error(tmp_path, monkeypatch):
    from daskgan.data import archive

    monkeypatch.setattr(archive, "MAX_DOCUMENT_BYTES", 4 * MiB)
    labels = json.dumps({"labels": None}).encode() + b" " * (5 * MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed = deflate.compress(labels) + deflate.flush()
    (tmp_path / "big.zip").write_bytes(zip_archive([
        ("00000/img00000000.png", png(1), 0, zlib.crc32(png(1)), len(png(1))),
        ("dataset.json", compressed, 8, zlib.crc32(labels), len(labels))]))
    with pytest.raises(NotFound, match="dataset.json declares .* over the limit"):
        index_images((tmp_path / "big.zip").as_uri())


def archive_with_dataset_json(data: bytes, method: int, crc: int, declared: int) -> bytes:
    """A one-image NVlabs-style zip whose ``dataset.json`` is ``data`` as stored, declaring ``declared`` bytes."""
    return zip_archive([("00000/img00000000.png", png(1), 0, zlib.crc32(png(1)), len(png(1))),
                        ("dataset.json", data, method, crc, declared)])


def test_a_dataset_json_bomb_declaring_a_small_size_is_refused_within_bounded_memory(tmp_path):
    """64 MiB of deflate declaring 1 KB: zipfile's reader inflated it all (peak ~2.2x the bomb) before its CRC
    check failed."""
    bomb, crc = zeros_deflated(64)
    (tmp_path / "bomb.zip").write_bytes(archive_with_dataset_json(bomb, zipfile.ZIP_DEFLATED, crc, 1024))
    tracemalloc.start()
    try:
        with pytest.raises(NotFound, match="dataset.json is unreadable .*does not inflate to its 1024 bytes"):
            index_images((tmp_path / "bomb.zip").as_uri())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"reading the bomb peaked at {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("document, method, error", [
    (b"[]", zipfile.ZIP_STORED, "holds a list, not NVlabs' object"),
    (b"[" * 100_000, zipfile.ZIP_STORED, "is not JSON .RecursionError"),
    (bz2.compress(b'{"labels": null}'), zipfile.ZIP_BZIP2, "uses zip compression method 12"),
], ids=["not-an-object", "nested-too-deep", "bzip2"])
def test_a_crafted_dataset_json_is_one_clear_error(tmp_path, document, method, error):
    """Each escaped as AttributeError or RecursionError, or (bzip2, inflated by zipfile as far as its first
    4 KB of input go: 1.4 KB declaring 100 bytes grew the process by 1.9 GB) was read."""
    plain = bz2.decompress(document) if method == zipfile.ZIP_BZIP2 else document
    (tmp_path / "x.zip").write_bytes(archive_with_dataset_json(document, method, zlib.crc32(plain), len(plain)))
    with pytest.raises(NotFound, match=error):
        index_images((tmp_path / "x.zip").as_uri())


def folder_dataset(url: str, count: int = 4) -> None:
    storage.write_many({storage.join(url, "a" if i % 2 else "b", f"{i}.png"): png(i * 50) for i in range(count)}, {})


def test_a_copied_dataset_reads_its_new_location_through_the_manifest_it_carries(tmp_path):
    first, copy = (tmp_path / "first").as_uri(), (tmp_path / "copy").as_uri()
    folder_dataset(first)
    storage.write_bytes(storage.join(first, layout.MANIFEST), manifest_bytes(index_images(first), dataset_base(first)))
    fs, _ = storage.filesystem(first)
    fs.copy(str(tmp_path / "first"), str(tmp_path / "copy"), recursive=True)
    fs.rm(str(tmp_path / "first"), recursive=True)
    index = training_index(DataConfig(url=copy), OutputConfig(run_url=(tmp_path / "run").as_uri()))
    assert len(index) == 4 and all(path.startswith(str(tmp_path / "copy") + "/") for path in index.paths)
    assert stream_all(copy, 4).skipped == 0


def v1_manifest(dataset: str, root: str, keys: list[str]) -> bytes:
    """A manifest as daskgan wrote them before, keys under an absolute ``root``."""
    return gzip.compress(json.dumps({"format": "daskgan-manifest/1", "dataset": dataset, "root": root,
                                     "archive": None, "shards": [], "classes": [],
                                     "images": [[key, 1, 0] for key in keys]}).encode())


def v2_manifest(dataset: str, keys: list[str]) -> bytes:
    return gzip.compress(json.dumps({"format": "daskgan-manifest/2", "dataset": dataset, "archive": False,
                                     "shards": [], "classes": [], "images": [[key, 1, 0] for key in keys]}).encode())


@pytest.mark.parametrize("crafted", [
    lambda url, elsewhere: v1_manifest(url, elsewhere, ["secret.png"]),
    lambda url, elsewhere: v2_manifest(url, ["../elsewhere/secret.png"]),
    lambda url, elsewhere: v2_manifest(url, [f"{elsewhere}/secret.png"]),
], ids=["old-absolute-root", "dot-dot", "absolute-key"])
def test_a_third_partys_manifest_cannot_point_reads_outside_the_dataset(tmp_path, crafted):
    url, elsewhere = (tmp_path / "data").as_uri(), str(tmp_path / "elsewhere")
    folder_dataset(url)
    shared = (tmp_path / "shared.json.gz").as_uri()
    storage.write_bytes(shared, crafted(url, elsewhere))
    with pytest.raises(ConfigError, match="outside the dataset|not inside the dataset"):
        training_index(DataConfig(url=url, manifest=shared), OutputConfig(run_url=(tmp_path / "run").as_uri()))


def test_an_old_manifest_of_the_datasets_own_location_is_still_read(tmp_path):
    url = (tmp_path / "data").as_uri()
    folder_dataset(url)
    listed = index_images(url)
    root = str(tmp_path / "data")
    keys = [path[len(root) + 1:] for path in listed.paths]
    storage.write_bytes(storage.join(url, layout.MANIFEST), v1_manifest(url, root, keys))
    index = training_index(DataConfig(url=url), OutputConfig(run_url=(tmp_path / "run").as_uri()))
    assert index.paths == listed.paths




def worker_path(path: str) -> None:
    """On a worker: ``PATH`` as given, and Pillow's memory of Ghostscript cleared."""
    os.environ["PATH"] = path
    EpsImagePlugin.gs_binary = None


def hostile_dataset(bucket: str, options: dict, kind: str) -> str:
    """12 good PNGs with a crafted TIFF and an EPS named .png, as a folder (two classes) or an NVlabs zip that
    also holds a 300 MiB bomb member."""
    if kind == "zip":
        bad = {"00000/img00000013.tif": overflow_tiff(), "00000/img00000014.png": eps_named_png()}
        storage.write_bytes(f"{bucket}/data.zip", zip_bomb(good=12, extra=bad), options)
        return f"{bucket}/data.zip"
    images = {f"{'ab'[i % 2]}/{i:02d}.png": png(i * 20) for i in range(12)}
    images.update({"a/fuzzed.tif": overflow_tiff(), "b/x.png": eps_named_png()})
    storage.write_many({f"{bucket}/data/{name}": data for name, data in images.items()}, options)
    return f"{bucket}/data"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_hostile_dataset_trains_to_the_end_skipping_and_counting_each_bad_input(dask_client, s3_bucket,
                                                                                  tmp_path, kind):
    from daskgan import dispatch, train_gan
    from daskgan.config import JobConfig
    from daskgan.run.records import load

    bucket, options = s3_bucket
    url = hostile_dataset(bucket, options, kind)
    folder, note = stub_gs(tmp_path / "bin")
    saved = dask_client.run(os.environ.get, "PATH")
    dask_client.run(worker_path, path_with(folder))
    config = JobConfig.from_dict({
        "name": "hostile", "data": {"url": url, "storage_options": options, "resolution": 8, "batch_size": 2},
        "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 8},
        "output": {"run_url": f"{bucket}/run", "storage_options": options, "flush_every": 2, "grid_every": 8,
                   "grid_images": 4, "checkpoint_every": 8}})
    try:
        summary = dispatch.results(dispatch.run(dask_client, train_gan, config, timeout=120))[0]
    finally:
        for worker, path in saved.items():
            dask_client.run(worker_path, path, workers=[worker])
    table = load(config.output.run_url, options)
    bad = 3 if kind == "zip" else 2
    assert table["iteration"].tolist() == list(range(1, 9)), "trained to the end"
    assert summary["skipped_images"] == table["skipped_images"].iloc[-1] == bad, "every bad input counted once"
    assert not note.exists(), "no program started"


def folder_with_dataset_json(folder, document: bytes) -> str:
    """A one-image folder dataset (``a.png``) beside NVlabs' ``dataset.json`` holding ``document``."""
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    (folder / "dataset.json").write_bytes(document)
    return folder.as_uri()


@pytest.mark.parametrize("document, error", [
    (b"[]", "holds a list, not NVlabs' object"),
    (b"[" * 100_000, "is not JSON .RecursionError"),
    (b'{"labels": "\xff"}', "is not JSON .UnicodeDecodeError"),
    (b'{"labels": 5}', "labels are not NVlabs' list"),
    (b'{"labels": [["a.png"]]}', "labels are not NVlabs' list"),
    (b'{"labels": [["a.png", Infinity]]}', "the label of a.png is inf; labels must be class numbers"),
    (b'{"labels": [["a.png", NaN]]}', "the label of a.png is nan; labels must be class numbers"),
], ids=["not-an-object", "nested-too-deep", "not-utf8", "labels-not-a-list", "pair-of-one", "infinity", "nan"])
def test_a_crafted_folder_dataset_json_is_the_zips_one_clear_error(tmp_path, document, error):
    """A folder's dataset.json was parsed unguarded: AttributeError, RecursionError, TypeError, ValueError, and
    for ``Infinity`` an OverflowError (``int(inf)``)."""
    with pytest.raises(NotFound, match=error):
        index_images(folder_with_dataset_json(tmp_path / "data", document))


def test_a_folder_dataset_json_over_the_limit_is_refused_unread(tmp_path, monkeypatch):
    """It was read whole, whatever its size: now refused by its listed size, and read no further than the limit
    when the object grew after it was listed."""
    from daskgan.data import archive

    monkeypatch.setattr(archive, "MAX_DOCUMENT_BYTES", 1 * MiB)
    url = folder_with_dataset_json(tmp_path / "data", json.dumps({"labels": None}).encode() + b" " * (2 * MiB))
    with pytest.raises(NotFound, match=f"dataset.json declares {2 * MiB + 16} bytes, over the limit of {MiB}"):
        index_images(url)
    fs, path = storage.filesystem(storage.join(url, "dataset.json"))
    with pytest.raises(NotFound, match=f"dataset.json declares {MiB + 1} bytes, over the limit of {MiB}"):
        archive.folder_dataset_json(fs, path, 16, url)


def shards_labelled(folder, label: int) -> str:
    """A folder holding one tar shard of two samples, the second labelled ``label`` by its ``.cls``."""
    from daskgan.data.shard_write import tar_shard

    folder.mkdir()
    (folder / "data-000000.tar").write_bytes(tar_shard([("s0", {"png": png(1), "cls": b"0"}),
                                                        ("s1", {"png": png(2), "cls": str(label).encode()})]))
    return folder.as_uri()


@pytest.mark.parametrize("label", [100_000, 10**12])
@pytest.mark.parametrize("kind", ["dataset.json", "shard"])
def test_a_label_past_the_class_limit_is_one_clear_error_naming_it(tmp_path, kind, label):
    """``range(max(labels) + 1)`` made a class name per number up to the largest label: 10**12 names."""
    if kind == "shard":
        url, image = shards_labelled(tmp_path / "data", label), "data-000000.tar/s1.png"
    else:
        document = json.dumps({"labels": [["a.png", label]]}).encode()
        url, image = folder_with_dataset_json(tmp_path / "data", document), "a.png"
    with pytest.raises(NotFound, match=f"the label of .*{image} is {label}: more than 100000 classes are not taken"):
        index_images(url)


def test_ppm_and_pgm_images_are_indexed_and_read(tmp_path):
    """Decoding took PPM and PGM but the index listed neither (``no images`` for a folder of them)."""
    for folder, name, mode in [("a", "x.ppm", "RGB"), ("b", "y.pgm", "L")]:
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.new(mode, (12, 12), 90).save(tmp_path / "data" / folder / name, format="PPM")
    url = (tmp_path / "data").as_uri()
    assert index_images(url).classes == ("a", "b")
    assert stream_all(url, 2).skipped == 0


def test_an_object_over_the_member_cap_is_skipped_and_counted_unfetched(tmp_path, monkeypatch):
    """An object was fetched whole whatever its listed size; zip members over the cap were already skipped."""
    from daskgan.data import archive

    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 1 * MiB)
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"{i}.png").write_bytes(png(i * 60))
    Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3)).save(tmp_path / "data" / "large.png")
    assert (tmp_path / "data" / "large.png").stat().st_size > MiB
    fetched: list[str] = []
    cat_objects = storage.cat_objects
    monkeypatch.setattr(storage, "cat_objects", lambda fs, paths: fetched.extend(paths) or cat_objects(fs, paths))
    stream = stream_all((tmp_path / "data").as_uri(), 3)
    assert stream.skipped == 1
    assert sorted(os.path.basename(path) for path in fetched) == ["0.png", "1.png", "2.png"], "never fetched"
