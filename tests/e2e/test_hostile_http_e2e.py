"""Hostile HTTP against the real service, over raw sockets: malformed bodies and heads get a JSON 4xx
(never a 500 or a traceback), slow and silent connections are closed, and running out of descriptors
does not stop the service from answering."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from conftest import API_KEY, ROOT, Service, body, wait_until

MakeService = Callable[..., Service]

SUBMIT_HEAD = (
    "POST /v1/chat/completions HTTP/1.1\r\n"
    "Host: 127.0.0.1\r\n"
    f"X-API-Key: {API_KEY}\r\n"
    "Content-Type: application/json\r\n"
)
CHUNKED_HEAD = (SUBMIT_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
VALID = json.dumps(body("hostile")).encode()

# Short enough for a test that waits them out, long enough for a loaded machine to send a head at once.
SHORT_HEADER_TIMEOUT = 1.0
SHORT_KEEPALIVE_TIMEOUT = 2.5
SHORTENED = (
    "from gevent import monkey; monkey.patch_all()\n"
    "import runpy, sys\n"
    "import llm_proxy.web.httpserver as server\n"
    f"server.HEADER_TIMEOUT = {SHORT_HEADER_TIMEOUT}\n"
    f"server.KEEPALIVE_TIMEOUT = {SHORT_KEEPALIVE_TIMEOUT}\n"
    "sys.argv = ['app.py']\n"
    "runpy.run_path('app.py', run_name='__main__')\n"
)


def start_web(
    service: Service, command: list[str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> None:
    """Like ``Service.start``, with a command or a pre-exec hook of the test's own."""
    with open(service.log_path, "ab") as log:
        service.process = subprocess.Popen(
            command or [sys.executable, "app.py"],
            cwd=ROOT,
            env=service.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    wait_until(service.healthy, timeout=20)


def connect(service: Service, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=timeout)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset after the answer, which
    a close with unread input can cause, counts as a close)."""
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def read_response(sock: socket.socket) -> bytes:
    """One whole answer (head and Content-Length body) from a connection that stays open."""
    received = b""
    while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < int(
        parse(received)[1].get("content-length", "0")
    ):
        data = sock.recv(65536)
        assert data, received
        received += data
    return received


def exchange(service: Service, payload: bytes, half_close: bool = False) -> bytes:
    with connect(service) as sock:
        # The server may answer and close before reading all of it: the answer still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_to_end(sock)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), raw[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def assert_json_error(raw: bytes, status: int) -> dict[str, object]:
    code, headers, rest = parse(raw)
    assert code == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff"
    length = int(headers["content-length"])
    error = json.loads(rest[:length])["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


@pytest.fixture
def service(make_service: MakeService) -> Iterator[Service]:
    yield make_service()


MALFORMED_BODIES: dict[str, tuple[bytes, bool]] = {
    "non-hex chunk size": (CHUNKED_HEAD + b"zz\r\n" + VALID + b"\r\n0\r\n\r\n", False),
    "chunk size over 64 bits": (CHUNKED_HEAD + b"FFFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n", False),
    "negative chunk size": (CHUNKED_HEAD + b"-5\r\n{}\r\n0\r\n\r\n", False),
    "chunk without its CRLF": (
        CHUNKED_HEAD + f"{len(VALID):x}\r\n".encode() + VALID + b"XX0\r\n\r\n",
        False,
    ),
    "100 KB chunk extension": (CHUNKED_HEAD + b"2;" + b"e" * 100_000 + b"\r\n{}\r\n0\r\n\r\n", False),
    "100 KB trailer": (CHUNKED_HEAD + b"2\r\n{}\r\n0\r\nX-Trailer: " + b"t" * 100_000 + b"\r\n\r\n", False),
    "body shorter than Content-Length, then half-close": (
        (SUBMIT_HEAD + f"Content-Length: {len(VALID) + 50}\r\n\r\n").encode() + VALID,
        True,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
def test_malformed_body_is_a_json_400_and_closes(service: Service, case: str) -> None:
    payload, half_close = MALFORMED_BODIES[case]
    error = assert_json_error(exchange(service, payload, half_close), 400)
    assert error["type"] == "validation_error"
    # The service is unharmed, and nothing was queued or logged as a crash.
    assert service.submit(body("after")).status_code == 202
    log = service.log()
    assert "Traceback" not in log and "Internal" not in log


def test_server_level_errors_are_json(service: Service) -> None:
    long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_json_error(exchange(service, long_line), 414)

    huge_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 70_000 + b"\r\n\r\n"
    assert assert_json_error(exchange(service, huge_header), 431)["type"] == "headers_too_large"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert_json_error(exchange(service, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"), 431)

    assert_json_error(exchange(service, b"NONSENSE\r\n\r\n"), 400)
    assert_json_error(exchange(service, b"GET / HTTP/7.5\r\nHost: x\r\n\r\n"), 400)
    # A transfer coding other than chunked would leave its body to be read as the next request.
    smuggled = (SUBMIT_HEAD + "Transfer-Encoding: gzip, chunked\r\n\r\n").encode() + b"2\r\n{}\r\n0\r\n\r\n"
    assert_json_error(exchange(service, smuggled), 400)

    assert service.healthy()
    assert "Traceback" not in service.log()


def test_body_left_unread_closes_the_connection(service: Service) -> None:
    """A 401 answered before the body is read: the connection closes rather than waiting for a body
    that may never come."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
    with connect(service) as sock:
        sock.sendall(head)
        code, headers, _ = parse(read_to_end(sock))
    assert code == 401
    assert headers["connection"] == "close"


