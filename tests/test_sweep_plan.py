"""Sweeps (issue #27 item 3), apart from any cluster: the grid a command line names, its runs' directories and the
one-line errors for a grid that cannot run; the successive-halving cut on plain data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from test_cli_errors import ROOT, assert_one_line

from daskgan.cluster.sweep import MAX_RUNS, Halving, plan_sweep, point_name
from daskgan.errors import ConfigError


@pytest.fixture
def job_file(tmp_path):
    """A small job whose runs go under s3://b/sweep, with FID every 5 iterations of 40 (batch 4 on 1 worker)."""
    job = {"name": "tiny", "data": {"url": "s3://b/data", "resolution": 16, "batch_size": 4},
           "model": {"z_dim": 8, "g_channels": 4, "d_channels": 4}, "train": {"iterations": 40},
           "metrics": {"every": 5, "images": 16, "kinds": ["fid"]}, "output": {"run_url": "s3://b/sweep"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_one_run_per_point_each_named_by_its_settings_under_the_jobs_run_url(job_file):
    sweep = plan_sweep(job_file, ["train.lr_g=1e-4,2e-3", "train.r1_gamma=0.5,2", "train.seed=3"], 1)
    names = [point.name for point in sweep.points]
    assert names == ["lr_g-0.0001_r1_gamma-0.5", "lr_g-0.0001_r1_gamma-2.0", "lr_g-0.002_r1_gamma-0.5",
                     "lr_g-0.002_r1_gamma-2.0"], "the grid in the order given, single values not in the names"
    assert [point.run_url for point in sweep.points] == [f"s3://b/sweep/{name}" for name in names]
    first = sweep.points[0].job
    assert (first.train.lr_g, first.train.r1_gamma, first.train.seed) == (1e-4, 0.5, 3)
    assert first.output.run_url == "s3://b/sweep/lr_g-0.0001_r1_gamma-0.5" and first.recovery.workers == 1
    manifest = sweep.manifest()
    assert manifest["sweep_url"] == "s3://b/sweep" and manifest["workers_per_run"] == 1
    assert manifest["points"][3] == {"name": names[3], "run_url": f"s3://b/sweep/{names[3]}",
                                     "settings": {"train.lr_g": 2e-3, "train.r1_gamma": 2.0}}
    assert manifest["job"]["train"]["seed"] == 3 and manifest["job"]["output"]["run_url"] == "s3://b/sweep"
    assert manifest["metric"] == "fid" and manifest["rungs"] == []


def test_names_are_safe_on_filesystems_and_s3_and_tell_same_leaves_apart():
    assert point_name({"metrics.kinds": ["fid", "kid"], "data.url": "s3://x/y z"}) == "kinds-fid-kid_url-s3-x-y-z"
    assert point_name({"train.lr_g": -1, "model.z_dim": None}) == "lr_g--1_z_dim-null"
    assert point_name({"train.seed": 1, "data.seed": 2}) == "train.seed-1_data.seed-2"


@pytest.mark.parametrize("settings, message", [
    (["train.nosuch=1,2"], "train.nosuch"),
    (["train.lr_g="], "train.lr_g: no values to sweep"),
    (["train.lr_g=[1,2"], "train.lr_g: '[1,2' is not"),
    (["train.lr_g=abc,1"], "train.lr_g"),
    ([f"train.seed={','.join(map(str, range(11)))}", f"train.r1_gamma={','.join(map(str, range(10)))}"],
     f"110 runs, more than {MAX_RUNS}"),
    (["train.lr_g=1,1"], "two runs named lr_g-1"),
    (["nokey"], "nokey: a swept setting is KEY=V1,V2"),
    (["train.seed=1,2", "output.resume=never"], "output.resume: a sweep's runs resume from their own"),
])
def test_a_grid_that_cannot_run_is_one_line(job_file, settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        plan_sweep(job_file, settings, 1)


def test_halving_rungs_must_lie_within_the_runs_and_need_a_metric(job_file, tmp_path):
    assert plan_sweep(job_file, ["train.seed=1,2"], 1, halving_kimg=[0.04, 0.1]).manifest()["halving_kimg"] == \
        [0.04, 0.1]
    with pytest.raises(ConfigError, match="0.2 kimg is not before the runs' end at 0.16 kimg"):
        plan_sweep(job_file, ["train.seed=1,2"], 1, halving_kimg=[0.04, 0.2])
    with pytest.raises(ConfigError, match="increasing"):
        plan_sweep(job_file, ["train.seed=1,2"], 1, halving_kimg=[0.1, 0.04])
    with pytest.raises(ConfigError, match="metrics.every"):
        plan_sweep(job_file, ["train.seed=1,2", "metrics.every=0"], 1, halving_kimg=[0.04])


def test_the_command_refuses_a_bad_grid_before_starting_anything(job_file):
    result = subprocess.run([sys.executable, "-m", "daskgan.tools.cli", "sweep", job_file, "train.lr_g=",
                             "--workers-per-run", "1", "--cluster", "no-such-cluster.yaml"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_line(result, "train.lr_g: no values to sweep")


def test_each_rung_keeps_the_better_half_once_every_run_still_in_reached_it():
    halving = Halving(["a", "b", "c", "d"], [2, 4])
    assert halving.next_rung("a") == 2
    assert halving.reach("a", 30.0) is None and halving.verdict("a") == "waiting" and halving.next_rung("a") is None
    assert halving.reach("b", 10.0) is None and halving.reach("c", 20.0) is None
    decision = halving.reach("d", 40.0)
    assert decision == {"rung": 1, "kimg": 2, "values": {"b": 10.0, "c": 20.0, "a": 30.0, "d": 40.0},
                        "kept": ["b", "c"], "stopped": {"a": 30.0, "d": 40.0}}, "lower FID is better"
    assert [halving.verdict(name) for name in "abcd"] == ["stop", "go", "go", "stop"]
    assert halving.next_rung("b") == 4 and halving.next_rung("a") is None
    assert halving.reach("c", 5.0) is None, "b is still in: the cut at 4 kimg waits for it"
    assert halving.reach("b", 8.0)["kept"] == ["c"] and halving.verdict("b") == "stop"
    assert halving.next_rung("c") is None and halving.verdict("c") == "go", "past the last rung: on to the end"
    assert halving.out["b"] == "stopped at rung 2 (4 kimg)"


def test_a_run_that_ends_by_itself_leaves_the_cut_to_the_others():
    halving = Halving(["a", "b", "c"], [2], higher_is_better=True)
    halving.reach("a", 1.0)
    assert halving.reach("b", float("nan")) is None
    decision = halving.leave("c", "failed: out of memory")
    assert decision["kept"] == ["a"] and decision["stopped"] == {"b": pytest.approx(float("nan"), nan_ok=True)}, \
        "higher IS is better; no value ranks last; of two runs one goes on"
    assert halving.out["c"] == "failed: out of memory" and halving.leave("b", "stopped (checkpoint)") is None
    lone = Halving(["a"], [2])
    assert lone.reach("a", 3.0)["kept"] == ["a"] and lone.verdict("a") == "go", "at least one run goes on"
