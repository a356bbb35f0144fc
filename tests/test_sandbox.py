"""``sandbox.copy_results_to`` replaces only an earlier copy of the results: a user's folder is never deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daskgan.errors import ConfigError
from daskgan.tools.sandbox import COPY_MARKER, copy_results


def run_directory(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root.as_uri()


def test_a_users_folder_holding_a_config_yaml_is_refused_and_kept(tmp_path):
    run_url = run_directory(tmp_path / "run", {"config.yaml": "train: {}\n", "records/0.jsonl": "{}\n"})
    project = tmp_path / "my-project"
    run_directory(project, {"config.yaml": "mine: true\n", "src/model.py": "x = 1\n"})
    with pytest.raises(ConfigError, match=f"sandbox.copy_results_to: {project} holds files daskgan did not write"):
        copy_results(run_url, str(project), {})
    assert (project / "src" / "model.py").read_text() == "x = 1\n" and (project / "config.yaml").exists()


def test_a_new_copy_replaces_the_files_of_the_earlier_one_and_keeps_the_users(tmp_path):
    copy = tmp_path / "copy"
    first = run_directory(tmp_path / "first", {"config.yaml": "a\n", "grids/1.png": "old", "grids/2.png": "old"})
    copy_results(first, str(copy), {})
    (copy / "grids" / "notes.txt").write_text("the user's")
    second = run_directory(tmp_path / "second", {"config.yaml": "b\n", "tb/events": "new"})
    copy_results(second, str(copy), {})
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        COPY_MARKER, "config.yaml", "grids/notes.txt", "tb/events"]
    assert (copy / "config.yaml").read_text() == "b\n"


def test_a_marker_listing_files_outside_its_folder_deletes_nothing(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / COPY_MARKER).write_text(json.dumps({"files": ["../precious.txt"]}))
    with pytest.raises(ConfigError, match=r"lists '\.\./precious\.txt', outside its folder"):
        copy_results(run_directory(tmp_path / "run", {"config.yaml": "a\n"}), str(copy), {})
    assert outside.read_text() == "keep"


def test_a_marker_whose_list_is_not_a_list_of_names_deletes_nothing(tmp_path):
    """``{"files": "ab"}`` removed the user's files ``a`` and ``b`` (its letters, taken as names)."""
    copy = tmp_path / "copy"
    run_directory(copy, {"a": "the user's", "b": "the user's"})
    (copy / COPY_MARKER).write_text(json.dumps({"files": "ab"}))
    with pytest.raises(ConfigError, match=r"is not a list daskgan wrote"):
        copy_results(run_directory(tmp_path / "run", {"config.yaml": "a\n"}), str(copy), {})
    assert (copy / "a").exists() and (copy / "b").exists()


def test_a_listed_file_that_is_now_the_users_folder_is_kept(tmp_path):
    """os.remove met the folder: IsADirectoryError escaped, and the copy stopped half done."""
    copy = tmp_path / "copy"
    copy_results(run_directory(tmp_path / "first", {"config.yaml": "a\n", "notes": "ours"}), str(copy), {})
    (copy / "notes").unlink()
    run_directory(copy, {"notes/mine.txt": "the user's"})
    copy_results(run_directory(tmp_path / "second", {"config.yaml": "b\n"}), str(copy), {})
    assert (copy / "notes" / "mine.txt").read_text() == "the user's" and (copy / "config.yaml").read_text() == "b\n"
