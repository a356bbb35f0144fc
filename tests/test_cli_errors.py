"""Every user mistake is one line: the ``daskgan`` command exits with status 2 and one stderr line that names the
bad input, and no traceback (unless ``--debug``). Run as a user would, in a subprocess; training mistakes go
through a real scheduler and workers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from daskgan.config import ModelConfig
from daskgan.metrics import extractors
from daskgan.models import build_models
from daskgan.run import checkpoint, storage
from daskgan.tools.sandbox import free_port

ROOT = Path(__file__).parent.parent


def daskgan(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daskgan.tools.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=180)


def assert_one_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """Status 2, exactly one line on stderr, no traceback, naming every one of ``names``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def saved_checkpoint(url: str, storage_options: dict | None = None, conditional: bool = False) -> str:
    """A small StyleGAN2 training checkpoint (conditional on 3 classes if asked), as the loop writes them."""
    torch.manual_seed(0)
    model = ModelConfig(family="stylegan2", z_dim=8, w_dim=8, mapping_layers=2, fmaps=1 / 256, channel_max=16,
                        conditional=conditional)
    G, D = build_models(model, 16, 3 if conditional else 0)
    state = {"iteration": 1, "model": {**asdict(model), "resolution": 16, "num_classes": 3 if conditional else 0},
             "G": G.state_dict(), "D": D.state_dict()}
    return checkpoint.save(url, state, 1, keep=1, storage_options=storage_options)


# --- the command line itself --------------------------------------------------------------------------------------


def test_seeds_that_are_not_numbers():
    assert_one_line(daskgan("generate", "x.pt", "--seeds", "0-a", "--out", "o"), "--seeds", "'0-a'")


@pytest.mark.parametrize("option, value", [("--resolution", "100"), ("--resolution", "0"), ("--shard-mb", "0"),
                                           ("--shard-mb", "inf")])
def test_dataset_settings_that_cannot_make_a_training_set(tmp_path, option, value):
    (tmp_path / "raw").mkdir()
    args = {"--resolution": "8", option: value}
    result = daskgan("dataset", str(tmp_path / "raw"), str(tmp_path / "out"), *[a for kv in args.items() for a in kv])
    assert_one_line(result, option, value)
    assert not (tmp_path / "out").exists()


def test_unknown_log_level():
    assert_one_line(daskgan("--log-level", "LOUD", "generate", "x.pt", "--out", "o"), "--log-level", "'LOUD'")


def test_job_and_cluster_files_that_do_not_exist():
    assert_one_line(daskgan("train", "jobs/no-such-job.yaml"), "jobs/no-such-job.yaml", "cannot read")
    assert_one_line(daskgan("train", "jobs/demo.yaml", "--cluster", "cluster/nope.yaml"), "cluster/nope.yaml")


def test_debug_shows_the_traceback():
    result = daskgan("--debug", "train", "jobs/no-such-job.yaml")
    assert result.returncode != 0 and "Traceback" in result.stderr


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_missing_and_unreadable_checkpoints(tmp_path):
    missing = (tmp_path / "run" / "checkpoints" / "000000100.pt").as_uri()
    assert_one_line(daskgan("generate", missing, "--out", str(tmp_path / "o")), missing, "does not exist")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert_one_line(daskgan("sample", str(garbage), "--out", str(tmp_path / "o")), str(garbage),
                    "not a daskgan checkpoint")
    other_tool = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other_tool)
    assert_one_line(daskgan("generate", str(other_tool), "--out", str(tmp_path / "o")), str(other_tool))


def test_import_of_a_missing_file_or_of_a_daskgan_checkpoint_says_what_it_takes(tmp_path):
    missing = str(tmp_path / "network-snapshot.pkl")
    assert_one_line(daskgan("import", missing, "--out", str(tmp_path / "o.pt")), missing, "does not exist",
                    "NVlabs network pickle or a BigGAN-PyTorch weights folder")
    ours = saved_checkpoint(tmp_path.as_uri() + "/run")
    assert_one_line(daskgan("import", ours, "--out", str(tmp_path / "o.pt")), ours,
                    "neither an NVlabs network pickle nor a BigGAN-PyTorch weights folder")


def test_class_index_out_of_range(tmp_path):
    url = saved_checkpoint(tmp_path.as_uri() + "/run", conditional=True)
    assert_one_line(daskgan("generate", url, "--class", "7", "--out", str(tmp_path / "o")), "--class",
                    "from 0 to 2")
    assert_one_line(daskgan("sample", url, "--classes", "1,9", "--out", str(tmp_path / "o")), "--classes",
                    "[9] out of range")


