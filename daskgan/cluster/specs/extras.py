"""The optional backends (``pip install 'daskgan[k8s]'``, ``[cloud]``): imported on first use, so a spec of another
kind runs without them, and a missing one is named with the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from daskgan.errors import MissingExtra


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """``module``, else MissingExtra: ``what`` (e.g. ``kind: ec2``) needs the pip extra ``extra``, which installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs the '{extra}' extra: pip install '<daskgan checkout>[{extra}]' "
                           f"({exc})") from exc
