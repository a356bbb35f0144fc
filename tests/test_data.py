"""The S3-streamed dataset, against the loopback S3 server through s3fs."""

import colorsys
import io
import logging
import multiprocessing
import random
import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from daskgan.config import DataConfig
from daskgan.data import decode_pool, synthetic
from daskgan.data.decode import DECODE_ERRORS, center_crop_resize, decode_image
from daskgan.data.index import index_images, shard_indices
from daskgan.data.stream import ImageStream, StreamPosition
from daskgan.run import storage


@pytest.fixture
def shapes_dataset(s3_bucket):
    url, options = s3_bucket
    dataset = storage.join(url, "shapes")
    synthetic.write_dataset(dataset, images=40, resolution=24, storage_options=options)
    return dataset, options


def test_index_labels_class_folders(shapes_dataset):
    url, options = shapes_dataset
    index = index_images(url, options)
    assert len(index) == 40
    assert index.classes == tuple(sorted(synthetic.SHAPES))
    for path, label in zip(index.paths, index.labels):
        assert path.split("/")[-2] == index.classes[label]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_any_fsspec_url_streams(scheme, tmp_path):
    url = f"memory://shapes-{tmp_path.name}" if scheme == "memory" else tmp_path.as_uri()
    synthetic.write_dataset(url, images=8, resolution=8, shapes=("circle", "square"))
    index = index_images(url)
    assert index.classes == ("circle", "square") and len(index) == 8
    stream = ImageStream(index, DataConfig(url=url, resolution=8, batch_size=4, shuffle=False))
    batch = next(stream)
    stream.close()
    assert batch.images.shape == (4, 3, 8, 8) and batch.labels.tolist() == list(index.labels[:4])


def shape_hue(png: bytes) -> float:
    """The hue of an image's brightest pixel: the shape's colour (backgrounds are darker than every shape)."""
    pixels = list(Image.open(io.BytesIO(png)).convert("RGB").getdata())
    return colorsys.rgb_to_hsv(*(c / 255 for c in max(pixels, key=max)))[0]


def test_class_hues_give_each_class_one_hue_and_leave_the_shapes_as_they_were(tmp_path):
    """The example jobs' dataset: the class is readable from the colour alone; without ``class_hues`` (the demo's
    dataset) nothing changes."""
    url = tmp_path.as_uri()
    synthetic.write_dataset(url, images=24, resolution=16, class_hues=True)
    index = index_images(url)
    hues = {}
    for path, label in zip(index.paths, index.labels):
        hues.setdefault(index.classes[label], []).append(shape_hue(storage.read_bytes(path)))
    assert all(max(h) - min(h) < 0.02 for h in hues.values()), hues
    means = sorted(sum(h) / len(h) for h in hues.values())
    assert len(means) == 4 and min(b - a for a, b in zip(means, means[1:])) > 0.2, hues
    plain, hued = (synthetic.draw_image("triangle", 16, random.Random(3), hue) for hue in (None, 0.5))
    background = plain.getpixel((0, 0))
    assert hued.getpixel((0, 0)) == background
    assert [p == background for p in plain.getdata()] == [p == background for p in hued.getdata()], "same shape"


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        index_images("s3://no-such-bucket-xyz/data", {"endpoint_url": s3_server.endpoint_url})


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_complete(world_size):
    for epoch in range(3):
        shards = [set(shard_indices(101, r, world_size, epoch, seed=5)) for r in range(world_size)]
        assert sum(len(s) for s in shards) == 101
        assert set().union(*shards) == set(range(101))
    assert shard_indices(101, 0, 2, 0, 5) != shard_indices(101, 0, 2, 1, 5), "each epoch reshuffles"
    assert shard_indices(101, 0, 2, 1, 5) == shard_indices(101, 0, 2, 1, 5), "same seed and epoch, same order"


def test_decode_crops_center_and_scales_to_unit_range():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white centre square, black sides
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    tensor = decode_image(buffer.getvalue(), 10)
    assert tensor.shape == (3, 10, 10)
    assert torch.allclose(tensor, torch.ones_like(tensor)), "crop keeps the white centre only"
    black = center_crop_resize(torch.zeros(3, 64, 64, dtype=torch.uint8), 16)
    assert black.shape == (3, 16, 16) and black.dtype == torch.uint8 and black.max() == 0


def test_palette_and_grey_images_become_rgb():
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), 8).shape == (3, 8, 8)


