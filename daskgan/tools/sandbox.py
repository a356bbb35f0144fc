"""Self-contained infrastructure for the demo and the tests: an S3 server on loopback and a generated dataset.

The S3 server is moto in server mode, run as its own process (a real HTTP endpoint reached through s3fs with
``endpoint_url``; as a separate process it serves about 3x faster than moto's in-process threaded server).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from daskgan.dispatch import free_port

logger = logging.getLogger(__name__)

# moto accepts any credentials; these are placeholders, not secrets.
SANDBOX_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "daskgan-sandbox",
    "AWS_SECRET_ACCESS_KEY": "daskgan-sandbox-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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
        raise RuntimeError("moto_server not found: install the demo extra (pip install 'daskgan[demo]')")
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
        for url, options in ((job.data.url, job.data.storage_options), (job.output.run_url, job.output.storage_options)):
            _ensure_bucket(url, options)
    dataset = job.sandbox.dataset if job.sandbox else None
    if dataset is not None:
        try:
            index_images(job.data.url, job.data.storage_options)
            logger.info("dataset already present at %s", job.data.url)
        except FileNotFoundError:
            synthetic.write_dataset(job.data.url, dataset.images, dataset.resolution, dataset.seed,
                                    job.data.storage_options)
    return job


def _ensure_bucket(url: str, storage_options: dict) -> None:
    from daskgan.run import storage

    fs, path = storage.filesystem(url, storage_options)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
