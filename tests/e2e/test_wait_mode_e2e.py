"""Wait mode against the real service, with the official OpenAI SDK unchanged but for base_url,
api_key and (in some tests) a Prefer header: without one, the SDK's requests wait too."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests
from openai.types.chat import ChatCompletion

from conftest import API_KEY, FakeUpstream, Service, body
from llm_proxy.api.app import preferred_wait

MakeService = Callable[..., Service]


def sdk(service: Service, prefer: str = "wait") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{service.url}/v1", api_key=API_KEY, default_headers={"Prefer": prefer}, max_retries=2
    )


def test_sdk_gets_the_completion_through_the_queue(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_CONCURRENT="1")
    fake_upstream.reset()
    client = sdk(service)
    completion = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "capital of France?"}],
        extra_body={"x_fake": {"key": "sdk-ok", "delay": 0.2}},
    )
    assert completion.choices[0].message.content == "echo: capital of France?"
    assert fake_upstream.stats()["by_key"] == {"sdk-ok": 1}

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "again"}],
        extra_body={"x_fake": {"key": "sdk-raw"}},
    )
    request_id = raw.headers["x-request-id"]
    # The same request is an ordinary queued one: its status is there to read.
    assert service.status(request_id).json()["status"] == "completed"


def test_sdk_raises_the_upstreams_error_and_does_not_retry_it(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_RETRIES="1", RETRY_BASE_DELAY="0.01")
    fake_upstream.reset()
    client = sdk(service)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"x_fake": {"key": "sdk-400", "status": 400}},
        )
    assert "induced status 400" in str(bad.value)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"x_fake": {"key": "sdk-500", "fail_times": 99, "fail_status": 500}},
        )
    # The proxy retried once (MAX_RETRIES=1); the SDK, told x-should-retry: false, did not add more.
    assert fake_upstream.stats()["by_key"] == {"sdk-400": 1, "sdk-500": 2}


def test_network_failure_is_a_502_for_the_sdk(make_service: MakeService) -> None:
    service = make_service(OPENAI_API_BASE_URL="http://127.0.0.1:9/v1", MAX_RETRIES="0")
    with pytest.raises(openai.InternalServerError) as failed:
        sdk(service).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502


def test_not_finished_within_the_wait_is_a_202_to_poll(make_service: MakeService) -> None:
    service = make_service()
    reply = requests.post(
        f"{service.url}/v1/chat/completions",
        json=body(x_fake={"key": "slow-wait", "delay": 3}),
        headers={**service.headers(), "Prefer": "wait=1"},
        timeout=10,
    )
    assert reply.status_code == 202
    assert reply.headers["Location"] == f"/v1/chat/completions/{reply.json()['request_id']}"
    # Its real status: a worker took it at once (not "pending" at place 0).
    assert reply.json()["status"] == "processing" and reply.json()["queue_position"] == 0
    assert service.wait_final(reply.json()["request_id"])["status"] == "completed"


@pytest.mark.parametrize(
    "prefer,seconds",
    [
        (None, 0.0),
        ("", 0.0),
        ("wait", 25.0),
        ("wait=3", 3.0),
        ("respond-async, wait=7", 7.0),
        ("wait=100", 25.0),
        ('wait="4"', 4.0),
        ("wait=soon", 0.0),
        ("wait=-1", 0.0),
        ("handling=lenient", 0.0),
    ],
)
def test_prefer_header_parsing(prefer: str | None, seconds: float) -> None:
    assert preferred_wait(prefer, 25.0) == seconds


def test_idempotent_retry_in_wait_mode_gets_the_original_result(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    fake_upstream.reset()
    headers = {**service.headers(), "Prefer": "wait", "Idempotency-Key": "retry-me"}
    sent = body("once only", x_fake={"key": "idem-wait", "delay": 0.2})
    first = requests.post(f"{service.url}/v1/chat/completions", json=sent, headers=headers, timeout=30)
    again = requests.post(f"{service.url}/v1/chat/completions", json=sent, headers=headers, timeout=30)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["X-Request-Id"] == first.headers["X-Request-Id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert fake_upstream.stats()["by_key"] == {"idem-wait": 1}


def test_sdk_streams_through_the_queue(make_service: MakeService, fake_upstream: FakeUpstream) -> None:
    service = make_service(MAX_CONCURRENT="1")
    fake_upstream.reset()
    raw = sdk(service).chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"x_fake": {"key": "sdk-stream", "chunk_delay": 0.05}},
    )
    chunks = list(raw.parse())
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "echo: one two three four"
    assert len(pieces) >= 5  # relayed chunk by chunk, not as one block
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert fake_upstream.stats()["streamed_calls"] == 1
    # The assembled completion is the request's stored result, like any other.
    stored = service.wait_final(raw.headers["x-request-id"])
    assert stored["status"] == "completed" and stored["response"]["object"] == "chat.completion"
    assert stored["response"]["choices"][0]["message"]["content"] == "echo: one two three four"


def test_stream_failing_before_its_first_event_is_an_http_error(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    with pytest.raises(openai.BadRequestError):
        sdk(service).chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={"x_fake": {"key": "stream-400", "status": 400}},
        )


def test_stream_broken_midway_ends_with_an_error_event(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    fake_upstream.reset()
    raw = sdk(service).chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "a b c d e f"}],
        stream=True,
        extra_body={"x_fake": {"key": "stream-break", "break_after": 2, "chunk_delay": 0.05}},
    )
    with pytest.raises(openai.APIError):
        list(raw.parse())
    final = service.wait_final(raw.headers["x-request-id"])
    assert final["status"] == "error"
    # Part of the answer had reached the client: not retried.
    assert fake_upstream.stats()["by_key"]["stream-break"] == 1


def test_a_queued_stream_is_kept_alive_with_comments(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_CONCURRENT="1", SYNC_WAIT_MAX="2")
    busy = service.submit(body(x_fake={"key": "occupy", "delay": 4})).json()["request_id"]
    with requests.post(
        f"{service.url}/v1/chat/completions",
        json=body("hi", stream=True, x_fake={"key": "queued-stream"}),
        headers={**service.headers(), "Prefer": "wait"},
        stream=True,
        timeout=30,
    ) as reply:
        assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert lines[0] == b": keep-alive"
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: hi"
    assert service.status(busy).json()["status"] == "completed"


def plain_sdk(service: Service, **options: Any) -> openai.OpenAI:
    """The SDK as most code (and LiteLLM, LangChain) uses it: no Prefer header. Used in a ``with``,
    so its connections are closed when the test ends, not whenever it is collected."""
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEY, **options)


def test_sdk_without_prefer_waits_and_other_clients_keep_the_202(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    fake_upstream.reset()
    with plain_sdk(service) as client:
        completion = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "no prefer"}],
            extra_body={"x_fake": {"key": "no-prefer", "delay": 0.3}},
        )
        assert isinstance(completion, ChatCompletion)
        assert completion.choices[0].message.content == "echo: no prefer"
        with client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "a b"}], stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: a b"

    # RFC 7240's respond-async asks for the 202 explicitly.
    with plain_sdk(service, default_headers={"Prefer": "respond-async"}) as client:
        accepted = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}]
        )
        assert accepted.http_response.status_code == 202
        assert accepted.http_response.json()["status"] in ("pending", "processing")
    # A plain HTTP client without Prefer gets the 202 as before.
    plain = requests.post(
        f"{service.url}/v1/chat/completions", json=body("x"), headers=service.headers(), timeout=10
    )
    assert plain.status_code == 202 and plain.json()["request_id"]


def test_sdk_wait_that_runs_out_raises_naming_the_request_and_is_not_retried(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(SYNC_WAIT_MAX="1", **backend_env)
    fake_upstream.reset()
    # max_retries=2: the SDK would retry a 504, and queue the request again each time.
    with plain_sdk(service, max_retries=2) as client, pytest.raises(openai.APIStatusError) as ran_out:
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "slow"}],
            extra_body={"x_fake": {"key": "sdk-ran-out", "delay": 3}},
        )
    error = ran_out.value
    request_id = error.response.headers["x-request-id"]
    assert error.status_code == 504 and error.response.headers["x-should-retry"] == "false"
    assert request_id in error.message and f"GET /v1/chat/completions/{request_id}" in error.message
    # The request went on and can be collected; the SDK sent it once only.
    assert service.wait_final(request_id)["response"]["choices"][0]["message"]["content"] == "echo: slow"
    assert fake_upstream.stats()["by_key"] == {"sdk-ran-out": 1}


def test_stream_failing_at_once_is_an_http_error_at_once(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    # The 200 may now be held up to the whole wait (20 s here); the failure must not wait for it.
    service = make_service(SYNC_WAIT_MAX="20", **backend_env)
    with plain_sdk(service) as client:
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "x"}],
                stream=True,
                extra_body={"x_fake": {"key": "stream-400-at-once", "status": 400}},
            )
        # The old fixed hold was 3 s: well under it.
        assert time.monotonic() - started < 2.5
    assert "induced status 400" in str(refused.value)


def test_stream_failing_after_its_retries_is_an_http_error_not_a_late_event(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(SYNC_WAIT_MAX="8", MAX_RETRIES="2", RETRY_BASE_DELAY="0.05", **backend_env)
    fake_upstream.reset()
    # Three attempts of 1.3 s: the request ends after the old 3 s hold, within the wait.
    with plain_sdk(service) as client, pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={
                "x_fake": {"key": "stream-retried", "fail_times": 99, "fail_status": 500, "delay": 1.3}
            },
        )
    assert failed.value.status_code == 500
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert fake_upstream.stats()["by_key"] == {"stream-retried": 3}