def test_ranks_stream_disjoint_complete_epochs(shapes_dataset):
    url, options = shapes_dataset
    index = index_images(url, options)
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=4, fetch_batch=6)
    seen = []
    for rank in range(2):
        stream = ImageStream(index, config, rank=rank, world_size=2, seed=1)
        try:
            batches = [next(stream) for _ in range(5)]  # 20 images per rank = one epoch
        finally:
            stream.close()
        assert all(b.images.shape == (4, 3, 16, 16) for b in batches)
        assert batches[-1].position == StreamPosition(0, 20)
        seen.append(torch.cat([b.images for b in batches]))
    flattened = {tuple(x.flatten()[:64].tolist()) for x in torch.cat(seen)}
    assert len(flattened) == 40, "every image read exactly once across the two ranks"


def test_stream_resumes_at_its_position(shapes_dataset):
    url, options = shapes_dataset
    index = index_images(url, options)
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=4)
    stream = ImageStream(index, config, seed=3)
    batches = [next(stream) for _ in range(14)]  # crosses into the second epoch
    stream.close()
    resumed = ImageStream(index, config, seed=3, start=batches[8].position)
    again = [next(resumed) for _ in range(5)]
    resumed.close()
    for original, repeat in zip(batches[9:], again):
        assert torch.equal(original.images, repeat.images) and torch.equal(original.labels, repeat.labels)


def add_corrupt_objects(url: str, options: dict) -> None:
    png = synthetic.png_bytes(Image.new("RGB", (24, 24)))
    storage.write_many({
        storage.join(url, "circle", "zz-garbage.png"): b"not an image at all",
        storage.join(url, "circle", "zz-truncated.png"): png[: len(png) // 2],
        storage.join(url, "square", "zz-empty.png"): b"",
    }, options)


def test_corrupt_objects_are_skipped_counted_and_logged_once(shapes_dataset, caplog):
    url, options = shapes_dataset
    add_corrupt_objects(url, options)
    index = index_images(url, options)
    assert len(index) == 43
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=5)
    stream = ImageStream(index, config)
    with caplog.at_level(logging.WARNING, logger="daskgan.data"):
        batches = [next(stream) for _ in range(24)]  # three epochs of 8 full batches (40 good images)
    stream.close()
    assert all(len(b.images) == 5 for b in batches)
    assert stream.skipped == 3
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == 3 and any("zz-truncated" in m for m in warned)


@pytest.mark.parametrize("mirror", [False, True])
def test_decode_threads_and_processes_give_the_batches_of_one_decoding_thread(shapes_dataset, monkeypatch, mirror):
    url, options = shapes_dataset
    add_corrupt_objects(url, options)
    index = index_images(url, options)
    decoded_where = []  # threads of this process that decoded; decoding processes leave nothing here
    real_decode = decode_pool.decode_array

    def decode_noting_thread(*args, **kwargs):
        decoded_where.append(threading.current_thread().name)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(decode_pool, "decode_array", decode_noting_thread)
    runs, children, others = {}, {}, set(multiprocessing.active_children())  # e.g. the session's Dask workers
    for plan in ({"decode_threads": 1}, {"decode_threads": 3}, {"decode_processes": 2}):
        decoded_where.clear()
        config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=5, fetch_batch=43,
                            mirror=mirror, **plan)  # 43 entries: decode tasks of 16, 16 and 11 in a pool of threads
        stream = ImageStream(index, config, seed=2)
        batches = [next(stream) for _ in range(16 if not mirror else 30)]  # two epochs
        children[str(plan)] = len(set(multiprocessing.active_children()) - others)
        stream.close()
        runs[str(plan)] = (batches, stream.skipped, list(decoded_where))
    (single, skipped_single, _), (threads, skipped_threads, in_threads), (processes, skipped_processes, in_parent) = (
        runs.values())
    assert skipped_single == skipped_threads == skipped_processes == 3
    for one, *others in zip(single, threads, processes):
        for other in others:
            assert torch.equal(one.images, other.images) and torch.equal(one.labels, other.labels)
            assert one.position == other.position
    assert any(name.startswith("daskgan-decode-rank0") for name in in_threads), "the thread pool decoded"
    assert in_parent == [] and children[str({"decode_processes": 2})] >= 1, "processes decoded, not this one"


def test_a_killed_decoding_process_stops_the_stream_with_one_clear_error(shapes_dataset):
    url, options = shapes_dataset
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=4, fetch_batch=4,
                        prefetch_batches=1, decode_processes=1)
    others = set(multiprocessing.active_children())  # e.g. the session's Dask workers
    stream = ImageStream(index_images(url, options), config)
    next(stream)
    decoding = set(multiprocessing.active_children()) - others
    assert decoding, "a decoding process"
    for child in decoding:
        child.kill()  # as the kernel's OOM killer would
    with pytest.raises(decode_pool.DecoderDied, match="data.decode_processes: 0"):
        for _ in range(20):  # the batches already queued, then the error
            next(stream)
    stream.close()


