"""The HTTP server the web process runs: gevent's WSGI server with deadlines on request heads and
idle connections, JSON errors for what gevent answers itself, and a cap on connections below the
open-files limit."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import resource
import socket
import time
from email.utils import formatdate
from typing import Any

import gevent
import gevent.pool
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler, WSGIServer

from llm_proxy.api.http import SECURITY_HEADERS, WSGIApp, error_payload

log = logging.getLogger("llm_proxy.server")

HEADER_TIMEOUT = 10.0
"""Seconds a connection gets to send a whole request head, from its accept (on a kept-alive
connection, from the head's first byte). A real client sends its head at once; without a deadline,
slow-loris clients each hold a descriptor for ever."""

KEEPALIVE_TIMEOUT = 75.0
"""Seconds a kept-alive connection may sit idle between requests: longer than the 60 s idle timeout
of common load balancers (AWS ALB), so a proxy in front never reuses a connection we are closing."""

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
"""After an error answer to a request whose input was not read to its end: closing a socket with
unread input makes the kernel send a reset, which can destroy the answer before the client reads it,
so what the client still sends is read out first, for this long and this much at most."""

FD_RESERVE = 128
"""Descriptors kept free of client connections for the back end (SQLite files, database and worker
sockets, metrics files), so that a flood of connections never makes accept or the store fail with
EMFILE."""

ACCEPT_PAUSE = 0.1
"""Seconds accepting pauses after accept fails for want of descriptors, instead of spinning on a
listener that stays readable."""

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def make_listener(host: str, port: int) -> socket.socket:
    """A listening socket with TCP_NODELAY, which accepted sockets inherit: without it gevent's
    server writes headers and body separately and a keep-alive client stalls ~40 ms on each."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.setblocking(False)
    return listener


class QuietHandler(WSGIHandler):  # type: ignore[misc]
    """No access log: pywsgi formats each line even when it has nowhere to write it."""

    def log_request(self) -> None:
        pass


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _error_parts(status: int) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, headers and JSON body of an error the HTTP layer answers itself, in the API's
    error form and with the headers the app's own answers carry."""
    message, kind = {
        400: ("The request is not valid HTTP/1.1.", "invalid_request_error"),
        408: (f"The request head did not arrive within {HEADER_TIMEOUT:g} s.", "request_timeout"),
        414: (f"The request line is longer than {MAX_REQUEST_LINE} bytes.", "uri_too_long"),
        431: ("The request headers are too large.", "headers_too_large"),
    }.get(status, (None, None))
    body = json.dumps(error_payload(status, message, kind)).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *SECURITY_HEADERS,
    ]
    return f"{status} {_REASONS.get(status, 'Error')}", headers, body


class _SettledInput:
    """Stands in for a request body once the handler has decided about it: gevent's own discard
    would read an unread body to its end with no deadline."""

    def _discard(self) -> None:
        pass


_SETTLED = _SettledInput()


class _UnsupportedCoding(ValueError):
    pass


