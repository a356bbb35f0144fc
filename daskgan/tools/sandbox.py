"""Self-contained infrastructure for the demo and the tests: an S3 server on loopback (on a ``free_port``), a
generated dataset, and a local copy of the results that outlives the server.

The S3 server is moto in server mode, run as its own process (a real HTTP endpoint reached through s3fs with
``endpoint_url``; as a separate process it serves about 3x faster than moto's in-process threaded server).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from daskgan.errors import ConfigError
from daskgan.run import storage

logger = logging.getLogger(__name__)

COPY_MARKER = ".daskgan-copy.json"  # in a copy of the results: the files daskgan wrote there, the only ones it removes
# moto accepts any credentials; these are placeholders, not secrets.
SANDBOX_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "daskgan-sandbox",
    "AWS_SECRET_ACCESS_KEY": "daskgan-sandbox-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port free on the loopback interface right now, for a server started there (S3, a Dask scheduler, a
    rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackS3:
    """A moto S3 server process on 127.0.0.1; ``endpoint_url`` is what s3fs and boto3 need to reach it."""

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0,
                 server_environment: dict[str, str] | None = None):
        """``server_environment``: extra variables for the moto process (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT``,
        after which moto checks credentials as S3 would)."""
        self.port = port or free_port()
        self._server_environment = server_environment or {}
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None

    def start(self) -> "LoopbackS3":
        command = [_moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         env={**os.environ, **self._server_environment})
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self._process.returncode} on start")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).close()
                logger.info("loopback S3 server listening at %s", self.endpoint_url)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer at {self.endpoint_url} within {self._startup_timeout:.0f}s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None

    def environment(self) -> dict[str, str]:
        """Variables that point boto3, s3fs and TensorBoard's S3 layer at this server."""
        return {**SANDBOX_CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint_url, "S3_ENDPOINT": self.endpoint_url}

    def __enter__(self) -> "LoopbackS3":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (worker processes started inside inherit them)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _moto_server_command() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "moto_server")
    found = beside_python if os.path.exists(beside_python) else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: install the demo extra (pip install '<daskgan checkout>[demo]')")
    return found



def prepare(job, endpoint_url: str | None) -> "JobConfig":  # noqa: F821
    """Point the job at the loopback S3 server (if any), create its buckets and upload the synthetic dataset.

    Returns a copy of the job with ``endpoint_url`` filled into both storage options.
    """
    import copy

    from daskgan.data import synthetic
    from daskgan.data.index import index_images

    job = copy.deepcopy(job)
    if endpoint_url:
        for options in (job.data.storage_options, job.output.storage_options):
            options["endpoint_url"] = endpoint_url
        for url, options in ((job.data.url, job.data.storage_options),
                             (job.output.run_url, job.output.storage_options)):
            _ensure_bucket(url, options)
    dataset = job.sandbox.dataset if job.sandbox else None
    if dataset is not None:
        try:
            index_images(job.data.url, job.data.storage_options)
            logger.info("dataset already present at %s", job.data.url)
        except FileNotFoundError:
            synthetic.write_dataset(job.data.url, dataset.images, dataset.resolution, dataset.seed,
                                    job.data.storage_options, class_hues=dataset.class_hues)
    return job


def copy_results(run_url: str, local_dir: str, storage_options: dict) -> None:
    """Mirror the run directory into ``local_dir`` (``sandbox.copy_results_to``), replacing an earlier copy.

    Only files an earlier copy wrote are removed (listed in its ``COPY_MARKER``); a folder holding anything else,
    and no marker, is refused: a user's folder is never deleted because it looks like a run. The marker is written
    before the files, so a copy cut short is still known as one.
    """
    _remove_earlier_copy(local_dir)
    fs, root = storage.filesystem(run_url, storage_options)
    root = root.rstrip("/")
    files = sorted(posixpath.relpath(path, root) for path in fs.find(root))
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, COPY_MARKER), "w") as marker:
        json.dump({"run_url": run_url, "files": files}, marker)
    storage.copy_tree(run_url, local_dir, storage_options)


def _remove_earlier_copy(local_dir: str) -> None:
    """Remove the files (and then empty folders) that an earlier copy into ``local_dir`` lists; refuse a folder
    that holds files without such a list."""
    marker = os.path.join(local_dir, COPY_MARKER)
    if not os.path.exists(marker):
        if os.path.exists(local_dir) and (not os.path.isdir(local_dir) or os.listdir(local_dir)):
            raise ConfigError(f"sandbox.copy_results_to: {local_dir} holds files daskgan did not write (it has no "
                              f"{COPY_MARKER}); choose a new or empty folder")
        return
    for relative in _listed_files(marker):
        file = os.path.join(local_dir, relative)
        if os.path.lexists(file) and not os.path.isdir(file):  # a folder there now is the user's
            os.remove(file)
        _remove_empty_folders(os.path.dirname(file), local_dir)
    os.remove(marker)


def _listed_files(marker: str) -> list[str]:
    """The relative paths a copy marker lists, each checked to stay inside the marker's folder."""
    folder = os.path.realpath(os.path.dirname(marker))
    try:
        with open(marker) as handle:
            files = json.load(handle)["files"]
        if not isinstance(files, list) or not all(isinstance(relative, str) for relative in files):
            raise TypeError("its files are not a list of names")
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"sandbox.copy_results_to: {marker} is not a list daskgan wrote ({error}); choose a new "
                          f"or empty folder") from None
    for relative in files:
        inside = os.path.realpath(os.path.join(folder, relative))
        if os.path.commonpath([folder, inside]) != folder or inside == folder:
            raise ConfigError(f"sandbox.copy_results_to: {marker} lists {relative!r}, outside its folder; choose a "
                              f"new or empty folder")
    return files


def _remove_empty_folders(folder: str, top: str) -> None:
    """Remove ``folder`` and its parents below ``top`` while they are empty."""
    while os.path.abspath(folder) != os.path.abspath(top):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (the user's files, or more of ours still to go), or already gone
            return
        folder = os.path.dirname(folder)


def _ensure_bucket(url: str, storage_options: dict) -> None:
    fs, path = storage.filesystem(url, storage_options)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
