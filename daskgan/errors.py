"""Errors that mean "what you asked for or gave cannot be used", as opposed to bugs.

The command line prints such an error as one line (``daskgan: <message>``) and exits with status 2, with no
traceback unless ``--debug``; so each message names the input (key, URL, option) and says what to do. They keep
the built-in base a caller would expect (``FileNotFoundError``, ``PermissionError``, ``ValueError``), so code that
catches those still does. Errors raised on a worker reach the client unchanged through ``dispatch.results``.
``InfrastructureError`` is neither the input's mistake nor a bug: what the run stands on failed for longer than
its retries (storage down); the driver restarts the run from its newest checkpoint rather than fail it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input: printed as one line by the command line."""


class ConfigError(UserError, ValueError):
    """A job or cluster file that cannot be used; the message names the offending key."""


class RequestError(UserError, ValueError):
    """A request the model cannot serve: a class out of range, truncation for a model without it."""


class MissingExtra(UserError, ImportError):
    """A cluster backend whose optional dependency is not installed."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint made for a different model than the job asks for."""


class CheckpointUnreadable(UserError, ValueError):
    """A file that is not a daskgan checkpoint (another tool's pickle, a truncated upload)."""


class UnsafePickle(CheckpointUnreadable):
    """A pickle that asks to import something other than tensors and plain containers: refused unrun."""


class ChecksumMismatch(UserError, ValueError):
    """A file that must be one known file (NVlabs' Inception) but whose sha256 differs: refused unloaded, since
    loading it would run whatever code it holds."""


class NotFound(UserError, FileNotFoundError):
    """A URL, bucket, file or dataset that does not exist (or holds nothing usable)."""


class StorageAccessError(UserError, PermissionError):
    """Storage refused the request: credentials missing, wrong or expired, or not allowed to do this."""


class InfrastructureError(ConnectionError):
    """What the run stands on failed beyond its retries, not the run or its input: the driver restarts the run
    from its newest checkpoint (``recovery.max_restarts``, with growing waits); the command line prints one
    line."""


class StorageUnavailable(InfrastructureError):
    """Storage kept failing transiently (throttling, server errors, resets) beyond the retry bounds."""


class DeviceError(UserError, RuntimeError):
    """Workers and GPUs that do not pair up one to one."""


class SchedulerUnreachable(UserError, ConnectionError):
    """No Dask scheduler answered at the address of a cluster spec."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (botocore and torch messages can run over several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
