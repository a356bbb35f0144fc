import pytest

from daskgan.run import storage


def test_join_refuses_escaping_the_prefix():
    assert storage.join("s3://b/runs/", "x", "y.pt") == "s3://b/runs/x/y.pt"
    for bad in ("../other", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            storage.join("s3://b/runs", bad)


def test_roundtrip_and_listing_on_s3(s3_bucket):
    url, options = s3_bucket
    storage.write_many({storage.join(url, "d", n): n.encode() for n in ("b.txt", "a.txt")}, options)
    storage.write_json(storage.join(url, "d", "p.json"), {"k": 1}, options)
    assert storage.list_names(storage.join(url, "d"), options) == ["a.txt", "b.txt", "p.json"]
    assert storage.read_json(storage.join(url, "d", "p.json"), options) == {"k": 1}
    assert storage.list_names(storage.join(url, "nothing"), options) == []


def test_local_write_creates_folders(tmp_path):
    target = storage.join(tmp_path.as_uri(), "a", "b", "c.bin")
    storage.write_bytes(target, b"xyz")
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"xyz"


def test_references_resolve_from_this_process_environment(monkeypatch):
    monkeypatch.setenv("DASKGAN_TEST_SECRET", "value-1")
    options = {"secret": "${DASKGAN_TEST_SECRET}", "client_kwargs": {"token": "${DASKGAN_TEST_SECRET}"}, "anon": False}
    assert storage.resolve_references(options) == {"secret": "value-1", "client_kwargs": {"token": "value-1"},
                                                   "anon": False}
    monkeypatch.delenv("DASKGAN_TEST_SECRET")
    with pytest.raises(PermissionError, match="DASKGAN_TEST_SECRET"):
        storage.resolve_references(options)


def test_tampered_checkpoint_pointer_cannot_escape_the_run(tmp_path):
    from daskgan.run import checkpoint

    run_url = tmp_path.as_uri() + "/run"
    storage.write_json(f"{run_url}/checkpoints/latest.json", {"iteration": 1, "name": "../../elsewhere.pt"})
    with pytest.raises(ValueError, match="invalid path component"):
        checkpoint.latest(run_url)


def test_objects_written_by_another_process_are_seen_at_once(s3_bucket):
    """Checkpoints are written by workers and read by the client and restarted workers: no stale listings."""
    import s3fs

    url, options = s3_bucket
    storage.write_bytes(f"{url}/ckpt/a.pt", b"a", options)
    assert storage.list_names(f"{url}/ckpt", options) == ["a.pt"]
    assert not storage.exists(f"{url}/ckpt/b.pt", options)
    other_process = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    other_process.pipe_file(f"{url.removeprefix('s3://')}/ckpt/b.pt", b"b")
    assert storage.exists(f"{url}/ckpt/b.pt", options)
    assert storage.read_bytes(f"{url}/ckpt/b.pt", options) == b"b"
    assert storage.list_names(f"{url}/ckpt", options) == ["a.pt", "b.pt"]


def test_many_objects_are_read_whole_from_any_filesystem(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    for url, opts in ((tmp_path.as_uri(), {}), (bucket, options), ("memory://cat-objects", {})):
        storage.write_many({f"{url}/a": b"1", f"{url}/b": b"22"}, opts)
        fs, root = storage.filesystem(url, opts)
        root = root.rstrip("/")
        fetched = storage.cat_objects(fs, [f"{root}/a", f"{root}/b", f"{root}/missing"])
        assert fetched[f"{root}/a"] == b"1" and fetched[f"{root}/b"] == b"22"
        assert isinstance(fetched[f"{root}/missing"], FileNotFoundError)


def test_a_local_write_cut_short_leaves_the_previous_contents(tmp_path, monkeypatch):
    """A kill (or a full disk) in the middle of a write: readers keep the old object whole, no half-written one."""
    from fsspec.implementations.local import LocalFileOpener

    url = tmp_path.as_uri() + "/run/checkpoints/latest.json"
    storage.write_json(url, {"iteration": 10, "name": "000000010.pt"})
    real_write = LocalFileOpener.write

    def killed_half_way(self, data):
        real_write(self, data[:len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalFileOpener, "write", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        storage.write_json(url, {"iteration": 20, "name": "000000020.pt"})
    monkeypatch.undo()
    assert storage.read_json(url) == {"iteration": 10, "name": "000000010.pt"}
    assert storage.list_names(tmp_path.as_uri() + "/run/checkpoints") == ["latest.json"], "no temporary left"