# --- storage ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checking_s3(credential_checking_s3):
    """The credential-checking S3 with a bucket holding one checkpoint; yields (server, good credentials, its URL)."""
    import s3fs

    server, iam, good = credential_checking_s3
    options = {"endpoint_url": server.endpoint_url, "key": good["AWS_ACCESS_KEY_ID"],
               "secret": good["AWS_SECRET_ACCESS_KEY"]}
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("weights")
    yield server, good, saved_checkpoint("s3://weights/run", options)


def test_wrong_and_missing_credentials(checking_s3, tmp_path):
    server, good, url = checking_s3
    args = ("generate", url, "--endpoint-url", server.endpoint_url, "--out", str(tmp_path / "o"))
    assert daskgan(*args, env=good).returncode == 0, "the right keys work"
    wrong = {**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    assert_one_line(daskgan(*args, env=wrong), url, "access denied", "AWS_ACCESS_KEY_ID")
    nothing = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    assert_one_line(daskgan(*args, env=nothing), url, "no credentials found")


def test_output_bucket_that_does_not_exist(checking_s3, tmp_path):
    server, good, url = checking_s3
    result = daskgan("generate", url, "--endpoint-url", server.endpoint_url, "--out", "s3://no-such-bucket/out",
                     env=good)
    assert_one_line(result, "s3://no-such-bucket/out", "bucket does not exist")


# --- training on a real scheduler and workers --------------------------------------------------------------------


@pytest.fixture
def train_with(dask_client, s3_bucket, tmp_path):
    """Run ``daskgan train`` on the session's cluster with a small job changed by the given sections."""
    bucket, options = s3_bucket
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": dask_client.scheduler.address}}))

    def train(data: dict | None = None, **sections: dict) -> subprocess.CompletedProcess:
        job = {"data": {"url": f"{bucket}/data", "storage_options": options, "resolution": 16, "batch_size": 4,
                        **(data or {})},
               "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 2},
               "output": {"run_url": f"{bucket}/run", "storage_options": options}, **sections}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        return daskgan("train", str(path), "--cluster", str(spec), "--no-progress")

    return train


@pytest.mark.slow
def test_training_mistakes_found_on_the_workers(train_with, shapes_in_bucket):
    bucket, options = shapes_in_bucket(8)
    assert_one_line(train_with(data={"url": f"{bucket}/empty"}), f"{bucket}/empty", "no images")
    assert_one_line(train_with(data={"url": "s3://no-such-bucket-daskgan/data"}),
                    "s3://no-such-bucket-daskgan/data", "bucket does not exist")
    unset = {"key": "${DASKGAN_TEST_UNSET_KEY}", "secret": "${DASKGAN_TEST_UNSET_SECRET}"}
    assert_one_line(train_with(data={"storage_options": {**options, **unset}}), "DASKGAN_TEST_UNSET_KEY",
                    "not set")
    other_family = saved_checkpoint(f"{bucket}/stylegan-run", options)
    assert_one_line(train_with(output={"run_url": f"{bucket}/stylegan-run", "storage_options": options,
                                       "resume": other_family}), other_family, "family: checkpoint has 'stylegan2'")
    assert_one_line(train_with(output={"run_url": f"{bucket}/stylegan-run", "storage_options": options,
                                       "resume": "never"}),
                    f"{bucket}/stylegan-run", "output.resume: never", "new output.run_url", "output.resume: auto")
    assert checkpoint.latest(f"{bucket}/stylegan-run", options) == other_family, "the run it refused is intact"


@pytest.mark.slow
def test_an_inception_file_that_is_not_nvlabs_is_refused_unloaded(train_with, shapes_in_bucket, tmp_path):
    bucket, options = shapes_in_bucket(8)
    other = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(other))
    url = f"{bucket}/models/inception-2015-12-05.pt"
    storage.write_bytes(url, other.read_bytes(), options)
    refused = train_with(metrics={"every": 1, "images": 4, "extractor": "inception", "extractor_url": url,
                                  "storage_options": options})
    assert_one_line(refused, url, hashlib.sha256(other.read_bytes()).hexdigest(), extractors.INCEPTION_SHA256,
                    "not NVlabs' inception-2015-12-05.pt")


def test_resuming_from_another_runs_checkpoint(tmp_path):
    other = (tmp_path / "other-run" / "checkpoints" / "000000100.pt").as_uri()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"data": {"url": str(tmp_path / "data")},
                                   "output": {"run_url": str(tmp_path / "run"), "resume": other}}))
    assert_one_line(daskgan("train", str(job)), "output.resume", other, "not a checkpoint of this run",
                    "train.init_from")


@pytest.mark.parametrize("command", [["train", "jobs/demo.yaml"], ["runs"], ["stop", "s3://bucket/run"]],
                         ids=lambda command: command[0])
