"""The OpenAPI document: served, valid, and matching the live routes; schemathesis against the app."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.config import PositiveDataAcceptanceConfig

from conftest import API_KEY
from llm_proxy.api.app import OPENAPI_PATH
from support.web import InProcessWeb

DOCUMENT = json.loads(OPENAPI_PATH.read_text())


class _AppOfTheModule:
    """The WSGI app schemathesis calls, built by the ``web`` fixture (in pytest's temporary
    folders), not when the module is imported."""

    app: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


APP = _AppOfTheModule()


@pytest.fixture(scope="module", autouse=True)
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessWeb]:
    # No worker runs here: waits would only ever time out, so they are kept short.
    opened = InProcessWeb(
        tmp_path_factory.mktemp("openapi") / "data",
        max_queue=1_000_000,
        max_body_bytes=64 * 1024,
        sync_wait_max=0.01,
    )
    APP.app = opened.app.app
    yield opened
    APP.app = None
    opened.close()


def bottle_routes(app: Any) -> set[tuple[str, str]]:
    routes = set()
    for route in app.app.routes:
        path = re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.rule)
        routes.add((route.method.lower(), path))
    return routes


def test_document_is_served_without_a_key(web: InProcessWeb) -> None:
    reply = web.app.get("/openapi.json")
    assert reply.content_type == "application/json"
    assert reply.json == DOCUMENT
    assert DOCUMENT["openapi"].startswith("3.1")


def test_document_and_routes_match(web: InProcessWeb) -> None:
    documented = {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert documented == bottle_routes(web.app.app)


schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.app = APP
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=60,
)
# A schema-valid body can still be refused with 422 when its Idempotency-Key was used before with
# another body: that is the documented answer, not a rejection of valid data.
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
)


WEBHOOK_URL = re.compile(
    DOCUMENT["components"]["schemas"]["ChatCompletionRequest"]["properties"]["webhookUrl"]["pattern"]
)


def filter_body(ctx: Any, body: Any) -> bool:
    """The documented webhookUrl pattern is a safe subset of what is accepted (public IP literals
    and host names of any shape pass, refused at delivery if they do not resolve), so a body made
    invalid only by a webhookUrl outside it is not an invalid request."""
    url = body.get("webhookUrl") if isinstance(body, dict) else None
    return not isinstance(url, str) or bool(WEBHOOK_URL.match(url))


@schema.hooks.apply(filter_body)
@schema.parametrize()
def test_api_conforms(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers={"X-API-Key": API_KEY})
