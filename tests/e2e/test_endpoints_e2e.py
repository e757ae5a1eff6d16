"""Embeddings, the Responses API, completions and the model list through the real service (both
back ends), with the official OpenAI SDK pointed at it and with plain HTTP polling."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import openai
import requests

from conftest import API_KEY, FakeUpstream, Receiver, Service, wait_until

MakeService = Callable[..., Service]
PATHS: dict[str, dict[str, Any]] = {
    "embeddings": {"model": "text-embedding-test", "input": ["a", "bbb"]},
    "responses": {"model": "gpt-test", "input": "poll me"},
    "completions": {"model": "gpt-test-instruct", "prompt": "poll me too"},
}


def sdk(service: Service) -> openai.OpenAI:
    # No Prefer header: the SDK's requests wait for their result by default.
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def test_sdk_calls_work_as_against_openai(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    service = make_service(**backend_env)
    fake_upstream.reset()
    client = sdk(service)

    # The SDK asks for base64 by default and decodes it.
    embedded = client.embeddings.create(model="text-embedding-test", input=["a", "bbb"])
    assert [item.embedding[0] for item in embedded.data] == [1.0, 3.0]

    response = client.responses.create(model="gpt-test", input="hello there")
    assert response.output_text == "echo: hello there"

    raw = client.responses.with_raw_response.create(model="gpt-test", input="stream me", stream=True)
    events = list(raw.parse())
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "echo: stream me"
    # The stored result is the response object of response.completed.
    stored = requests.get(
        f"{service.url}/v1/responses/{raw.headers['x-request-id']}", headers=service.headers(), timeout=10
    ).json()
    assert stored["status"] == "completed" and stored["response"]["output"][0]["content"][0]["text"] == (
        "echo: stream me"
    )

    completion = client.completions.create(model="gpt-test-instruct", prompt="Say this")
    assert completion.choices[0].text == "echo: Say this"
    chunks = client.completions.create(model="gpt-test-instruct", prompt="stream this", stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == "echo: stream this"

    assert {model.id for model in client.models.list()} >= {"gpt-test", "text-embedding-test"}
    client.models.list()  # within the minute: from the cache
    paths = fake_upstream.stats()["paths"]
    assert paths == {"/v1/embeddings": 1, "/v1/responses": 2, "/v1/completions": 2, "/v1/models": 1}

    # An upstream refusal is the SDK's own exception, not retried.
    try:
        client.embeddings.create(
            model="text-embedding-test", input="x", extra_body={"x_fake": {"key": "emb-400", "status": 400}}
        )
        raise AssertionError("expected a BadRequestError")
    except openai.BadRequestError as exc:
        assert "induced status 400" in str(exc)


def test_queued_polled_hooked_and_kept_apart(
    make_service: MakeService, backend_env: dict[str, str], receiver: Receiver
) -> None:
    service = make_service(WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_RETRY_BASE="0.05", **backend_env)
    headers = service.headers()
    ids = {}
    for name, payload in PATHS.items():
        hooked = {**payload, "webhookUrl": receiver.url(f"/hook/{name}-{service.port}")}
        reply = requests.post(f"{service.url}/v1/{name}", json=hooked, headers=headers, timeout=10)
        assert reply.status_code == 202, reply.text
        ids[name] = reply.json()["request_id"]
        assert reply.headers["Location"] == f"/v1/{name}/{ids[name]}"

    def completed(name: str) -> dict[str, Any] | None:
        found = requests.get(f"{service.url}/v1/{name}/{ids[name]}?wait=5", headers=headers, timeout=10)
        body = found.json()
        return body if body["status"] == "completed" else None

    results = {name: wait_until(functools.partial(completed, name), timeout=20) for name in PATHS}
    assert results["embeddings"]["response"]["object"] == "list"
    assert len(results["embeddings"]["response"]["data"]) == 2
    assert results["responses"]["response"]["object"] == "response"
    assert results["completions"]["response"]["choices"][0]["text"] == "echo: poll me too"

    # An id answers under its own endpoint only.
    for name, request_id in ids.items():
        for other in ["chat/completions", *PATHS]:
            if other != name:
                url = f"{service.url}/v1/{other}/{request_id}"
                assert requests.get(url, headers=headers, timeout=10).status_code == 404
                assert requests.delete(url, headers=headers, timeout=10).status_code == 404

    # The webhook says which endpoint the result is from.
    for name in PATHS:
        [hook] = wait_until(functools.partial(receiver.received, f"{name}-{service.port}"), timeout=15)
        payload = json.loads(hook["body"])
        assert payload["endpoint"] == name and payload["request_id"] == ids[name]
        assert payload["response"] == results[name]["response"]

    # Idempotency works the same way.
    keyed = {**headers, "Idempotency-Key": f"resp-{service.port}"}
    first = requests.post(f"{service.url}/v1/responses", json=PATHS["responses"], headers=keyed, timeout=10)
    again = requests.post(f"{service.url}/v1/responses", json=PATHS["responses"], headers=keyed, timeout=10)
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"

    bad = requests.post(f"{service.url}/v1/embeddings", json={"model": "m"}, headers=headers, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["details"] == [
        {"path": "input", "message": "required key not provided"}
    ]
    metrics = requests.get(f"{service.url}/metrics", headers=headers, timeout=10).text
    assert 'llm_proxy_requests_total{endpoint="embeddings",status="completed"} 1.0' in metrics


def test_the_upstreams_stored_responses_are_read_and_deleted_through_the_proxy(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    """``store`` keeps a Responses API answer at the upstream under its own ``resp_`` id: the
    SDK's retrieve, input_items.list and delete reach it through the proxy as they would OpenAI."""
    service = make_service(**backend_env)
    fake_upstream.reset()
    client = sdk(service)
    created = client.responses.create(model="gpt-test", input="keep me")
    assert created.id.startswith("resp_")

    again = client.responses.retrieve(created.id, include=["message.output_text.logprobs"])
    assert again.id == created.id and again.output_text == "echo: keep me"
    assert fake_upstream.stats()["stored_queries"] == ["include%5B%5D=message.output_text.logprobs"]
    items = client.responses.input_items.list(created.id)
    assert [(getattr(item, "role", None), item.id) for item in items.data] == [("user", "msg_in_0")]

    client.responses.delete(created.id)
    try:
        client.responses.retrieve(created.id)
        raise AssertionError("expected a NotFoundError")
    except openai.NotFoundError as exc:
        assert f"Response with id '{created.id}' not found." in str(exc)

    # The proxy's own ids still answer from the proxy; other shapes are not relayed anywhere.
    queued = requests.post(
        f"{service.url}/v1/responses",
        json={"model": "gpt-test", "input": "mine"},
        headers={**service.headers(), "Prefer": "respond-async"},
        timeout=10,
    ).json()
    mine = requests.get(
        f"{service.url}/v1/responses/{queued['request_id']}?wait=10", headers=service.headers(), timeout=20
    )
    assert mine.json()["request_id"] == queued["request_id"]
    # (An HTTP client removes dot segments before sending; these are what reaches the proxy.)
    for path in ("resp_1%2F..%2F..%2Fmodels", "resp_x/input_items/more", "msg_1", "resp_1%2F..%2Fmodels"):
        lost = requests.get(f"{service.url}/v1/responses/{path}", headers=service.headers(), timeout=10)
        assert lost.status_code == 404 and lost.json()["error"]["type"] == "request_not_found", path
    streamed = requests.get(
        f"{service.url}/v1/responses/{created.id}?stream=true", headers=service.headers(), timeout=10
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["type"] == "invalid_request_error"
    # Without an API key, nothing is relayed.
    assert requests.get(f"{service.url}/v1/responses/{created.id}", timeout=10).status_code == 401
    gets = [p for p in fake_upstream.stats()["paths"] if p.startswith("/v1/responses/")]
    assert sorted(gets) == sorted({f"/v1/responses/{created.id}", f"/v1/responses/{created.id}/input_items"})


def test_a_streamed_response_replayed_from_its_result_streams_the_same_text(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    """The SDK's ``responses.stream`` folds the typed events in order and prints the deltas: an
    answer replayed from the stored result (here the same Idempotency-Key sent again) must read
    as the live one did."""
    service = make_service(**backend_env)
    fake_upstream.reset()
    client = sdk(service)
    asked: dict[str, Any] = {
        "model": "gpt-test",
        "input": "say it twice",
        "extra_headers": {"Idempotency-Key": "stream-twice"},
    }
    texts, finals = [], []
    for _ in range(2):
        with client.responses.stream(**asked) as stream:
            texts.append("".join(e.delta for e in stream if e.type == "response.output_text.delta"))
            finals.append(stream.get_final_response())
    assert texts == ["echo: say it twice"] * 2
    assert [final.output_text for final in finals] == ["echo: say it twice"] * 2
    assert finals[0].id == finals[1].id
    assert fake_upstream.stats()["paths"] == {"/v1/responses": 1}  # the second from the stored result
