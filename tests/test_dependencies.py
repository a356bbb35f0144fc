"""Dependency floors: no version the project admits has a known code-execution flaw in what it relies on."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent


def requirement(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found, = (Requirement(text) for text in dependencies if Requirement(text).name == name)
    return found


def test_torch_floor_excludes_cve_2025_32434():
    """torch < 2.6.0 runs code from a file loaded with ``weights_only=True`` (CVE-2025-32434); every "nothing runs"
    load of a checkpoint or weights file relies on it."""
    torch = requirement("torch")
    assert not torch.specifier.contains("2.5.1"), f"{torch} admits torch 2.5.1 (CVE-2025-32434)"
    assert torch.specifier.contains("2.6.0")
    pinned = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert torch.specifier.contains(pinned), f"the Makefile's CPU wheel {pinned} is outside {torch}"
