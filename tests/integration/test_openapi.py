"""The OpenAPI document: served, valid, and matching the live routes; schemathesis against the app."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.config import PositiveDataAcceptanceConfig
from webtest import TestApp

from app import OPENAPI_PATH, ApiSettings, create_app
from auth import KeyChecker
from conftest import API_KEY
from sqlite_storage import open_storage

DOCUMENT = json.loads(OPENAPI_PATH.read_text())
_DATA = Path(tempfile.mkdtemp(prefix="llm-proxy-openapi-"))
_QUEUE, _STATUSES = open_storage(_DATA)
APP = create_app(
    queue=_QUEUE,
    statuses=_STATUSES,
    keys=KeyChecker([API_KEY]),
    # No worker runs here: waits would only ever time out, so they are kept short.
    settings=ApiSettings(max_body_bytes=64 * 1024, max_queue=1_000_000, sync_wait_max=0.01),
)


def bottle_routes(app: Any) -> set[tuple[str, str]]:
    routes = set()
    for route in app.app.routes:
        path = re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.rule)
        routes.add((route.method.lower(), path))
    return routes


def test_document_is_served_without_a_key() -> None:
    reply = TestApp(APP).get("/openapi.json")
    assert reply.content_type == "application/json"
    assert reply.json == DOCUMENT
    assert DOCUMENT["openapi"].startswith("3.1")


def test_document_and_routes_match() -> None:
    documented = {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert documented == bottle_routes(APP)


schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=60,
)
# A schema-valid body can still be refused with 422 when its Idempotency-Key was used before with
# another body: that is the documented answer, not a rejection of valid data.
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
)


@schema.parametrize()
def test_api_conforms(case: schemathesis.Case[Any]) -> None:
    headers = {"X-API-Key": API_KEY}
    case.call_and_validate(headers=headers)
