"""A fault-injecting HTTP proxy on loopback in front of the S3 server: S3 as it behaves under load.

A configurable share of requests (optionally only GETs of objects) is answered with ``503 SlowDown`` or
``500 InternalError`` (S3's XML error bodies), has its connection reset, or is delayed; the rest is forwarded to
the real server unchanged; or chosen objects fail their first GETs (``fail_first``). Counts of each outcome and of
each HTTP method are kept for the test's figures, the most requests it had in flight at once
(``counts["most in flight"]``), and the object GETs in the order they came with what each was answered
(``object_gets``).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>fault-proxy</RequestId></Error>')
ERRORS = {503: ("SlowDown", "Please reduce your request rate."),
          500: ("InternalError", "We encountered an internal error. Please try again.")}


@dataclass
class Faults:
    """What share of requests fail and how; ``only_object_gets`` limits faults to GETs of objects (not listings)."""

    error_share: float = 0.0  # answered 503 or 500
    reset_share: float = 0.0  # connection closed without an answer
    delay_share: float = 0.0  # answered after ``delay_s``
    delay_s: float = 0.5
    only_object_gets: bool = False
    fail_first: dict[str, int] = field(default_factory=dict)  # object path -> its first GETs answered 500
    seed: int = 0
    counts: Counter = field(default_factory=Counter)
    object_gets: list[tuple[str, str | int]] = field(default_factory=list)  # (path, outcome), in arrival order


class FaultProxy:
    """``with FaultProxy(target_url, Faults(...)) as proxy: ... proxy.endpoint_url ...``"""

    def __init__(self, target_url: str, faults: Faults):
        target = urlparse(target_url)
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out as two writes: with Nagle's algorithm on, the client's delayed ACK held
            # the body back ~40 ms per request (measured: 7 ms a GET direct, 52 ms through the proxy)
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy._in_flight += 1
                    proxy.faults.counts["most in flight"] = max(proxy.faults.counts["most in flight"],
                                                                 proxy._in_flight)
                try:
                    self._forward_or_fail()
                finally:
                    with proxy._lock:
                        proxy._in_flight -= 1

            def _forward_or_fail(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._choose(self.command, self.path)
                proxy.faults.counts[fault or "forwarded"] += 1
                if self.command == "GET" and "?" not in self.path:
                    proxy.faults.object_gets.append((self.path, fault or "forwarded"))
                proxy.faults.counts[self.command] += 1
                if self.headers.get("Range"):
                    proxy.faults.counts[f"ranged {self.command}"] += 1
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in (503, 500):
                    self._answer(fault, ERROR_BODY.format(code=ERRORS[fault][0], message=ERRORS[fault][1]).encode(),
                                 {"Content-Type": "application/xml"})
                    return
                if fault == "delay":
                    time.sleep(proxy.faults.delay_s)
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                skip = {"transfer-encoding", "connection", "content-length"}
                self._answer(response.status, data, {k: v for k, v in response.getheaders() if k.lower() not in skip},
                             head=self.command == "HEAD", length=response.getheader("Content-Length"))
                connection.close()

            def _answer(self, status: int, data: bytes, headers: dict, head: bool = False,
                        length: str | None = None) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", length if head and length is not None else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client that gave up on its request
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _choose(self, method: str, path: str) -> str | int | None:
        faults = self.faults
        is_object_get = method == "GET" and "?" not in path
        if faults.only_object_gets and not is_object_get:
            return None
        with self._lock:
            if is_object_get and faults.fail_first.get(path.lstrip("/"), 0) > 0:
                faults.fail_first[path.lstrip("/")] -= 1
                return 500
            roll = self._random.random()
            status = self._random.choice([503, 500])
        if roll < faults.error_share:
            return status
        if roll < faults.error_share + faults.reset_share:
            return "reset"
        if roll < faults.error_share + faults.reset_share + faults.delay_share:
            return "delay"
        return None

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
