"""The run directory's layout (``daskgan.run.layout``): the state file round trip and names parsed back."""

from __future__ import annotations

import posixpath

import pytest

from daskgan.run import layout, storage


@pytest.fixture
def run_url(tmp_path):
    return tmp_path.as_uri() + "/run"


@pytest.mark.parametrize("state", [layout.RunState("stopped", 40, checkpoint="s3://b/run/checkpoints/000000040.pt"),
                                   layout.RunState("failed", 7, error="ValueError: no images")])
def test_a_state_written_is_read_back_in_one_shape(run_url, state):
    layout.write_state(run_url, state)
    assert layout.read_state(run_url) == state
    assert sorted(storage.read_json(f"{run_url}/state.json")) == ["checkpoint", "error", "iteration", "state"]


def test_no_state_file_or_one_of_no_known_state_reads_as_none(run_url):
    assert layout.read_state(run_url) is None
    storage.write_json(f"{run_url}/state.json", {"state": "running"})
    assert layout.read_state(run_url) is None


def test_an_unknown_state_is_not_written(run_url):
    with pytest.raises(ValueError, match="'running' is none of"):
        layout.RunState("running", 3)


def test_names_spell_nine_digit_iterations_and_parse_back():
    assert layout.checkpoint_url("s3://b/run/", 1000) == "s3://b/run/checkpoints/000001000.pt"
    assert layout.record_part_url("s3://b/run", 1, 25) == "s3://b/run/records/000000001-000000025.jsonl"
    assert layout.grid_url("s3://b/run", 50) == "s3://b/run/grids/000000050.png"
    assert layout.evaluation_url("s3://b/run", 50) == "s3://b/run/metrics/000000050.json"
    assert layout.checkpoint_iteration(posixpath.basename(layout.checkpoint_url("r", 1000))) == 1000
    assert layout.record_part_span(posixpath.basename(layout.record_part_url("r", 1, 25))) == (1, 25)
    assert [layout.checkpoint_iteration(n) for n in ("latest.json", "index.json", "x.pt")] == [None, None, None]
    assert layout.record_part_span(".000000001-000000025.jsonl.partial") is None