def test_unreachable_scheduler(tmp_path, command):
    spec = tmp_path / "cluster.yaml"
    address = f"tcp://127.0.0.1:{free_port()}"
    spec.write_text(yaml.safe_dump({"kind": "scheduler", "scheduler": {"address": address,
                                                                        "connect_timeout_s": 2}}))
    assert_one_line(daskgan(*command, "--cluster", str(spec)), address, "no Dask scheduler")


@pytest.mark.parametrize("command", [["runs"], ["status", "s3://b/run"], ["attach", "s3://b/run"], ["stop", "s3://b/run"]],
                         ids=lambda command: command[0])
def test_looking_at_runs_on_kubernetes_without_a_kubeconfig(tmp_path, command):
    """This machine's environment: no Kubernetes (tests/test_cluster.py proves that nothing is created)."""
    env = {"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    assert_one_line(daskgan(*command, "--cluster", "cluster/kubernetes.yaml", env=env),
                    "DaskCluster daskgan in namespace gan-training", "no Kubernetes API reachable")


# --- runs as arguments and numeric options ------------------------------------------------------------------------


@pytest.fixture
def s3_run(s3_bucket):
    """A run directory on the loopback S3 holding two checkpoints, laid out as training leaves it; returns (run URL,
    the newest checkpoint's URL, the storage options)."""
    bucket, options = s3_bucket
    run_url = f"{bucket}/run"
    older = saved_checkpoint(run_url, options)
    state = checkpoint.load(older, options)
    later_weights = {name: tensor + 0.5 for name, tensor in state["G"].items()}
    newest = checkpoint.save(run_url, {**state, "iteration": 5, "G": later_weights}, 5, keep=3,
                             storage_options=options)
    return run_url, older, newest, options


@pytest.mark.parametrize("argument", ["{run}", "{run}/", "{run}/checkpoints/latest.json", "{run}/checkpoints"])
def test_a_run_directory_or_its_pointer_means_its_newest_checkpoint(s3_run, tmp_path, argument):
    from daskgan.tools.generate import generate

    run_url, older, newest, options = s3_run
    result = daskgan("generate", argument.format(run=run_url), "--seeds", "0", "--endpoint-url",
                     options["endpoint_url"], "--out", str(tmp_path / "o"))
    assert result.returncode == 0 and not result.stderr, result.stderr
    drawn = {url: storage.read_bytes(generate(url, [0], (tmp_path / name).as_uri(), storage_options=options)[0])
             for name, url in (("newest", newest), ("older", older))}
    assert drawn[newest] != drawn[older]
    assert (tmp_path / "o" / "seed0000.png").read_bytes() == drawn[newest]


def test_a_folder_without_checkpoints_is_refused_at_once(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    storage.write_bytes(f"{bucket}/photos/a.png", b"x", options)
    (tmp_path / "photos").mkdir()
    for folder in (f"{bucket}/photos", (tmp_path / "photos").as_uri()):
        result = daskgan("sample", folder, "--endpoint-url", options["endpoint_url"], "--out", str(tmp_path / "o"))
        assert "retry" not in result.stdout + result.stderr, "a folder is not a transient failure"
        assert_one_line(result, folder, "no daskgan checkpoint")


@pytest.mark.parametrize("command, option, value", [
    ("sample", "--per-class", "0"), ("sample", "--per-class", "-2"), ("sample", "--steps", "0"),
    ("sample", "--seed", "-1"), ("sample", "--seed", "4294967295"), ("sample", "--standing-stats", "-1"),
    ("sample", "--trunc", "nan"), ("generate", "--trunc", "inf"), ("generate", "--seeds", "4294967296")])
def test_numeric_options_out_of_range(tmp_path, command, option, value):
    url = saved_checkpoint(tmp_path.as_uri() + "/run")
    assert_one_line(daskgan(command, url, option, value, "--out", str(tmp_path / "o")), option, value)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_trained_run_directory_serves_generate_and_init_from(train_with, shapes_in_bucket, tmp_path):
    bucket, options = shapes_in_bucket(8)
    assert train_with().returncode == 0
    for argument in (f"{bucket}/run", f"{bucket}/run/checkpoints/latest.json"):
        result = daskgan("generate", argument, "--seeds", "0", "--endpoint-url", options["endpoint_url"], "--out",
                         str(tmp_path / "o"))
        assert result.returncode == 0 and not result.stderr, result.stderr
    tuned = train_with(train={"iterations": 2, "init_from": f"{bucket}/run"},
                       output={"run_url": f"{bucket}/tuned", "storage_options": options})
    assert tuned.returncode == 0, tuned.stderr  # the run directory was read as a checkpoint: refused before