def test_silent_partial_and_dripping_connections_are_closed(make_service: MakeService) -> None:
    service = make_service(start=False)
    start_web(service, [sys.executable, "-c", SHORTENED])
    deadline = SHORT_HEADER_TIMEOUT + 2.0

    with connect(service, timeout=deadline + 3) as silent, connect(service) as partial:
        partial.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        assert read_to_end(silent) == b""
        assert time.monotonic() - started < deadline
        assert_json_error(read_to_end(partial), 408)

    # One byte at a time keeps every read short; the head's deadline still ends it.
    with connect(service) as drip:
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200:
            try:
                drip.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > deadline:
                break
        if not closed:
            raw = read_to_end(drip)
            assert raw == b"" or parse(raw)[0] == 408
        assert time.monotonic() - started < deadline + 1

    # A kept-alive connection outlives the header timeout, then is closed once idle long enough.
    with connect(service, timeout=SHORT_KEEPALIVE_TIMEOUT + 5) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert read_to_end(kept) == b""
        idle = time.monotonic() - started
        assert SHORT_KEEPALIVE_TIMEOUT - 1.5 < idle < SHORT_KEEPALIVE_TIMEOUT + 3
    assert service.healthy()
    assert "Traceback" not in service.log()


def limit_open_files(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


@contextmanager
def idle_connections(service: Service, count: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(service)) for _ in range(count)]
        yield sockets


def test_many_idle_connections_do_not_starve_the_service(make_service: MakeService) -> None:
    service = make_service(start=False)
    # The web process raises its soft limit to the hard one: 200 -> 256.
    start_web(service, preexec_fn=limit_open_files(200, 256))
    assert service.process is not None
    limits = Path(f"/proc/{service.process.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
        ["256", "256"]
    ]

    with idle_connections(service, 300):
        started = time.monotonic()
        assert requests.get(service.url + "/health", timeout=5).status_code == 200
        reply = service.submit(body("through the crowd"))
        assert reply.status_code == 202
        assert time.monotonic() - started < 5
    assert service.wait_final(reply.json()["request_id"])["status"] == "completed"
    log = service.log()
    assert "Traceback" not in log and "Too many open files" not in log
