"""read_body against gevent's own request input: every way a body can be broken is an
``UnreadableBody`` (a JSON 4xx that closes the connection), never an exception that becomes a 500."""

from __future__ import annotations

import io
import json
from typing import Any

import gevent
import pytest
from gevent.pywsgi import Input

from llm_proxy.api import http
from llm_proxy.api.http import BodyTooLarge, UnreadableBody, read_body

LIMIT = 1024


def chunked(raw: bytes) -> dict[str, Any]:
    stream = Input(io.BufferedReader(io.BytesIO(raw)), None, chunked_input=True)
    return {"wsgi.input": stream, "HTTP_TRANSFER_ENCODING": "chunked"}


def sized(raw: bytes, declared: int) -> dict[str, Any]:
    stream = Input(io.BufferedReader(io.BytesIO(raw)), declared)
    return {"wsgi.input": stream, "CONTENT_LENGTH": str(declared)}


def test_well_formed_bodies_are_read() -> None:
    assert read_body(chunked(b"2\r\n{}\r\n3;ext=1\r\n[1]\r\n0\r\nX-T: v\r\n\r\n"), LIMIT) == b"{}[1]"
    assert read_body(sized(b'{"a": 1}', 8), LIMIT) == b'{"a": 1}'


@pytest.mark.parametrize(
    "raw",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"FFFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n",
        b"-5\r\n{}\r\n0\r\n\r\n",
        b"\r\n{}\r\n0\r\n\r\n",
        b"2\r\n{}XX0\r\n\r\n",
        b"2;" + b"e" * 100_000 + b"\r\n{}\r\n0\r\n\r\n",
        b"2\r\n{}\r\n0\r\nX-T: " + b"t" * 100_000 + b"\r\n\r\n",
        b"2\r\n{}\r\n0\r\nBad Name: v\r\n\r\n",
        b"5\r\n{}",
        b"",
    ],
    ids=[
        "non-hex",
        "over 64 bits",
        "negative",
        "empty size",
        "no CRLF",
        "extension",
        "trailer",
        "trailer name",
        "cut short",
        "no chunk",
    ],
)
def test_malformed_chunked_bodies_are_a_400(raw: bytes) -> None:
    with pytest.raises(UnreadableBody) as caught:
        read_body(chunked(raw), LIMIT)
    assert caught.value.status == 400
    reply = caught.value.response()
    assert reply.status_code == 400
    assert reply.headers["Connection"] == "close"
    error = json.loads(reply.body)["error"]
    assert error["type"] == "validation_error"
    assert error["details"] == [{"path": "", "message": "malformed chunked body"}]


def test_body_shorter_than_its_length_is_a_400() -> None:
    with pytest.raises(UnreadableBody) as caught:
        read_body(sized(b'{"a":', 40), LIMIT)
    assert caught.value.status == 400
    assert caught.value.detail == "the body is shorter than its Content-Length"


def test_oversized_bodies_are_still_refused_as_too_large() -> None:
    with pytest.raises(BodyTooLarge):
        read_body(sized(b"x" * 10, LIMIT + 1), LIMIT)
    with pytest.raises(BodyTooLarge):
        read_body(chunked(b"FFFFFFFFFFFFFFFF\r\n" + b"x" * (LIMIT + 10)), LIMIT)


class Stalled:
    """A client that sends part of its body, then nothing."""

    def read(self, size: int | None = None) -> bytes:
        gevent.sleep(30)
        return b""


def test_a_stalled_body_ends_with_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "BODY_TIMEOUT", 0.05)
    with pytest.raises(UnreadableBody) as caught:
        read_body({"wsgi.input": Stalled(), "CONTENT_LENGTH": "10"}, LIMIT)
    assert caught.value.status == 408
    assert json.loads(caught.value.response().body)["error"]["type"] == "request_timeout"


def test_an_outer_timeout_is_not_mistaken_for_the_body_deadline() -> None:
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05):
        read_body({"wsgi.input": Stalled(), "CONTENT_LENGTH": "10"}, LIMIT)
