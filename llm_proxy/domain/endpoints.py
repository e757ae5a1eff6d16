"""The OpenAI endpoints the proxy queues, and which one a request id belongs to.

A request's endpoint is carried by its id's prefix (``chatreq_``, ``embreq_``, ...), not by a
stored field: both back ends keep jobs, statuses and idempotency records as they were, every id
ever issued still reads as what it was (ids issued before there were other endpoints are all
``chatreq_``), and an id answers under its own endpoint only, without a read of the store.
"""

from __future__ import annotations

from enum import StrEnum


class Endpoint(StrEnum):
    """The value is the path under ``/v1`` here and under ``OPENAI_API_BASE_URL`` upstream; it is
    also the ``endpoint`` of webhook payloads and metrics."""

    CHAT = "chat/completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    COMPLETIONS = "completions"

    @property
    def prefix(self) -> str:
        return _PREFIXES[self]

    @property
    def path(self) -> str:
        """The submit route; a request's status is at ``{path}/{request_id}``."""
        return "/v1/" + self.value

    @property
    def streams(self) -> bool:
        """Whether the upstream can stream this endpoint's answers (embeddings cannot)."""
        return self is not Endpoint.EMBEDDINGS


_PREFIXES = {
    Endpoint.CHAT: "chatreq_",
    Endpoint.EMBEDDINGS: "embreq_",
    Endpoint.RESPONSES: "respreq_",
    Endpoint.COMPLETIONS: "cmplreq_",
}


def endpoint_of(request_id: str) -> Endpoint:
    """The endpoint an id was issued for; chat for anything else, as every earlier id was."""
    for endpoint, prefix in _PREFIXES.items():
        if request_id.startswith(prefix):
            return endpoint
    return Endpoint.CHAT
