"""The credential policy: secrets are referenced (``${ENV_VAR}``), never written into a job or cluster file.

A job travels inside pickled Dask tasks, its config is stored in the run directory and in every checkpoint, so a
plain secret there would leak. References are resolved where the storage is opened (on the worker), from that
process's environment; anything stored or logged is redacted first.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from daskgan.errors import ConfigError, StorageAccessError

SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "session_token", "account_key", "sas_token", "client_secret"}
)
REDACTED = "***"
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def check_no_plain_secrets(options: dict, key: str) -> None:
    """Refuse credentials written into a job: the job travels inside pickled Dask tasks, so only references do.

    A secret option must be a reference such as ``${MY_SECRET}``, resolved from the environment of the machine
    that opens the storage (see ``daskgan.storage.resolve_references``).
    """
    for name, value in options.items():
        if isinstance(value, dict):
            check_no_plain_secrets(value, f"{key}.{name}")
        elif name.lower() in SECRET_OPTION_NAMES and value is not None and not ENV_REFERENCE.match(str(value)):
            raise ConfigError(
                f"{key}.{name}: a plain credential in a job file would travel inside the task graph; write "
                f"${{ENV_VAR}} to read it from the workers' environment, or use a profile or the machine's role")


def redact(options: dict) -> dict:
    """Copy of ``options`` with secret values (keys, tokens, passwords) replaced, at any depth."""
    out = {}
    for name, value in options.items():
        if isinstance(value, dict):
            out[name] = redact(value)
        elif name.lower() in SECRET_OPTION_NAMES and value is not None:
            out[name] = REDACTED
        else:
            out[name] = value
    return out


def resolve_references(options: Mapping[str, Any]) -> dict:
    """Copy of ``options`` with every ``${NAME}`` value replaced by that environment variable of this process.

    Credentials are resolved where the storage is opened (on the worker), so the values never enter the job
    config, the task graph, logs or checkpoints.
    """
    resolved = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            resolved[name] = resolve_references(value)
            continue
        match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
        if match and match.group(1) not in os.environ:
            raise StorageAccessError(f"storage option {name!r} refers to ${{{match.group(1)}}}, which is not set in "
                                     f"the environment of this process (pid {os.getpid()}): set it where the "
                                     f"storage is opened (the workers)")
        resolved[name] = os.environ[match.group(1)] if match else value
    return resolved
