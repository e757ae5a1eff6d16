"""Load generators for the benchmark: wrk when the machine has it, else a gevent keep-alive client.

Both run the same way against the service and against its ceiling, so their ratio is fair.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    bad: int = 0
    """Answers with another status than expected, plus connection errors."""
    tool: str = "gevent"

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


class Connection:
    """A minimal HTTP/1.1 keep-alive client: little enough Python that the server stays the bottleneck."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        self.buffer = rest[length:]
        return status, rest[:length]

    def close(self) -> None:
        self.sock.close()


def build_request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def gevent_load(port: int, raw: bytes, *, concurrency: int, duration: float, expect: int) -> LoadResult:
    latencies: list[float] = []
    bad = 0
    deadline = time.monotonic() + duration

    def client() -> None:
        nonlocal bad
        connection = Connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status, _ = connection.request(raw)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != expect:
                    bad += 1
        finally:
            connection.close()

    started = time.monotonic()
    gevent.joinall([gevent.spawn(client) for _ in range(concurrency)], raise_error=True)
    seconds = time.monotonic() - started
    return LoadResult(
        requests=len(latencies),
        seconds=seconds,
        latencies_ms=latencies,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        bad=bad,
    )


_WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = {body}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"errors\\":%d,\\"bad_status\\":%d}}\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None and os.environ.get("BENCH_CLIENT", "") != "gevent"


def wrk_load(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    concurrency: int,
    duration: float,
) -> LoadResult:
    script = _WRK_SCRIPT.format(
        method=method,
        body=json.dumps(body.decode()),
        headers="\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        output = subprocess.run(
            [
                "wrk",
                "-t",
                "2",
                "-c",
                str(concurrency),
                "-d",
                f"{max(1, round(duration))}s",
                "--latency",
                "-s",
                handle.name,
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(handle.name)
    line = next(ln for ln in output.splitlines() if ln.startswith("JSON "))
    data: dict[str, Any] = json.loads(line[5:])
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        bad=data["errors"] + data["bad_status"],
        tool="wrk",
    )


def load(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    concurrency: int,
    duration: float,
    expect: int,
) -> LoadResult:
    """Drive ``concurrency`` keep-alive connections for ``duration`` seconds."""
    if wrk_available():
        return wrk_load(port, method, path, headers, body, concurrency=concurrency, duration=duration)
    raw = build_request(method, path, headers, body)
    return gevent_load(port, raw, concurrency=concurrency, duration=duration, expect=expect)


def submit_many(
    port: int, bodies: list[bytes], headers: dict[str, str], *, concurrency: int
) -> list[tuple[str, float]]:
    """Submit every body (keep-alive, ``concurrency`` connections); returns (request_id, time of 202)."""
    results: list[tuple[str, float]] = [("", 0.0)] * len(bodies)
    indexes = iter(range(len(bodies)))

    def client() -> None:
        connection = Connection("127.0.0.1", port)
        try:
            for index in indexes:
                raw = build_request("POST", "/v1/chat/completions", headers, bodies[index])
                status, payload = connection.request(raw)
                if status != 202:
                    raise RuntimeError(f"submit answered {status}: {payload[:200]!r}")
                results[index] = (json.loads(payload)["request_id"], time.time())
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(client) for _ in range(min(concurrency, len(bodies)))], raise_error=True)
    return results