def test_the_decode_plan_shares_the_hosts_cores_and_decodes_in_processes_for_a_gpu(monkeypatch, caplog):
    monkeypatch.setattr(decode_pool.os, "sched_getaffinity", lambda _: set(range(12)), raising=False)
    for ranks_on_host, share in (("1", 8), ("2", 6), ("5", 2), ("24", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_on_host)
        assert decode_pool.rank_share_of_cores() == share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    image, ample = 3 * 64 * 64, 2**30

    def plan(processes, threads, on_gpu, shm=ample, image_bytes=image):
        return decode_pool.decode_plan(processes, threads, on_gpu, image_bytes, shared_memory_free=shm)[:2]

    assert plan(None, None, on_gpu=True) == ("processes", 3)
    assert plan(None, None, on_gpu=False) == ("threads", 3)
    assert plan(0, None, on_gpu=True) == ("threads", 3), "0 processes: threads"
    assert plan(None, 1, on_gpu=False) == ("inline", 1)
    assert plan(5, 2, on_gpu=False) == ("processes", 5)
    assert decode_pool.decode_plan(2, None, False, image, ample).part == 64, "64 px: 64 images a task"
    big = 3 * 256 * 256
    assert decode_pool.decode_plan(2, None, False, big, ample).part * big <= decode_pool.PROCESS_PART_BYTES
    # a container's 64 MB /dev/shm: blocks for 4 processes of 1024 px images fit in half of it, 16 processes' not
    assert plan(4, None, False, shm=64 * 2**20, image_bytes=3 * 1024 ** 2) == ("processes", 4)
    assert plan(16, None, False, shm=64 * 2**20, image_bytes=3 * 1024 ** 2) == ("threads", 3)
    assert "/dev/shm has 64 MiB free" in caplog.text
    monkeypatch.setattr(decode_pool.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    assert plan(None, 2, on_gpu=True) == ("threads", 2), "a daemonic worker cannot have children"
    assert "distributed.worker.daemon" in caplog.text


def test_local_cache_serves_second_read(shapes_dataset, tmp_path):
    url, options = shapes_dataset
    index = index_images(url, options)
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=8, cache_dir=str(tmp_path))
    first = ImageStream(index, config)
    a = next(first).images
    first.close()
    cached_files = list(tmp_path.rglob("*.png"))
    assert len(cached_files) >= 8
    storage.remove(url, options)  # the bucket copy is gone; the cache still has the first batch
    second = ImageStream(index, config)
    assert torch.equal(next(second).images, a)
    second.close()


def test_examples_follow_the_grid_rows_class_by_class():
    from daskgan.data.index import ImageIndex, examples

    index = ImageIndex("memory://d", ("a0", "b0", "a1", "b1", "a2"), (0, 1, 0, 1, 0), ("a", "b"))
    assert examples(index, [0, 0, 1, 1, 0, 1], 6) == ["a0", "a1", "b0", "b1", "a2", "b0"]
    assert examples(index, None, 3) == ["a0", "b0", "a1"]


def cache_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_local_cache_stays_under_its_bound(shapes_dataset, tmp_path, caplog):
    url, options = shapes_dataset
    index = index_images(url, options)
    bound = sum(index.sizes) // 3
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=8, cache_dir=str(tmp_path),
                        cache_max_gb=bound / 1e9)
    stream = ImageStream(index, config)
    with caplog.at_level("INFO", logger="daskgan.data.cache"):
        batches = [next(stream) for _ in range(3 * len(index) // 8)]  # three epochs
    stream.close()
    assert len(batches) == 3 * len(index) // 8 and stream.skipped == 0
    assert 0 < cache_bytes(tmp_path) <= bound
    assert any("evicted" in r.getMessage() for r in caplog.records)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(shapes_dataset, tmp_path, caplog):
    url, options = shapes_dataset
    index = index_images(url, options)
    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")  # every cache write fails with a real OSError, even for root
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=8, cache_dir=str(blocked))
    stream = ImageStream(index, config)
    batches = [next(stream) for _ in range(2 * len(index) // 8)]
    stream.close()
    assert len(batches) == 2 * len(index) // 8 and stream.skipped == 0
    warnings = [r.getMessage() for r in caplog.records if "caching is off" in r.getMessage()]
    assert len(warnings) == 1 and str(blocked) in warnings[0]


def test_mirror_adds_an_x_flipped_copy_of_every_image(shapes_dataset):
    url, options = shapes_dataset
    index = index_images(url, options)
    n = len(index)
    config = DataConfig(url=url, storage_options=options, resolution=16, batch_size=n // 2, shuffle=False, mirror=True)
    stream = ImageStream(index, config)
    originals, _, flipped, _ = [next(stream) for _ in range(4)]
    stream.close()
    assert torch.equal(flipped.images, originals.images.flip(-1)), "entries n.. are the x-flipped images"
    assert torch.equal(flipped.labels, originals.labels)
    assert (originals.position.epoch, flipped.position.epoch) == (0, 0), "an epoch holds both copies"


def test_images_decode_to_one_channel_for_a_grayscale_dataset():
    import io

    from PIL import Image

    from daskgan.data.decode import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (200, 100, 50)).save(buffer, format="PNG")
    gray = decode_image(buffer.getvalue(), 8, channels=1)
    luma = round(200 * 299 / 1000 + 100 * 587 / 1000 + 50 * 114 / 1000)  # PIL's ITU-R 601-2 conversion
    assert gray.shape == (1, 8, 8) and torch.allclose(gray, torch.full((1, 8, 8), luma / 127.5 - 1), atol=1e-6)
    assert decode_image(buffer.getvalue(), 8).shape == (3, 8, 8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_sixteen_bit_grayscale_keeps_its_tones_in_training_and_conversion(fmt):
    """16-bit scans (medical, astronomy: the usual 1-channel datasets) keep their high byte, as Pillow reads 16-bit
    RGB; Pillow's own conversion of a 16-bit grayscale image clips every value above 255, turning it white."""
    import numpy as np

    from daskgan.data.convert import convert_image
    from daskgan.data.decode import decode_uint8

    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    # a 16-bit PGM written by hand: Pillow 10.2 and older cannot write one, and daskgan reads it with Pillow >= 10.1
    data = b"P5 16 16 65535\n" + ramp.astype(">u2").tobytes() if fmt == "PPM" else encoded(Image.fromarray(ramp), fmt)
    high_byte = torch.from_numpy((ramp >> 8).astype(np.uint8))
    for channels in (1, 3):
        assert torch.equal(decode_uint8(data, 16, channels), high_byte.expand(channels, 16, 16))
        converted = Image.open(io.BytesIO(convert_image(data, 16, channels, "center")))
        assert torch.equal(torch.from_numpy(np.array(converted.convert("L"))), high_byte)


def encoded(image, fmt: str = "PNG", **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def odd_images() -> dict[str, bytes]:
    """What the fast decoders see: every PNG and JPEG kind Pillow reads, and bytes that are not an image."""
    import random

    from PIL import Image

    from daskgan.data import synthetic

    rgb = synthetic.draw_image("ring", 24, random.Random(1))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(90)
    return {"rgb.png": encoded(rgb), "gray.png": encoded(rgb.convert("L")), "palette.png": encoded(rgb.convert("P")),
            "rgba.png": encoded(rgba), "la.png": encoded(rgb.convert("LA")),
            "16bit.png": encoded(Image.new("I;16", (6, 5), 300)), "rgb.jpg": encoded(rgb, "JPEG", quality=90),
            "gray.jpg": encoded(rgb.convert("L"), "JPEG"), "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
            "progressive.jpg": encoded(rgb, "JPEG", progressive=True), "truncated.png": encoded(rgb)[:60]}


@pytest.mark.parametrize("channels", [3, 1])
def test_fast_decoders_give_pillows_pixels_or_leave_the_image_to_pillow(monkeypatch, channels):
    import numpy as np

    from daskgan.data import decode

    assert decode.pyspng is not None and decode.simplejpeg is not None, "the test extra installs both"
    taken = {name for name, data in odd_images().items() if decode.fast_pixels(data, channels) is not None}
    assert taken == ({"rgb.png", "gray.png", "palette.png", "rgba.png", "rgb.jpg", "gray.jpg", "progressive.jpg"}
                     if channels == 3 else {"gray.png"}), "the fast path serves these, Pillow the rest"
    fast = {}
    for name, data in odd_images().items():
        try:
            fast[name] = decode.decode_pixels(data, channels)
        except DECODE_ERRORS as error:
            fast[name] = type(error)
    monkeypatch.setattr(decode, "pyspng", None)
    monkeypatch.setattr(decode, "simplejpeg", None)
    for name, data in odd_images().items():
        try:
            pillow = decode.decode_pixels(data, channels)
        except DECODE_ERRORS as error:
            assert fast[name] is type(error), f"{name}: the same error as Pillow's"
            continue
        assert isinstance(fast[name], np.ndarray) and fast[name].dtype == np.uint8, name
        assert np.array_equal(fast[name], pillow), f"{name}: pixels differ from Pillow's"
