"""Print pip constraints that pin daskgan's dependencies to their floors (``name==floor``), for ``make test-lowest``.

pip has no "lowest versions" resolution of its own (uv's ``--resolution lowest-direct``); constraining every direct
requirement to its ``>=`` floor gives the same thing for the packages daskgan itself asks for, while what they pull
in resolves as a user's pip would. Covered: ``[project].dependencies`` and the extras a user installs (``--extras``);
torch is left out (its floor's wheel is a multi-GB CUDA build from PyPI; the local CPU wheel is the one tested).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NOT_PINNED = {"torch", "daskgan"}


def floors(extras: list[str]) -> list[str]:
    """``name==floor`` for every requirement of the project and of ``extras`` but torch; a requirement without a
    ``>=`` floor is an error, since the lowest job could not say which version it tested."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [text for extra in extras for text in project["optional-dependencies"][extra]]
    pins = {}
    for requirement in map(Requirement, texts):
        if requirement.name in NOT_PINNED:
            continue
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if not lowest:
            raise SystemExit(f"floors.py: {requirement} has no >= floor")
        pins[requirement.name] = f"{requirement.name}=={lowest[0]}"
    return sorted(pins.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated extras whose requirements are pinned too")
    extras = [name for name in parser.parse_args().extras.split(",") if name]
    sys.stdout.write("".join(f"{line}\n" for line in floors(extras)))


if __name__ == "__main__":
    main()
