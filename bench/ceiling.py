"""The ceiling: the same stack (Bottle on gevent's WSGI server, TCP_NODELAY, one process) answering
constants without doing anything. Prints ``PORT <n>`` once listening."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from bottle import Bottle, HTTPResponse, request  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_proxy.web.httpserver import make_listener, make_server  # noqa: E402

ACCEPTED = json.dumps(
    {"request_id": "chatreq_" + "x" * 24, "status": "pending", "queue_position": 1, "active_requests": 0}
)
STATUS = json.dumps(
    {
        "request_id": "chatreq_" + "x" * 24,
        "status": "completed",
        "request": {},
        "timestamp": 0,
        "response": {"object": "chat.completion", "choices": []},
    }
)


def main() -> None:
    app = Bottle()

    @app.post("/v1/chat/completions")
    def submit() -> HTTPResponse:
        # Read as the service reads it: a body left unread closes the connection.
        request.body.read()
        return HTTPResponse(body=ACCEPTED, status=202, headers={"Content-Type": "application/json"})

    @app.get("/v1/chat/completions/<request_id>")
    def status(request_id: str) -> HTTPResponse:
        return HTTPResponse(body=STATUS, status=200, headers={"Content-Type": "application/json"})

    listener = make_listener("127.0.0.1", 0)
    server = make_server(listener, app)
    server.start()
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
