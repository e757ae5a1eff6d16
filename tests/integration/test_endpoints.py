"""Embeddings, the Responses API and completions through the same API as chat (webtest, in
process, on the embedded back end): their routes, validation, ids bound to one endpoint, and the
model list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.api.models import ModelList
from llm_proxy.domain.endpoints import Endpoint, endpoint_of
from llm_proxy.domain.job import new_request_id
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.domain.views import webhook_json
from llm_proxy.upstream.outcome import Outcome
from support.web import API_KEY, InProcessWeb, claim_one

BODIES = {
    "embeddings": {"model": "text-embedding-test", "input": ["one", "two"]},
    "responses": {"model": "gpt-test", "input": "hello", "store": False},
    "completions": {"model": "gpt-test-instruct", "prompt": "Say this is a test"},
}
PREFIXES = {"embeddings": "embreq_", "responses": "respreq_", "completions": "cmplreq_"}


@pytest.fixture
def web(tmp_path: Path) -> Iterator[InProcessWeb]:
    opened = InProcessWeb(tmp_path / "data")
    yield opened
    opened.close()


def post(web: InProcessWeb, path: str, payload: Any, **headers: str) -> Any:
    return web.app.post(
        path,
        json.dumps(payload),
        headers={"X-API-Key": API_KEY, **headers},
        content_type="application/json",
        status="*",
    )


def call(web: InProcessWeb, method: str, path: str) -> Any:
    return getattr(web.app, method)(path, headers={"X-API-Key": API_KEY}, status="*")


@pytest.mark.parametrize("name", sorted(BODIES))
def test_each_endpoint_queues_reads_and_cancels_its_own_ids(web: InProcessWeb, name: str) -> None:
    reply = post(web, f"/v1/{name}", BODIES[name])
    assert reply.status_int == 202
    request_id = reply.json["request_id"]
    assert request_id.startswith(PREFIXES[name])
    assert reply.headers["Location"] == f"/v1/{name}/{request_id}"
    # The same queue as chat, the body untouched (store included).
    claim = claim_one(web.queue)
    assert claim is not None and claim.job.request_id == request_id
    assert claim.job.body == BODIES[name] and claim.job.endpoint.value == name
    web.queue.release(claim)

    status = call(web, "get", f"/v1/{name}/{request_id}")
    assert status.status_int == 200 and status.json["request"] == BODIES[name]
    # Under any other endpoint the id is unknown, to read and to cancel.
    for other in ["chat/completions", *BODIES]:
        if other != name:
            for method in ("get", "delete"):
                missing = call(web, method, f"/v1/{other}/{request_id}")
                assert missing.status_int == 404
                assert missing.json["error"]["type"] == "request_not_found"
    cancelled = call(web, "delete", f"/v1/{name}/{request_id}")
    assert cancelled.status_int == 200 and cancelled.json["status"] == "cancelled"


def test_chat_ids_stay_chat_only(web: InProcessWeb) -> None:
    request_id = web.submit(status=202).json["request_id"]
    assert request_id.startswith("chatreq_")
    assert call(web, "get", f"/v1/embeddings/{request_id}").status_int == 404
    assert call(web, "get", f"/v1/chat/completions/{request_id}").status_int == 200


@pytest.mark.parametrize(
    "name,payload,paths",
    [
        ("embeddings", {}, {"model", "input"}),
        ("embeddings", {"model": "m", "input": []}, {"input"}),
        ("embeddings", {"model": "m", "input": [1, "a"]}, {"input"}),
        ("embeddings", {"model": " ", "input": "x", "dimensions": 0}, {"model", "dimensions"}),
        ("responses", {"model": "m"}, {"input"}),
        ("responses", {"model": "m", "input": 3, "temperature": 9}, {"input", "temperature"}),
        ("responses", {"model": "m", "input": "x", "stream": "yes"}, {"stream"}),
        ("completions", {"model": "m", "input": "x"}, {"prompt"}),
        ("completions", {"model": "m", "prompt": [[]]}, {"prompt"}),
        ("completions", {"model": "m", "prompt": "x", "stop": ["a"] * 5, "n": 0}, {"stop", "n"}),
        ("completions", {"model": "m", "prompt": "x", "webhookUrl": "ftp://x"}, {"webhookUrl"}),
    ],
)
def test_bad_bodies_are_400_with_details(
    web: InProcessWeb, name: str, payload: dict[str, Any], paths: set[str]
) -> None:
    reply = post(web, f"/v1/{name}", payload)
    assert reply.status_int == 400
    assert reply.json["error"]["type"] == "validation_error"
    assert {detail["path"] for detail in reply.json["error"]["details"]} == paths


@pytest.mark.parametrize(
    "name,payload",
    [
        ("embeddings", {"model": "m", "input": "", "encoding_format": "base64", "user": "u"}),
        ("embeddings", {"model": "m", "input": [1, 2, 3]}),
        ("embeddings", {"model": "m", "input": [[1, 2], [3]]}),
        ("responses", {"model": "m", "input": [{"role": "user", "content": "hi"}], "background": False}),
        ("responses", {"model": "m", "input": ["a", [1, 2]], "reasoning": {"effort": "low"}}),
        ("completions", {"model": "m", "prompt": ["a", "b"], "max_tokens": 0, "echo": True}),
    ],
)
def test_what_openai_accepts_is_accepted(web: InProcessWeb, name: str, payload: dict[str, Any]) -> None:
    assert post(web, f"/v1/{name}", payload).status_int == 202


def test_background_responses_are_refused_with_the_reason(web: InProcessWeb) -> None:
    reply = post(web, "/v1/responses", {"model": "m", "input": "x", "background": True})
    assert reply.status_int == 400
    [detail] = reply.json["error"]["details"]
    assert detail["path"] == "background" and "queues every request" in detail["message"]


def test_an_idempotency_key_stands_for_one_endpoint(web: InProcessWeb) -> None:
    same = {"model": "m", "input": "x"}
    first = post(web, "/v1/embeddings", same, **{"Idempotency-Key": "k-1"})
    again = post(web, "/v1/embeddings", same, **{"Idempotency-Key": "k-1"})
    assert again.json["request_id"] == first.json["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    elsewhere = post(web, "/v1/responses", same, **{"Idempotency-Key": "k-1"})
    assert elsewhere.status_int == 422 and elsewhere.json["error"]["type"] == "idempotency_error"


def test_models_are_relayed_and_need_the_key(web: InProcessWeb) -> None:
    reply = call(web, "get", "/v1/models")
    assert reply.status_int == 200 and reply.json["data"][0]["id"] == "gpt-test"
    assert web.app.get("/v1/models", status="*").status_int == 401


def test_the_model_list_is_kept_for_its_ttl_and_failures_are_not() -> None:
    now = [0.0]
    answers = [
        Outcome(error={"message": "down", "type": "network_error"}),
        Outcome(response_json='{"data": [1]}'),
        Outcome(response_json='{"data": [2]}'),
    ]
    fetched: list[Outcome] = []

    def fetch() -> Outcome:
        fetched.append(answers[len(fetched)])
        return fetched[-1]

    models = ModelList(fetch, ttl=60, clock=lambda: now[0])
    assert not models.get().ok
    assert models.get().response_json == '{"data": [1]}'
    now[0] = 59
    assert models.get().response_json == '{"data": [1]}'
    now[0] = 61
    assert models.get().response_json == '{"data": [2]}'
    assert len(fetched) == 3


def test_ids_name_their_endpoint_and_so_do_webhooks() -> None:
    for endpoint in Endpoint:
        assert endpoint_of(new_request_id(endpoint)) is endpoint
    assert endpoint_of("x" * 20) is Endpoint.CHAT  # anything else reads as chat, as ids always did
    entry = StatusEntry(
        status=Status.COMPLETED, request_json="{}", owner="o", timestamp=1, response_json='{"object": "list"}'
    )
    payload = json.loads(webhook_json("embreq_abc", entry))
    assert payload == {
        "request_id": "embreq_abc",
        "status": "completed",
        "endpoint": "embeddings",
        "response": {"object": "list"},
    }
