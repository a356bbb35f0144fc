"""``kind: scheduler``: connect to a Dask scheduler that is already running at ``address`` (with distributed's TLS
for a tls:// one). Every backend's running cluster is reached this way once its scheduler's address is known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from daskgan.config import ConfigError
from daskgan.errors import SchedulerUnreachable


@dataclass
class SchedulerSpec:
    address: str
    connect_timeout_s: float = 30.0  # how long to keep trying to reach the scheduler
    # a tls:// scheduler's CA and this client's certificate and key (PEM files, e.g. those of the cluster's Secret);
    # none: Dask's own settings (distributed.comm.tls.*, as DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...)
    tls_ca_file: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    def validate(self) -> None:
        files = {"tls_ca_file": self.tls_ca_file, "tls_cert": self.tls_cert, "tls_key": self.tls_key}
        given = [name for name, value in files.items() if value]
        if given and not self.address.startswith("tls://"):
            raise ConfigError(f"scheduler.{given[0]}: given, but scheduler.address is {self.address}: "
                              "a scheduler with TLS has a tls:// address")
        if given and len(given) < len(files):
            raise ConfigError(f"scheduler.{', '.join(sorted(set(files) - set(given)))}: needed with "
                              f"scheduler.{given[0]} (distributed's TLS checks both sides' certificates)")


def render(settings: SchedulerSpec) -> dict[str, Any]:
    """What the client is given: the scheduler's address."""
    return {"address": settings.address}


def connect(settings: SchedulerSpec) -> "distributed.Client":  # noqa: F821
    """A Client of the scheduler at ``settings.address`` (a context manager, as the other backends' ``connect``)."""
    from distributed import Client

    security = _scheduler_security(settings)
    try:
        return Client(settings.address, timeout=settings.connect_timeout_s, security=security)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachable(
            f"scheduler.address: no Dask scheduler answered at {settings.address} within "
            f"{settings.connect_timeout_s:.0f}s: is it running, and reachable from here?") from exc


def running_scheduler(settings: SchedulerSpec, cluster_name: Optional[str] = None) -> SchedulerSpec:
    """The scheduler of a running cluster of this spec: the spec's own (``cluster_name`` names none here)."""
    return settings


def _scheduler_security(settings: SchedulerSpec) -> Optional["distributed.Security"]:  # noqa: F821
    """The client's side of a tls:// scheduler: the spec's files, else Dask's own TLS settings (None: Dask's)."""
    import dask
    from distributed.security import Security

    if settings.tls_ca_file:
        return Security(tls_ca_file=settings.tls_ca_file, tls_client_cert=settings.tls_cert,
                        tls_client_key=settings.tls_key, require_encryption=True)
    if settings.address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", default=None):
        raise ConfigError("scheduler.address: a tls:// scheduler needs its CA and a client certificate: set "
                          "scheduler.tls_ca_file, tls_cert and tls_key (or Dask's distributed.comm.tls settings)")
    return None
