"""Installing like a library: ``pip install <checkout>`` into a fresh environment that holds only torch, then the
README's own-data walkthrough ("Train on your own images") pasted command by command against the loopback S3.

The walkthrough's block is found by the HTML comment before it. Its first lines set the user's values (a folder of
images, a bucket, a job, a cluster spec); the test gives its own instead (a folder of generated shapes, a bucket on
the loopback server, a tiny DCGAN job, the checkout's local cluster spec) and runs every other line as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch
import yaml

from daskgan.data import synthetic
from daskgan.tools.cli import main

ROOT = Path(__file__).parent.parent
MARKER = "<!-- walkthrough:"
VALUE = re.compile(r"^([A-Z_]+)=(\S+)")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # the Makefile's TORCH_INDEX
# The tiny job standing in for the user's: 256 px as the walkthrough's conversion, a few iterations, two grids.
TINY_JOB = {"data": {"url": "s3://your-bucket/data.zip", "resolution": 256, "batch_size": 2},
            "model": {"family": "dcgan", "z_dim": 8, "g_channels": 2, "d_channels": 2},
            "train": {"iterations": 4},
            "metrics": {"every": 0},
            "output": {"run_url": "s3://your-bucket/run", "flush_every": 2, "grid_every": 2, "grid_images": 4,
                       "checkpoint_every": 2}}


def walkthrough() -> tuple[dict[str, str], list[str]]:
    """The README block after the walkthrough marker: (the user's values, the commands), comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme[readme.index(MARKER):], re.S).group(1)
    values, commands = {}, []
    for line in filter(None, (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())):
        value = VALUE.match(line)
        if value and not commands:
            values[value.group(1)] = value.group(2)
        else:
            commands.append(line)
    return values, commands


def run(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run a command; its output, or a failure that shows it."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def fresh_environment(where: Path) -> dict[str, str]:
    """A virtualenv holding torch (this one's version, a CPU build), then the checkout, not editable, no extras;
    returns the environment of a shell in which it is activated."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    pip = [str(where / "bin" / "pip"), "install", "-q", "--no-compile"]  # no .pyc for torch's 2,300 modules
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = f"torch=={torch.__version__.split('+')[0]}"
    local = subprocess.run([*pip, "--no-deps", "--no-index", version], env=env, capture_output=True, timeout=600)
    # as the Makefile: the wheel in pip's find-links, then its dependencies; else PyTorch's CPU index
    run([*pip, version] if local.returncode == 0 else [*pip, "--index-url", TORCH_CPU_INDEX, version], env, where,
        timeout=900)
    run([*pip, str(ROOT)], env, where, timeout=900)
    return {**env, "VIRTUAL_ENV": str(where), "PATH": f"{where / 'bin'}{os.pathsep}{env['PATH']}"}


def test_the_walkthrough_with_its_own_values_resolves_its_job(monkeypatch, capsys):
    """The values the fresh-environment test replaces still have to be right for a user: its job, with the data
    and run given on the command line, resolves on its cluster (the dry run, which starts nothing)."""
    values, commands = walkthrough()
    assert set(values) == {"IMAGES", "BUCKET", "JOB", "CLUSTER"}
    assert all(command.startswith("daskgan ") for command in commands)
    monkeypatch.chdir(ROOT)
    for name, value in values.items():
        monkeypatch.setenv(name, os.path.expanduser(value))
    dry_run, = (command for command in commands if "--dry-run" in command)
    assert main(shlex.split(os.path.expandvars(dry_run))[1:]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["url"] == f"{values['BUCKET']}/mine-{resolved['data']['resolution']}.zip"
    assert resolved["output"]["run_url"] == f"{values['BUCKET']}/runs/mine"
    convert = shlex.split(next(command for command in commands if command.startswith("daskgan dataset ")))
    assert int(convert[convert.index("--resolution") + 1]) == resolved["data"]["resolution"], "converted for the job"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pip_install_then_the_readme_walkthrough_ends_with_grids(s3_server, s3_bucket, tmp_path):
    env = fresh_environment(tmp_path / "venv")
    installed = run(["python", "-c", "import daskgan, torch; print(daskgan.__file__, torch.__version__)"],
                    env, tmp_path, timeout=120)
    assert str(ROOT / "daskgan") not in installed, f"daskgan came from the checkout, not the install: {installed}"
    bucket, options = s3_bucket
    synthetic.write_dataset(f"file://{tmp_path / 'images'}", images=16, resolution=24)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(TINY_JOB))
    values, commands = walkthrough()
    mine = {"IMAGES": str(tmp_path / "images"), "BUCKET": f"{bucket}/gan", "JOB": str(tmp_path / "job.yaml"),
            "CLUSTER": str(ROOT / "cluster" / "local.yaml")}
    env = {**env, **s3_server.environment(), **mine}
    assert set(mine) == set(values)
    for command in commands:
        run(["bash", "-c", command], env, tmp_path, timeout=600)  # as pasted into a shell
    run_dir = f"{bucket}/gan/runs/mine".removeprefix("s3://")
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    grids = fs.ls(f"{run_dir}/grids")
    assert {path.rsplit("/", 1)[-1] for path in grids} >= {"reals.png", "000000002.png", "000000004.png"}, grids
    assert sorted(os.listdir(tmp_path / "samples")) == [f"seed{seed:04d}.png" for seed in range(8)]
