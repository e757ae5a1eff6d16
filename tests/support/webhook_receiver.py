"""A webhook receiver on 127.0.0.1 for the tests; the path chooses its behaviour.

``/ok/<name>`` answers 200; ``/fail/<n>/<name>`` answers 500 the first n times, then 200;
``/gone/<name>`` answers 410; ``/hang/<name>`` never answers; ``/slow/<s>/<name>`` answers 200 after s
seconds; ``/busy/<name>`` answers 429 with Retry-After: 0 once, then 200. ``GET /_received``
lists every POST (path, headers, body) in arrival order. Prints ``PORT <n>`` once listening.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

received: list[dict[str, Any]] = []
seen: Counter[str] = Counter()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ.get("PATH_INFO", "")
    if environ["REQUEST_METHOD"] == "GET" and path == "/_received":
        data = json.dumps(received).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [data]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length).decode()
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    headers["content-type"] = environ.get("CONTENT_TYPE", "")
    received.append({"path": path, "headers": headers, "body": body, "at": time.time()})
    seen[path] += 1
    parts = path.strip("/").split("/")
    kind = parts[0]
    if kind == "fail" and seen[path] <= int(parts[1]):
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"try again"]
    if kind == "gone":
        start_response("410 Gone", [])
        return [b""]
    if kind == "hang":
        gevent.sleep(3600)
    if kind == "slow":
        gevent.sleep(float(parts[1]))
    if kind == "busy" and seen[path] == 1:
        start_response("429 Too Many Requests", [("Retry-After", "0")])
        return [b""]
    # A long answer: the sender must read only its start.
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok" * 500_000]


def main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    server = WSGIServer(listener, app, log=None)
    server.start()
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
