"""A fake OpenAI-compatible upstream on 127.0.0.1, steerable per request, for tests and benchmarks.

Run: ``python tests/support/fake_upstream.py [--port N] [--delay S]``; it prints ``PORT <n>`` once listening.
A request steers its own answer with a top-level ``x_fake`` object (the proxy passes unknown fields
through): ``{"key": "k", "delay": 0.2, "fail_times": 2, "fail_status": 503, "status": 400,
"retry_after": "0", "error_code": "insufficient_quota", "garbage": true, "slow_times": 1}``.
``fail_times`` and ``slow_times`` (only the first n calls wait ``delay``) count per ``key``.
Big and chatty answers, sent as fast as the connection takes them: ``"huge": n`` answers a valid
``chat.completion`` whose content is ``n`` bytes (with a Content-Length, chunked with ``"chunked": true``);
``"endless": s`` a body that never ends (a JSON object's start, then padding; a stream: a flood of
comment lines after its first event), stopped after ``s`` seconds only as a safety net; with
``stream``, ``"chunks": n`` streams ``n`` content chunks of ``"piece"`` (default ``"x"``) and
``"close_delimited": true`` sends the stream without chunked encoding, ending it by closing the connection.
``GET /_stats`` reports calls, in-flight and peak concurrency and what was seen (``sent``: body bytes
of big answers handed to the connection, ``finished``: once one has ended, whether it was sent whole,
by ``key``;
``client_ports``: the connections calls came on);
``POST /_reset`` clears it.
Rate limits like OpenAI's, per model: ``POST /_limits`` with ``{"model": {"rpm": n, "tpm": m}}`` (either
may be left out) gives that model buckets of ``n`` requests and ``m`` tokens that refill continuously
(a full bucket per minute). A call costs one request and its tokens counted as OpenAI counts them
(a quarter of the messages' characters, rounded up, plus 4 per message and 3, plus ``max_tokens``);
when a bucket cannot pay, the answer is 429 with ``Retry-After`` and ``retry-after-ms``. Every
answer for such a model carries the ``x-ratelimit-*`` headers and a ``usage`` with those tokens.
``/_stats`` then reports ``admitted`` (arrival times of the calls let through, by model) and
``rejected`` (429s, by model); ``/_reset`` removes the limits.
Besides ``POST /v1/chat/completions``: ``POST /v1/embeddings`` (a small vector per input, base64 when
``encoding_format`` asks), ``POST /v1/completions`` and ``POST /v1/responses`` (both echo their
``prompt`` / ``input``, streamed with ``stream``: text_completion chunks ending with ``[DONE]``, or the
Responses API's typed events ending with ``response.completed``), all steered by ``x_fake`` the same
way, and ``GET /v1/models``; ``/_stats`` counts calls by ``path``. Responses API answers are kept (unless
``store: false``) for ``GET`` and ``DELETE /v1/responses/{id}`` and ``GET .../input_items``, as OpenAI keeps
them; ``/_stats`` lists those calls' query strings in ``stored_queries``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

_BLOCK = b"x" * 65536
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")
MODELS = ("gpt-test", "text-embedding-test", "gpt-test-instruct")
_COMMENTS = b": keep-alive\n" * 5000


class FakeHandler(WSGIHandler):  # type: ignore[misc]  # gevent is untyped
    close_connection: bool
    response_use_chunked: bool
    response_headers: list[tuple[bytes, bytes]]

    def finalize_headers(self) -> None:
        super().finalize_headers()
        if self.close_connection and self.response_use_chunked:
            # The app said "Connection: close" and gave no length: the body ends with the
            # connection, as some upstreams (plain HTTP/1.0-style servers) end their streams.
            self.response_use_chunked = False
            self.response_headers = [
                (name, value) for name, value in self.response_headers if name.lower() != b"transfer-encoding"
            ]


def go_duration(seconds: float) -> str:
    """Seconds as OpenAI writes them: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def openai_tokens(body: dict[str, Any]) -> int:
    total = 3
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        total += 4 + math.ceil(len(content if isinstance(content, str) else json.dumps(content)) / 4)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return total + (int(limit) if isinstance(limit, int) else 0)


