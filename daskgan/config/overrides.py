"""Command-line overrides of a job file: ``train.iterations=3 data.batch_size=8``.

Each is a dotted key and a value read as YAML (``3`` an integer, ``2e-4`` a number, ``[fid]`` a list, ``null``),
set in the job's mapping before the mapping is validated, so a mistyped key or a value of the wrong type gets the
same one-line error as it would in the file.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import yaml

from daskgan.errors import ConfigError


def apply_overrides(data: dict[str, Any], overrides: Sequence[str],
                    alternatives: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``data`` with each ``key=value`` of ``overrides`` set, in order (a later one wins).

    ``alternatives`` maps a key to the other form of its setting (``train.kimg``: ``train.iterations``): overriding
    one drops the file's other, so ``train.kimg=5`` replaces the file's ``iterations``; both forms given on the
    command line stay, for the job's validation to refuse as it refuses them in a file."""
    data, given = copy.deepcopy(data), set()
    for override in overrides:
        key, value = parse_override(override)
        other = (alternatives or {}).get(key)
        if other is not None and other not in given:
            _drop(data, other.split("."))
        _set(data, key.split("."), value)
        given.add(key)
    return data


def split_setting(setting: str, form: str) -> tuple[str, str]:
    """``train.lr_g=2e-4`` as its dotted key and its value's text; ``form`` names the shape expected (``an override
    is KEY=VALUE ...``) in the one-line error for anything else."""
    key, equals, text = setting.partition("=")
    if not equals or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{setting}: {form}")
    return key, text


def parse_override(override: str) -> tuple[str, Any]:
    """``train.lr_g=2e-4`` as its dotted key and its value parsed as YAML."""
    key, text = split_setting(override, "an override is KEY=VALUE with a dotted key, e.g. train.iterations=3")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: the value {text!r} is not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _drop(data: dict[str, Any], parts: list[str]) -> None:
    """Remove the dotted path ``parts`` where it is set."""
    for part in parts[:-1]:
        data = data.get(part)
        if not isinstance(data, dict):
            return
    data.pop(parts[-1], None)


def _set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``value`` at the dotted path ``parts``, making the mappings on the way (a null section counts as none)."""
    section = data
    for depth, part in enumerate(parts[:-1]):
        inner = section.get(part)
        if inner is None:
            inner = section[part] = {}
        if not isinstance(inner, dict):
            where = ".".join(parts[:depth + 1])
            raise ConfigError(f"{'.'.join(parts)}: {where} is {inner!r}, not a mapping of settings")
        section = inner
    section[parts[-1]] = value