class GuardedHandler(QuietHandler):
    """Deadlines for request heads and idle kept-alive connections, and the API's JSON error form
    for the errors gevent answers itself (bad request line or headers, too long a request line)."""

    server: GuardedServer
    wsgi_input: Any

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        super().__init__(sock, address, server, rfile)
        self._accepted_at = time.monotonic()
        self._requests = 0
        self._head_timer: gevent.Timeout | None = None
        self._unread_input = False

    def handle_one_request(self) -> Any:
        try:
            result = super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not self._head_timer:
                raise
            log.info("request head from %s incomplete after %g s", self._peer(), HEADER_TIMEOUT)
            result = ("408", b"")
        finally:
            self._stop_head_timer()
        self._requests += 1
        if isinstance(result, tuple):
            self._refuse(int(result[0]))
            return None
        if result is None and self._unread_input:
            self._linger()
        return result

    def read_requestline(self) -> str:
        if self.server.closed:
            return ""  # shutting down: no new request on a kept-alive connection
        if self._requests == 0:
            deadline = self._accepted_at + HEADER_TIMEOUT
            if not self._wait_for_input(deadline - time.monotonic()):
                return ""
        else:
            if not self._wait_for_input(KEEPALIVE_TIMEOUT):
                return ""
            deadline = time.monotonic() + HEADER_TIMEOUT
        # Raised wherever the head is being read; handle_one_request turns it into a 408.
        self._head_timer = gevent.Timeout(max(deadline - time.monotonic(), 0.001))
        self._head_timer.start()
        return str(super().read_requestline())

    def read_request(self, raw_requestline: str) -> bool:
        try:
            parsed = bool(super().read_request(raw_requestline))
        finally:
            self._stop_head_timer()
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None and coding.lower() != "chunked":
            # gevent would read such a body as empty and the rest as the next request.
            raise _UnsupportedCoding(f"Transfer-Encoding {coding!r}")
        return parsed

    def run_application(self) -> None:
        try:
            super().run_application()
        finally:
            stream = self.wsgi_input
            self.wsgi_input = _SETTLED
            if not _input_consumed(stream):
                # A body the app left unread (an early 4xx) or could not read: close rather than
                # read it out, which a client could drag on for ever.
                self.close_connection = True
                self._unread_input = True

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not _input_consumed(self.wsgi_input) and all(name.lower() != "connection" for name, _ in headers):
            # run_application will close the connection: say so, so the client does not reuse it.
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        # gevent prints a traceback for errors that are not ValueErrors (http.client's header
        # limits); a malformed request is the client's fault, worth a line, not a traceback.
        log.info("malformed request from %s: %s", self._peer(), str(ex)[:200] or type(ex).__name__)
        self._unread_input = True
        # More than 100 header lines raise; a line over 64 KiB is marked on the parsed headers.
        too_large = isinstance(ex, http.client.HTTPException) or self.headers.status == "Line too long"
        return ("431" if too_large else "400", b"")

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self.response_length:
            self.close_connection = True
            return
        status, headers, body = _error_parts(error_code)
        try:
            self.start_response(status, headers)
            self.write(body)
        except OSError:
            self.close_connection = True

    def _wait_for_input(self, seconds: float) -> bool:
        """Whether a request starts within ``seconds``. Meanwhile the connection is idle, and the
        server may close it to make room for a new one."""
        if seconds <= 0:
            return False
        self.server.idle[self] = None
        try:
            with gevent.Timeout(seconds, False):
                return bool(self.rfile.peek(1))
            return False
        except (OSError, ValueError):
            return False
        finally:
            self.server.idle.pop(self, None)

    def _refuse(self, status: int) -> None:
        line, headers, body = _error_parts(status)
        head = "".join(
            f"{name}: {value}\r\n" for name, value in [("Date", formatdate(usegmt=True)), *headers]
        )
        try:
            with gevent.Timeout(LINGER_SECONDS, False):
                self.socket.sendall(f"HTTP/1.1 {line}\r\n{head}\r\n".encode("latin-1") + body)
        except OSError:
            return
        self._linger()

    def _linger(self) -> None:
        sock = self.socket
        self.server.idle[self] = None  # the first to go when room is needed
        try:
            sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(LINGER_SECONDS, False):
                left = LINGER_BYTES
                while left > 0:
                    data = sock.recv(min(65536, left))
                    if not data:
                        break
                    left -= len(data)
        except OSError:
            pass
        finally:
            self.server.idle.pop(self, None)

    def abandon(self) -> None:
        """Close an idle connection from outside: its reads end as if the client had closed."""
        with contextlib.suppress(OSError, AttributeError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def _stop_head_timer(self) -> None:
        # Kept after it is stopped: handle_one_request tells it apart from other timeouts.
        if self._head_timer is not None:
            self._head_timer.close()

    def _peer(self) -> str:
        address = self.client_address
        return str(address[0]) if isinstance(address, tuple) and address else str(address)


def _input_consumed(stream: Any) -> bool:
    if stream is None or isinstance(stream, _SettledInput):
        return True
    if stream.chunked_input:
        return bool(stream.chunk_length == 0)
    return bool(stream.position >= (stream.content_length or 0))


class _ConnectionPool(gevent.pool.Pool):  # type: ignore[misc]
    """At most ``size`` connections; when full, the server is asked to make room."""

    def __init__(self, size: int, make_room: Any) -> None:
        super().__init__(size)
        self._make_room = make_room

    def full(self) -> bool:
        if super().full():
            self._make_room()
            return True
        return False


class GuardedServer(WSGIServer):  # type: ignore[misc]
    """A WSGIServer that never takes more connections than it has descriptors for: when full, it
    closes the connection that has been idle longest (as nginx reuses keep-alive connections) so a
    new one gets in, and a failing accept pauses instead of spinning."""

    def __init__(self, listener: socket.socket, app: WSGIApp, max_connections: int) -> None:
        self.idle: dict[GuardedHandler, None] = {}
        """Connections waiting for a request or lingering, oldest first."""
        self._warned_at = -1e9
        super().__init__(
            listener,
            app,
            spawn=_ConnectionPool(max_connections, self.shed_idle),
            log=None,
            error_log=logging.getLogger("llm_proxy.pywsgi"),
            handler_class=GuardedHandler,
        )
        self.max_connections = max_connections

    def shed_idle(self) -> None:
        oldest = next(iter(self.idle), None)
        if oldest is None:
            self._warn("all %d connection slots are busy: new connections wait", self.max_connections)
            return
        del self.idle[oldest]
        self._warn("%d connections open: closing the longest idle ones", self.max_connections)
        oldest.abandon()

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            self._warn("cannot accept a connection: %s", exc.strerror)
        self.shed_idle()
        self.stop_accepting()
        gevent.spawn_later(ACCEPT_PAUSE, self._resume_accepting)
        return None

    def _resume_accepting(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close idle connections (a kept-alive client must not hold shutdown up)
        and give requests in flight ``timeout`` seconds. Unlike gevent's, it kills none: requests
        still running go on while the worker drains, as they did before connections were pooled."""
        self.close()
        for handler in list(self.idle):
            handler.abandon()
        self.pool.join(timeout=self.stop_timeout if timeout is None else timeout)

    def _warn(self, message: str, *args: Any) -> None:
        # Once in a while: under a flood this would otherwise be a line per connection.
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning(message, *args)


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (Linux often starts processes at 1,024);
    the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # macOS refuses an unlimited hard limit
            log.warning("cannot raise the open files limit from %d: %s", soft, exc)
    return soft


def connection_limit(open_files: int) -> int:
    if open_files == resource.RLIM_INFINITY:
        open_files = 1 << 20
    return max(open_files // 2, open_files - FD_RESERVE)


def make_server(listener: socket.socket, app: WSGIApp) -> WSGIServer:
    open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return GuardedServer(listener, app, connection_limit(open_files))
