"""The command line and the README's Python example, run as a user would."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from daskgan.tools.cli import main

ROOT = Path(__file__).parent.parent


def test_bad_job_gives_one_line_naming_the_key(tmp_path, capsys):
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    job["train"]["itterations"] = 5
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "train.itterations: unknown key" in error


@pytest.mark.parametrize("argv", [["train.itterations=5", "--no-progress"], ["--no-progress", "train.itterations=5"],
                                  ["--cluster", str(ROOT / "cluster" / "local.yaml"), "train.itterations=5"]])
def test_an_override_anywhere_after_the_job_is_validated_as_the_file_is(argv, capsys):
    assert main(["train", str(ROOT / "jobs" / "demo.yaml"), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "demo.yaml: train.itterations: unknown key" in error


def test_an_argument_that_is_neither_option_nor_override_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", str(ROOT / "jobs" / "demo.yaml"), "--no-progress", "--dry_run"])
    assert exited.value.code == 2 and "unrecognized arguments: --dry_run" in capsys.readouterr().err


def cluster_file(tmp_path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def nothing_starts(monkeypatch):
    """A cluster, a connection or the loopback S3 server started by the command fails the test."""
    from daskgan.tools import cli

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run started something")

    monkeypatch.setattr(cli, "connect", refuse)
    monkeypatch.setattr(cli.sandbox, "LoopbackS3", refuse)


DRY_RUN_JOB = {"preset": "paper256", "sandbox": {"s3_server": True},
               "data": {"url": "s3://b/shapes", "resolution": 64,
                        "storage_options": {"key": "${K}", "secret": "${S}", "endpoint_url": "http://127.0.0.1:9"}},
               "output": {"run_url": "s3://b/runs/dry"}}


def dry_run(tmp_path, capsys, cluster: str, *overrides: str) -> dict:
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(DRY_RUN_JOB))
    assert main(["train", str(path), "--cluster", cluster, "--dry-run", *overrides]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_dry_run_prints_the_job_resolved_for_the_planned_workers_and_starts_nothing(tmp_path, capsys, nothing_starts):
    from daskgan.config import JobConfig

    two = cluster_file(tmp_path, "kind: local\nlocal: {n_workers: 2}\n")
    printed = dry_run(tmp_path, capsys, two, "train.lr_g=0.001")
    expected = JobConfig.from_dict({"name": "dry", **DRY_RUN_JOB, "train": {"lr_g": 0.001}}, workers=2)
    assert printed == yaml.safe_load(expected.to_yaml()), "what config.yaml in the run directory would hold"
    assert (printed["workers"], printed["data"]["batch_size"], printed["train"]["lr_g"]) == (2, 32, 0.001), \
        "paper256's global batch 64 over 2 workers, the override over the preset"
    assert printed["data"]["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:9"}
    capped = dry_run(tmp_path, capsys, two, "recovery.max_workers=1")
    assert (capped["workers"], capped["data"]["batch_size"]) == (1, 64), "the run trains on 1 of the 2 workers"


def test_dry_run_prints_the_iterations_that_kimg_means_on_the_cluster(tmp_path, capsys, nothing_starts):
    """jobs/demo.yaml gives iterations: 1000 and 16 images per worker; train.kimg replaces the iterations."""
    two = cluster_file(tmp_path, "kind: local\nlocal: {n_workers: 2}\n")
    assert main(["train", str(ROOT / "jobs" / "demo.yaml"), "train.kimg=0.05", "--cluster", two, "--dry-run"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert (train["kimg"], train["iterations"]) == (0.05, 2), "50 images at 16 x 2 workers = 32 an iteration"
    four = cluster_file(tmp_path, "kind: local\nlocal: {n_workers: 4}\n")
    assert main(["train", str(ROOT / "jobs" / "demo.yaml"), "train.kimg=0.05", "--cluster", four, "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["iterations"] == 1, "64 images an iteration on 4"


def test_dry_run_on_a_running_scheduler_counts_its_workers(tmp_path, capsys, dask_client, monkeypatch):
    from daskgan.tools import sandbox

    monkeypatch.setattr(sandbox, "LoopbackS3", None)
    spec = cluster_file(tmp_path, f"kind: scheduler\nscheduler: {{address: '{dask_client.scheduler.address}'}}\n")
    printed = dry_run(tmp_path, capsys, spec)
    assert (printed["workers"], printed["data"]["batch_size"]) == (2, 32)


def test_a_job_with_a_password_in_its_endpoint_is_refused_without_echoing_it(tmp_path, capsys):
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    job["data"]["storage_options"] = {"endpoint_url": "http://minio:s3cr3t-value@127.0.0.1:9000"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "data.storage_options.endpoint_url: a URL with a password" in error
    assert "s3cr3t-value" not in error and not (tmp_path / "demo-output").exists()


def test_cluster_spec_typo_names_the_key(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text("kind: local\nlocal:\n  n_worker: 2\n")
    assert main(["train", str(ROOT / "jobs" / "demo.yaml"), "--cluster", str(path)]) == 2
    assert "local.n_worker: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_sandbox_job_runs_end_to_end_and_says_where_results_are(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    job["sandbox"]["dataset"] = {"images": 32, "resolution": 16}
    job["data"].update(resolution=16, batch_size=4)
    job["model"].update(z_dim=8, g_channels=4, d_channels=4)
    job["train"]["iterations"] = 4
    job["output"].update(grid_every=2, checkpoint_every=2, flush_every=2)
    job["metrics"] = {"every": 2, "images": 16}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["train", "job.yaml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 iterations" in out and "tensorboard --logdir" in out
    assert re.search(r"fid \(random-cnn-v1\): [\d.]+ at iteration 2 -> [\d.]+ at iteration 4 \(2 evaluations\)", out)
    copy = tmp_path / "demo-output"
    assert str(copy) in out
    assert pd.read_parquet(copy / "records.parquet")["iteration"].tolist() == [1, 2, 3, 4]
    assert sorted(p.name for p in (copy / "grids").iterdir()) == ["000000002.png", "000000004.png", "reals.png"]
    assert any(p.name.startswith("events.out.tfevents") for p in (copy / "tb").iterdir())
    assert Image.open(copy / "summary.png").format == "PNG"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace("/tmp/daskgan-quickstart", str(tmp_path)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoints/000000020.pt" in done.stdout
    assert re.search(r"^20 ", done.stdout, re.M), "on_record saw the last iteration"