class Bucket:
    """A budget of ``capacity`` that refills continuously, a whole one per minute."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.at = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + self.capacity / 60.0 * (now - self.at))
        self.at = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (min(amount, self.capacity) - self.level) / (self.capacity / 60.0))

    def reset(self) -> float:
        return (self.capacity - self.level) / (self.capacity / 60.0)


class FakeUpstream:
    def __init__(self, default_delay: float) -> None:
        self.default_delay = default_delay
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        # Calls of earlier tests may still be sleeping out their delay (the proxy gave up on
        # them): they must not count in, or out of, the counters of the test that reset.
        self.generation += 1
        self.calls = 0
        self.inflight = 0
        self.peak = 0
        self.by_key: Counter[str] = Counter()
        self.authorizations: set[str] = set()
        self.bodies_with_proxy_fields = 0
        self.streamed = 0
        self.first_call_at: dict[str, float] = {}
        self.streamed_calls = 0
        self.sent: Counter[str] = Counter()
        self.finished: dict[str, bool] = {}
        self.client_ports: set[int] = set()
        self.buckets: dict[str, dict[str, Bucket]] = {}
        self.admitted: dict[str, list[float]] = {}
        self.rejected: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        # Responses API answers kept as OpenAI keeps them (``store``), with their inputs.
        self.stored: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self.stored_queries: list[str] = []

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "inflight": self.inflight,
            "peak": self.peak,
            "by_key": dict(self.by_key),
            "authorizations": sorted(self.authorizations),
            "bodies_with_proxy_fields": self.bodies_with_proxy_fields,
            "streamed": self.streamed,
            "first_call_at": self.first_call_at,
            "streamed_calls": self.streamed_calls,
            "sent": dict(self.sent),
            "finished": self.finished,
            "client_ports": sorted(self.client_ports),
            "admitted": self.admitted,
            "rejected": dict(self.rejected),
            "paths": dict(self.paths),
            "stored_queries": self.stored_queries,
        }

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/_stats":
            return self._json(start_response, 200, self.stats())
        if path == "/_reset" and method == "POST":
            self.reset()
            return self._json(start_response, 200, {"ok": True})
        if path == "/_limits" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            for model, limits in json.loads(environ["wsgi.input"].read(length) or b"{}").items():
                self.buckets[model] = {
                    kind: Bucket(int(limits[kind])) for kind in ("rpm", "tpm") if limits.get(kind)
                }
            return self._json(start_response, 200, {"ok": True})
        if path == "/v1/models" and method == "GET":
            self.paths[path] += 1
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
            return self._json(start_response, 200, {"object": "list", "data": models})
        if path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
            self.paths[path] += 1
            self.stored_queries.append(environ.get("QUERY_STRING", ""))
            return self._stored(start_response, method, path.removeprefix("/v1/responses/"))
        if path not in ENDPOINTS or method != "POST":
            return self._json(start_response, 404, {"error": {"message": "no such route"}})
        self.paths[path] += 1
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        return self._complete(environ, start_response, body, path)

    def _complete(
        self, environ: dict[str, Any], start_response: Any, body: dict[str, Any], path: str
    ) -> Iterable[bytes]:
        arrived = time.time()
        fake = body.get("x_fake") or {}
        key = str(fake.get("key", ""))
        self.calls += 1
        self.by_key[key] += 1
        attempt = self.by_key[key]
        if key and key not in self.first_call_at:
            self.first_call_at[key] = arrived
        self.authorizations.add(environ.get("HTTP_AUTHORIZATION", ""))
        self.client_ports.add(int(environ.get("REMOTE_PORT") or 0))
        if "webhookUrl" in body:
            self.bodies_with_proxy_fields += 1
        if "stream" in body or "stream_options" in body:
            self.streamed += 1
        limited = self._rate_limit(str(body.get("model")), body)
        if limited is not None and limited[0] == 429:
            return self._json(
                start_response,
                429,
                {
                    "error": {
                        "message": "Rate limit reached",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                    }
                },
                limited[1],
            )
        generation = self.generation
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            delay = float(fake.get("delay", self.default_delay))
            if "slow_times" in fake and attempt > int(fake["slow_times"]):
                delay = 0.0
            if delay > 0:
                gevent.sleep(delay)
            headers = dict(limited[1]) if limited is not None else {}
            if "retry_after" in fake:
                headers["Retry-After"] = str(fake["retry_after"])
            if attempt <= int(fake.get("fail_times", 0)):
                status = int(fake.get("fail_status", 500))
                error = {
                    "message": f"induced failure {attempt}",
                    "type": "server_error",
                    "code": fake.get("error_code"),
                }
                return self._json(start_response, status, {"error": error}, headers)
            if "status" in fake:
                status = int(fake["status"])
                error = {
                    "message": f"induced status {status}",
                    "type": "invalid_request_error",
                    "code": fake.get("error_code"),
                }
                return self._json(start_response, status, {"error": error}, headers)
            if fake.get("garbage"):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"not json"]
            if path != "/v1/chat/completions":
                return self._other(path, start_response, body, fake, headers, int(arrived))
            messages = body.get("messages") or [{}]
            content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
            if body.get("stream"):
                self.streamed_calls += 1
                headers = {"Content-Type": "text/event-stream"}
                if fake.get("close_delimited"):
                    headers["Connection"] = "close"
                start_response("200 OK", list(headers.items()))
                return self._stream(f"echo: {content}", body, fake, int(arrived))
            if "huge" in fake or "endless" in fake:
                return self._big(start_response, body, fake, key, int(arrived))
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            if limited is not None:
                cost = openai_tokens(body)
                usage = {"prompt_tokens": cost, "completion_tokens": 0, "total_tokens": cost}
            return self._json(
                start_response,
                200,
                {
                    "id": f"chatcmpl-{self.calls}",
                    "object": "chat.completion",
                    "created": int(arrived),
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"echo: {content}"},
                        }
                    ],
                    "usage": usage,
                },
                headers,
            )
        finally:
            if generation == self.generation:
                self.inflight -= 1

    def _rate_limit(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, str]] | None:
        """(200 or 429, the headers to send) for a model with limits; None for one without."""
        buckets = self.buckets.get(model)
        if not buckets:
            return None
        now = time.monotonic()
        cost = {"rpm": 1.0, "tpm": float(openai_tokens(body))}
        for bucket in buckets.values():
            bucket.refill(now)
        wait = max(bucket.wait_for(cost[kind]) for kind, bucket in buckets.items())
        status = 429 if wait > 0 else 200
        if status == 200:
            for kind, bucket in buckets.items():
                bucket.level -= cost[kind]
            self.admitted.setdefault(model, []).append(time.time())
        else:
            self.rejected[model] += 1
        headers: dict[str, str] = {}
        for kind, name in (("rpm", "requests"), ("tpm", "tokens")):
            found = buckets.get(kind)
            if found is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(found.capacity)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(found.level)))
                headers[f"x-ratelimit-reset-{name}"] = go_duration(found.reset())
        if status == 429:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["Retry-After"] = str(math.ceil(wait))
        return status, headers

    def _stream(self, text: str, body: dict[str, Any], fake: dict[str, Any], created: int) -> Iterator[bytes]:
        """The answer as OpenAI streams it, a word per chunk, ``chunk_delay`` apart; with
        ``break_after`` the connection drops after that many chunks."""
        if "chunks" in fake:
            words = [str(fake.get("piece", "x"))] * int(fake["chunks"])
            pieces = words
        else:
            words = text.split(" ")
            pieces = [word if number == 0 else " " + word for number, word in enumerate(words)]
        head = {
            "id": f"chatcmpl-{self.calls}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.get("model"),
        }

        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({**head, **payload}).encode() + b"\n\n"

        yield event(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        if "endless" in fake:
            ends = time.monotonic() + float(fake["endless"])
            while time.monotonic() < ends:
                yield _COMMENTS
            return
        for number, piece in enumerate(pieces):
            if "break_after" in fake and number >= int(fake["break_after"]):
                raise ConnectionError("induced break")
            gevent.sleep(float(fake.get("chunk_delay", 0.0)))
            yield event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event(
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 1,
                        "completion_tokens": len(words),
                        "total_tokens": 1 + len(words),
                    },
                }
            )
        yield b"data: [DONE]\n\n"

    def _other(
        self,
        path: str,
        start_response: Any,
        body: dict[str, Any],
        fake: dict[str, Any],
        headers: dict[str, str],
        created: int,
    ) -> Iterable[bytes]:
        """The answer of the endpoints other than chat, once ``x_fake`` let the call through."""
        if path == "/v1/embeddings":
            return self._json(start_response, 200, self._embeddings(body), headers)
        if path == "/v1/completions":
            prompt = body.get("prompt")
            text = f"echo: {prompt[0] if isinstance(prompt, list) and prompt else prompt}"
        else:
            given = body.get("input")
            if isinstance(given, list) and given:
                last = given[-1]
                given = last.get("content") if isinstance(last, dict) else last
            text = f"echo: {given}"
        if body.get("stream"):
            self.streamed_calls += 1
            start_response("200 OK", [("Content-Type", "text/event-stream"), *headers.items()])
            pieces = [w if n == 0 else " " + w for n, w in enumerate(text.split(" "))]
            if path == "/v1/completions":
                return self._text_stream(pieces, body, fake, created)
            return self._response_stream(pieces, body, fake, created)
        if path == "/v1/completions":
            completion = {
                "id": f"cmpl-{self.calls}",
                "object": "text_completion",
                "created": created,
                "model": body.get("model"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
            return self._json(start_response, 200, completion, headers)
        return self._json(
            start_response, 200, self._kept(body, self._response(body, text, created, "completed")), headers
        )

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        given = body.get("input")
        if isinstance(given, str) or (isinstance(given, list) and given and isinstance(given[0], int)):
            inputs: list[Any] = [given]
        else:
            inputs = list(given or [])
        dimensions = int(body.get("dimensions") or 3)
        data = []
        for index, item in enumerate(inputs):
            # A vector that tells the inputs apart: its first value is the input's length.
            vector = [float(len(item))] + [0.5] * (dimensions - 1)
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(math.ceil(len(json.dumps(item)) / 4) for item in inputs)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _kept(self, body: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        """The response, kept for GET and DELETE unless the request said ``store: false``."""
        if body.get("store", True) is not False:
            given = body.get("input")
            items = given if isinstance(given, list) else [{"role": "user", "content": given}]
            inputs = [
                {
                    "id": f"msg_in_{n}",
                    "type": "message",
                    "status": "completed",
                    "role": item.get("role", "user"),
                    "content": [{"type": "input_text", "text": item.get("content")}]
                    if isinstance(item.get("content"), str)
                    else item.get("content"),
                }
                for n, item in enumerate(items)
                if isinstance(item, dict)
            ]
            self.stored[response["id"]] = (response, inputs)
        return response

    def _stored(self, start_response: Any, method: str, rest: str) -> list[bytes]:
        response_id, _, tail = rest.partition("/")
        found = self.stored.get(response_id)
        if found is None or tail not in ("", "input_items") or (method == "DELETE" and tail):
            error = {
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return self._json(start_response, 404, {"error": error})
        response, inputs = found
        if method == "DELETE":
            del self.stored[response_id]
            return self._json(start_response, 200, {"id": response_id, "object": "response", "deleted": True})
        if tail:
            listed = {
                "object": "list",
                "data": inputs,
                "first_id": inputs[0]["id"] if inputs else None,
                "last_id": inputs[-1]["id"] if inputs else None,
                "has_more": False,
            }
            return self._json(start_response, 200, listed)
        return self._json(start_response, 200, response)

    def _response(self, body: dict[str, Any], text: str, created: int, status: str) -> dict[str, Any]:
        """A Responses API ``response`` object with one output message (none while in progress)."""
        message = {
            "type": "message",
            "id": f"msg_{self.calls}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        return {
            "id": f"resp_{self.calls}",
            "object": "response",
            "created_at": created,
            "status": status,
            "model": body.get("model"),
            "output": [message] if status == "completed" else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "store": body.get("store", True),
            "error": None,
            "incomplete_details": None,
            "usage": {
                "input_tokens": 1,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(text.split(" ")),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 1 + len(text.split(" ")),
            },
        }

    def _text_stream(
        self, pieces: list[str], body: dict[str, Any], fake: dict[str, Any], created: int
    ) -> Iterator[bytes]:
        head = {
            "id": f"cmpl-{self.calls}",
            "object": "text_completion",
            "created": created,
            "model": body.get("model"),
        }
        for number, piece in enumerate(pieces):
            if "break_after" in fake and number >= int(fake["break_after"]):
                raise ConnectionError("induced break")
            gevent.sleep(float(fake.get("chunk_delay", 0.0)))
            choice = {"text": piece, "index": 0, "logprobs": None, "finish_reason": None}
            yield b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"
        last = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        yield b"data: " + json.dumps({**head, "choices": [last]}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _response_stream(
        self, pieces: list[str], body: dict[str, Any], fake: dict[str, Any], created: int
    ) -> Iterator[bytes]:
        """The Responses API's typed events, as OpenAI sends them: no ``[DONE]``, the stream ends
        after ``response.completed``."""
        text = "".join(pieces)
        final = self._kept(body, self._response(body, text, created, "completed"))
        message = final["output"][0]
        number = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal number
            number += 1
            payload = {"type": kind, "sequence_number": number - 1, **fields}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

        yield event("response.created", response=self._response(body, text, created, "in_progress"))
        yield event("response.in_progress", response=self._response(body, text, created, "in_progress"))
        yield event(
            "response.output_item.added",
            output_index=0,
            item={**message, "status": "in_progress", "content": []},
        )
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", **where, part=part)
        for index, piece in enumerate(pieces):
            if "break_after" in fake and index >= int(fake["break_after"]):
                raise ConnectionError("induced break")
            gevent.sleep(float(fake.get("chunk_delay", 0.0)))
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part={**part, "text": text})
        yield event("response.output_item.done", output_index=0, item=message)
        yield event("response.completed", response=final)

    def _big(
        self, start_response: Any, body: dict[str, Any], fake: dict[str, Any], key: str, created: int
    ) -> Iterator[bytes]:
        size = int(fake.get("huge", 0))
        completion = {
            "id": f"chatcmpl-{self.calls}",
            "object": "chat.completion",
            "created": created,
            "model": body.get("model"),
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "@"}}
            ],
        }
        before, after = json.dumps(completion).encode().split(b'"@"')
        before += b'"'
        after = b'"' + after
        headers = [("Content-Type", "application/json")]
        if "endless" not in fake and not fake.get("chunked"):
            headers.append(("Content-Length", str(len(before) + size + len(after))))
        start_response("200 OK", headers)
        return self._big_body(before, size, after, fake, key)

    def _big_body(
        self, before: bytes, size: int, after: bytes, fake: dict[str, Any], key: str
    ) -> Iterator[bytes]:
        whole = False
        try:
            yield before
            self.sent[key] += len(before)
            if "endless" in fake:
                ends = time.monotonic() + float(fake["endless"])
                while time.monotonic() < ends:
                    yield _BLOCK
                    self.sent[key] += len(_BLOCK)
                return
            left = size
            while left > 0:
                piece = _BLOCK[:left]
                yield piece
                self.sent[key] += len(piece)
                left -= len(piece)
            yield after
            self.sent[key] += len(after)
            whole = True
        finally:
            # Also when a send fails: the client closed the connection before the end.
            self.finished[key] = whole

    @staticmethod
    def _json(
        start_response: Any, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> list[bytes]:
        data = json.dumps(payload).encode()
        start_response(
            f"{status} X",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                *(headers or {}).items(),
            ],
        )
        return [data]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    server = WSGIServer(listener, FakeUpstream(args.delay), log=None, handler_class=FakeHandler)
    server.start()
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
