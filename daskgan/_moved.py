"""Module names from before the package was laid out by role, kept importable (``import daskgan.train``,
``from daskgan.augment import AugmentPipe``) as aliases of the modules that now hold the code."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {
    "daskgan.augment": "daskgan.training.augment",
    "daskgan.checkpoint": "daskgan.run.checkpoint",
    "daskgan.cli": "daskgan.tools.cli",
    "daskgan.generate": "daskgan.tools.generate",
    "daskgan.launch": "daskgan.cluster.driver",
    "daskgan.presets": "daskgan.config.presets",
    "daskgan.sample": "daskgan.tools.sample",
    "daskgan.storage": "daskgan.run.storage",
    "daskgan.synthetic": "daskgan.data.synthetic",
    "daskgan.train": "daskgan.training.loop",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old name with the module now holding its code (the same module object, not a copy)."""

    def __init__(self):
        self._real_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_specs.pop(module.__spec__.name)  # the import system set the alias's spec


def install() -> None:
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
