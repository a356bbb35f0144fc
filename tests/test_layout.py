"""The package's layout: config loads without torch, no import cycles, no import hooks."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import daskgan

PACKAGE_ROOT = Path(daskgan.__file__).parent


def test_reading_a_job_file_imports_neither_torch_nor_a_model():
    code = ("import sys, daskgan.config as c; c.load_job('jobs/demo.yaml'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('daskgan.models')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE_ROOT.parent).stdout.strip()
    assert loaded == "[]"


def module_imports() -> dict[str, set[str]]:
    """For each daskgan module, the daskgan modules it imports anywhere in its body (type-checking-only
    imports excluded); ``from daskgan.x import y`` counts as importing ``daskgan.x.y`` when that is a module."""
    modules = {name for _, name, _ in pkgutil.walk_packages([str(PACKAGE_ROOT)], "daskgan.")} | {"daskgan"}
    graph = {}
    for name in modules:
        path = PACKAGE_ROOT.joinpath(*name.split(".")[1:])
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):  # drop `if TYPE_CHECKING:` blocks
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                            else node.module for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_daskgan_modules():
    graph = module_imports()
    # a package importing its own submodules (to re-export them) is not a cycle; a submodule importing its
    # package's __init__ back would be
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_training_package_does_not_import_the_dispatcher():
    """The worker side asks ``daskgan.errors`` whose failure an exception is, not the client's dispatcher."""
    importers = sorted(name for name, targets in module_imports().items()
                       if name.startswith("daskgan.training") and "daskgan.dispatch" in targets)
    assert importers == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_importing_daskgan_installs_no_import_hook():
    """Module names answer only for the files that hold them: no finder aliases names of an earlier layout."""
    code = "import sys; before = list(sys.meta_path); import daskgan; print(sys.meta_path == before)"
    unchanged = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=PACKAGE_ROOT.parent).stdout.strip()
    assert unchanged == "True"


def test_registries_implement_exactly_the_names_the_schema_accepts():
    from daskgan.config import schema
    from daskgan.config.families import FAMILIES
    from daskgan.metrics import METRICS
    from daskgan.models.biggan import ARCHITECTURES, INITS
    from daskgan.models.stylegan2 import D_ARCHITECTURES
    from daskgan.training.augment import PIPELINES
    from daskgan.training.losses import LOSSES

    assert all(callable(importlib.import_module(f"daskgan.models.{name}").build) for name in FAMILIES)
    assert set(LOSSES) == set(schema.LOSSES)
    assert set(PIPELINES) == set(schema.AUGMENT_PIPELINES)
    assert set(METRICS) == set(schema.METRICS)
    assert set(D_ARCHITECTURES) == set(schema.D_ARCHITECTURES)
    assert set(INITS) == set(schema.BIGGAN_INITS)
    assert {r: len(a[0]) for r, a in ARCHITECTURES.items()} == FAMILIES["biggan"].g_blocks


def test_the_linter_passes():
    """ruff with the project's settings (pyproject.toml: pyflakes, pycodestyle, import order, 120 columns)."""
    linted = subprocess.run([sys.executable, "-m", "ruff", "check", "daskgan", "tests", "benchmarks"],
                            cwd=PACKAGE_ROOT.parent, capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_tests_use_daskgan_through_its_public_names():
    """A test that reaches a private name pins how the code is written, not what it does."""
    reached = [f"{path.name}:{line}: {name}" for path in sorted(Path(__file__).parent.glob("*.py"))
               for line, name in _private_daskgan_names(ast.parse(path.read_text()))]
    assert not reached, reached


def _private_daskgan_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Private names a module imports from daskgan, or reads off a daskgan module it imported."""
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("daskgan") for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("daskgan"):
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if alias.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
              and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found
