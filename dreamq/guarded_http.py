"""HTTP that reaches only what the outbound guard allowed, in bounded time (reliability R16-R18).

Used by the worker's input fetcher and the webhook dispatcher.

`PinnedBackend` is an httpcore network backend. When httpcore opens a connection it resolves the
host once, refuses (`BlockedUrl`) unless every address is allowed, and then connects to those
validated addresses itself, never to the name: a second lookup that answers differently (DNS
rebinding, R17) never happens. The request still names the host: httpx sends it in the Host
header, and httpcore hands the URL's host to TLS as the server name
(`httpcore._sync.connection.HTTPConnection._connect`: ``server_hostname=sni_hostname or
origin.host``), so certificates are verified against the host, not the address.

`Deadline` is one time budget for a whole exchange, because httpx timeouts bound each operation
(a connect, one read), not their sum.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
import typing
from collections.abc import Iterable
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import httpcore
import httpx

from dreamq.outbound import Network, Resolver, resolve_allowed, system_resolve

FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)
"""A new connection per request: a `Deadline` watches each socket from its connect, which a
pooled connection has done before the deadline existed."""


class PinnedBackend(httpcore.SyncBackend):
    """Connects only to addresses `resolve_allowed` returned for the host, in their order.

    The lookup runs in a helper thread so that the connect timeout bounds it: getaddrinfo cannot
    be interrupted, and the system resolver's own timeouts add up to tens of seconds. A lookup
    given up on finishes in the background; its thread is a daemon and its answer is dropped.
    """

    def __init__(self, allow: Iterable[Network], resolve: Resolver = system_resolve) -> None:
        self._allow = list(allow)
        self._resolve = resolve

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        end = None if timeout is None else time.monotonic() + timeout

        def lookup(name: str, number: int) -> list[str]:
            return _resolve_until(self._resolve, name, number, end)

        addresses = resolve_allowed(host, port, self._allow, lookup)
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise httpcore.ConnectTimeout("no time left to connect")
            try:
                return super().connect_tcp(address, port, left, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc  # refused or unreachable: the next validated address may answer
        assert failure is not None  # resolve_allowed never returns an empty list
        raise failure


def _resolve_until(resolve: Resolver, host: str, port: int, end: float | None) -> list[str]:
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host))]  # a literal address needs no lookup
    if end is None:
        return resolve(host, port)
    answer: Future[list[str]] = Future()

    def lookup() -> None:
        try:
            answer.set_result(resolve(host, port))
        except BaseException as exc:
            answer.set_exception(exc)

    threading.Thread(target=lookup, name="dreamq-dns", daemon=True).start()
    try:
        return answer.result(timeout=max(0.0, end - time.monotonic()))
    except TimeoutError:
        # httpcore's timeout, not an OSError: the caller must not read it as "does not resolve".
        raise httpcore.ConnectTimeout("the DNS lookup did not finish in time") from None


def pinned_transport(
    allow: Iterable[Network],
    *,
    resolve: Resolver = system_resolve,
    ssl_context: ssl.SSLContext | None = None,
    limits: httpx.Limits = FRESH_CONNECTIONS,
) -> httpx.HTTPTransport:
    """An httpx transport whose connections go through `PinnedBackend`, with no proxy.

    httpx's HTTPTransport takes no network backend, so its connection pool is replaced by one
    built with httpcore's public constructor. The one private name relied on is
    ``HTTPTransport._pool``; if an httpx release renames it, this refuses to build a transport
    rather than hand back one that would connect unchecked (and tests/unit/test_outbound.py
    fails).
    """
    # The default context honours SSL_CERT_FILE and SSL_CERT_DIR (an operator's own CA), which
    # changes whom dreamq trusts, never where it connects.
    context = ssl_context or httpx.create_ssl_context()
    transport = httpx.HTTPTransport(verify=context)
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        raise RuntimeError("httpx.HTTPTransport no longer keeps its pool in _pool")
    transport._pool.close()
    transport._pool = httpcore.ConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=PinnedBackend(allow, resolve),
    )
    return transport


class Deadline:
    """One time budget for a whole exchange: lookup, connect, every hop, headers and body.

    A server that sends a byte just before each read timeout would otherwise hold the caller for
    ever. So a timer shuts down the socket being read at the deadline, which wakes a read blocked
    in the kernel at once, and callers also check `passed` between reads. Pass `remaining` as the
    request's timeout: the connect timeout then bounds the DNS lookup (`PinnedBackend`).
    """

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            # Forget the socket first: a pooled connection may serve another exchange, which a
            # late-firing timer must not cut.
            self._socket = None
        self._timer.cancel()

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: watch the socket from the moment it connects, so the deadline
        also cuts a server that trickles its status line and headers. TLS wraps the socket in a
        new object (the plain one is detached), which is watched from then on."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.watch_stream(info.get("return_value"))

    def watch(self, response: httpx.Response) -> None:
        # absent with mock transports
        self.watch_stream(response.extensions.get("network_stream"))

    def watch_stream(self, stream: Any) -> None:
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would tear down the
            # TLS state under the reading thread's feet.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)
