"""The credential policy: secrets are referenced (``${ENV_VAR}``), never written into a job or cluster file.

A job travels inside pickled Dask tasks, its config is stored in the run directory and in every checkpoint, so a
plain secret there would leak. References are resolved where the storage is opened (on the worker), from that
process's environment; anything stored or logged is redacted first.

A secret is recognised by where it sits: an option named as one (a key, a token, an Azure connection string or
credential, at any depth), a header that carries authorisation (under any ``headers``), or a password or a signed
query inside a URL (``https://user:password@host``, ``?X-Amz-Signature=``, in any option).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlsplit

from daskgan.errors import ConfigError, StorageAccessError

SECRET_OPTION_NAMES = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "session_token", "account_key", "sas_token", "client_secret", "connection_string", "credential",
     "credentials"}
)
SECRET_HEADER = re.compile(r"auth|cookie|token|secret|key|signature|credential", re.IGNORECASE)
SECRET_QUERY = re.compile(r"signature|credential|token|secret|password|^sig$|^(api|access)?[-_]?key$|^auth",
                          re.IGNORECASE)  # query parameters of presigned URLs (S3, GCS), Azure SAS, API keys
REDACTED = "***"
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def check_no_plain_secrets(options: dict, key: str) -> None:
    """Refuse credentials written into a job: the job travels inside pickled Dask tasks, so only references do.

    A secret option must be a reference such as ``${MY_SECRET}``, resolved from the environment of the machine
    that opens the storage (``resolve_references`` below, called by ``daskgan.run.storage``).
    """
    for where, value in _leaves(options, key):
        if _names_a_secret(where) and value is not None and not ENV_REFERENCE.match(str(value)):
            raise ConfigError(f"{where}: a plain credential in a job file would travel inside the task graph; "
                              f"write ${{ENV_VAR}} to read it from the workers' environment, or use a profile or "
                              f"the machine's role")


def check_no_url_credentials(job: dict) -> None:
    """Refuse a URL holding a password (``https://user:password@host``) or a signed query (a presigned URL's
    ``X-Amz-Signature``/``X-Amz-Security-Token``, an Azure SAS ``sig``, an ``access_token``) anywhere in a job:
    it would be stored in the run directory and every checkpoint, whatever the option is called."""
    for where, value in _leaves(job, ""):
        what = _url_credential(value) if isinstance(value, str) else None
        if what is None:
            continue
        where = where.lstrip(".")
        instead = ("write the whole URL as ${ENV_VAR} to read it from the workers' environment"
                   if ".storage_options." in f".{where}" else
                   "give the URL without it and the credential in storage_options as ${ENV_VAR}")
        raise ConfigError(f"{where}: a URL with {what} in a job file would travel inside the task graph; {instead}")


def redact(options: dict, key: str = "") -> dict:
    """Copy of ``options`` with secret values (keys, tokens, passwords, auth headers) replaced, at any depth."""
    out = {}
    for name, value in options.items():
        where = f"{key}.{name}"
        if isinstance(value, dict):
            out[name] = redact(value, where)
        elif _names_a_secret(where) and value is not None:
            out[name] = REDACTED
        else:
            out[name] = value
    return out


def _leaves(options: Mapping | list, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value in ``options`` that is neither a mapping nor a list, at any depth."""
    items = options.items() if isinstance(options, Mapping) else enumerate(options)
    for name, value in items:
        where = f"{key}.{name}"
        if isinstance(value, (Mapping, list)):
            yield from _leaves(value, where)
        else:
            yield where, value


def _names_a_secret(where: str) -> bool:
    """Whether the option at dotted key ``where`` holds a credential: by its name or the name of an option holding
    it (gcsfs' ``token`` may be a service account's whole key file: ``token.private_key``), or as an auth header."""
    *parents, name = where.split(".")
    in_headers = bool(parents) and parents[-1].lower() == "headers"
    return (any(part.lower() in SECRET_OPTION_NAMES for part in (*parents, name))
            or (in_headers and bool(SECRET_HEADER.search(name))))


def _url_credential(value: str) -> str | None:
    """What credential the URL ``value`` holds (``a password``, ``the query parameter X-Amz-Signature``), or
    None for a URL without one, or a value that is no URL."""
    try:
        parts = urlsplit(value.strip())
        if "@" in parts.netloc and parts.password is not None:
            return "a password"
    except ValueError:  # not a URL at all
        return None
    if not parts.scheme or not parts.query:
        return None
    secret = next((name for name, _ in parse_qsl(parts.query, keep_blank_values=True)
                   if SECRET_QUERY.search(name)), None)
    return None if secret is None else f"the query parameter {secret}"


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
