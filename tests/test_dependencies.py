"""Dependency floors: no version the project admits has a known code-execution flaw in what it relies on."""

import importlib.util
import re
import subprocess
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


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_runtime_dependencies_are_floors_only():
    """daskgan installs into a user's environment beside what it has: a pin (``s3fs==``) or a narrow window (boto3
    within three patch releases) would clash with it, so every runtime requirement is a floor, nothing more."""
    for requirement in map(Requirement, project()["dependencies"]):
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">="}, f"{requirement}: a floor (>=) only, no pins or upper bounds"


def test_boto3_is_required_only_where_it_is_imported():
    """daskgan itself never imports boto3 (s3fs brings aiobotocore and botocore); the tests' moto setup does."""
    sources = "".join(path.read_text() for path in (ROOT / "daskgan").rglob("*.py"))
    assert not re.search(r"^\s*(import|from) boto3", sources, re.M)
    assert "boto3" not in {Requirement(text).name for text in project()["dependencies"]}
    assert "boto3" in {Requirement(text).name for text in project()["optional-dependencies"]["test"]}


def test_the_lowest_job_pins_every_dependency_but_torch_to_its_floor():
    """``make test-lowest`` installs what .ci/floors.py writes: each requirement of the project and of the extras a
    user installs at its floor (torch stays the local CPU wheel)."""
    spec = importlib.util.spec_from_file_location("floors", ROOT / ".ci" / "floors.py")
    floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floors)
    extras = ["k8s", "cloud", "fast-decode", "demo"]
    assert f"--extras {','.join(extras)}" in (ROOT / "Makefile").read_text()
    pins = {Requirement(line).name: Requirement(line) for line in floors.floors(extras)}
    texts = project()["dependencies"] + [text for extra in extras for text in project()["optional-dependencies"][extra]]
    for requirement in map(Requirement, texts):
        if requirement.name == "torch":
            assert "torch" not in pins
            continue
        floor, = (spec.version for spec in requirement.specifier if spec.operator == ">=")
        assert str(pins[requirement.name].specifier) == f"=={floor}", requirement


def test_make_test_runs_the_suite_on_the_lowest_versions_too():
    """CI runs ``make test`` (.ci/run): it must include the second job, against the floors (``-B``: every recipe
    is listed, whichever environments exist already)."""
    planned = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".ci/floors.py" in planned and ".venv-lowest/bin/python -m pytest" in planned


def test_the_browser_test_needs_selenium_at_a_floor_and_make_test_installs_debians_chromium_only_when_absent(
        tmp_path):
    """tests/test_dashboard.py drives Debian's chromium through its chromedriver with selenium: the test extra
    asks for selenium with a floor, and ``make test`` runs apt-get for the two packages where either program is
    missing, and not where both are there."""
    selenium, = (Requirement(text) for text in project()["optional-dependencies"]["test"]
                 if Requirement(text).name == "selenium")
    assert [spec.operator for spec in selenium.specifier] == [">="]
    install = "apt-get install -y -q --no-install-recommends chromium chromium-driver"
    present = [tmp_path / "chromium", tmp_path / "chromedriver"]
    for program in present:
        program.touch()

    def planned(programs: list[Path]) -> str:
        files = " ".join(map(str, programs))
        return subprocess.run(["make", "-n", "test-newest", f"BROWSER={files}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    assert install not in planned(present)
    assert install in planned([present[0], tmp_path / "missing-chromedriver"])
