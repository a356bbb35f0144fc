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


def no_retries(monkeypatch):
    """Make any retry fail the test: a permanent failure must be raised on the first try."""
    def sleep(seconds):
        raise AssertionError(f"retried a permanent failure (would sleep {seconds:.1f}s)")

    monkeypatch.setattr(storage.time, "sleep", sleep)


@pytest.fixture(params=["file", "s3"])
def any_folder(request, tmp_path):
    """(URL of a folder holding one object, storage options) in a local folder and in the loopback S3."""
    if request.param == "file":
        url, options = tmp_path.as_uri() + "/folder", {}
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/folder"
    storage.write_bytes(f"{url}/object.bin", b"x", options)
    return url, options


def test_a_folder_or_a_missing_object_fails_at_once_in_one_line(any_folder, monkeypatch):
    from daskgan.errors import UserError, first_line

    url, options = any_folder
    no_retries(monkeypatch)
    for target in (url, f"{url}/missing.bin", f"{url}/object.bin/below"):
        with pytest.raises(UserError) as raised:
            storage.read_bytes(target, options)
        assert target in first_line(raised.value) and len(str(raised.value).splitlines()) == 1


def test_a_refused_permission_fails_at_once(tmp_path, monkeypatch, credential_checking_s3):
    """Local files are refused with a PermissionError (as root, which reads everything, one is raised by hand);
    S3 with an AccessDenied answer to wrong keys."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    from daskgan.errors import StorageAccessError

    no_retries(monkeypatch)
    local = tmp_path.as_uri() + "/secret.bin"
    storage.write_bytes(local, b"x")

    def refused(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    with monkeypatch.context() as patched:
        patched.setattr(LocalFileSystem, "cat_file", refused)
        with pytest.raises(StorageAccessError, match="access denied"):
            storage.read_bytes(local)
    server, _, good = credential_checking_s3
    wrong = {"endpoint_url": server.endpoint_url, "key": good["AWS_ACCESS_KEY_ID"], "secret": "not-the-secret"}
    with pytest.raises(StorageAccessError, match="access denied"):
        storage.read_bytes("s3://anything/object.bin", wrong)


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"),
                                   OSError(16, "Please reduce your request rate. (SlowDown)"),
                                   OSError(121, "We encountered an internal error (InternalError)")])
def test_throttling_server_errors_and_resets_are_retried(error):
    assert storage.is_transient(error)


@pytest.mark.parametrize("error", [IsADirectoryError(21, "Is a directory"), NotADirectoryError(20, "Not a directory"),
                                   FileNotFoundError(2, "No such file"), PermissionError(13, "Permission denied")])
def test_folders_missing_objects_and_refusals_are_not(error):
    assert not storage.is_transient(error)


def test_within_retry_bounds_a_storage_operation_gives_up_after_those_tries():
    """A job's ``data.retry_tries``/``retry_seconds`` bound every operation on its dataset, not only image reads: a
    dataset on storage that does not answer fails after the job's tries (the default's 8 took 23-30 s here)."""
    from daskgan.errors import StorageUnavailable
    from daskgan.tools.sandbox import free_port

    nothing_there = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s",
                     "config_kwargs": {"retries": {"max_attempts": 1}}}
    with storage.retry_bounds(tries=2, seconds=30):
        with pytest.raises(StorageUnavailable, match="after 2 tries"):
            storage.exists("s3://bucket/data/dataset-manifest.json.gz", nothing_there)
    with pytest.raises(StorageUnavailable, match="after 1 tries"):
        with storage.retry_bounds(tries=1, seconds=30):
            storage.read_bytes("s3://bucket/data/a.png", nothing_there)
