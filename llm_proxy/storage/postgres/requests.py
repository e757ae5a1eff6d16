"""The networked index of requests per owner: columns of ``llm_proxy_statuses`` (schema version 4)
written by the very statements that write a status, plus the waiting jobs that have no status yet.

Each status statement passes one small JSON document (``listing``) read through the record type
``llm_proxy_listing``, so the columns are named in one place (``COLUMNS``) and the statements get
one parameter more, not ten. Expired rows are never listed and go with the statuses' own purge.
"""

from __future__ import annotations

import json

from llm_proxy.domain.listing import RECENT_LATENCIES, Listed, Summary, id_condition, listed_endpoint
from llm_proxy.domain.status import Status, StatusEntry, WebhookState
from llm_proxy.storage.base import RequestIndex
from llm_proxy.storage.postgres.database import Database

COLUMNS = (
    "owner, status, submitted_at, endpoint, model, attempts, error_type, finished_at, upstream_ms, webhook"
)
_KEPT = [c.strip() for c in COLUMNS.split(",") if c.strip() != "submitted_at"]
ON_CONFLICT = (
    f"({', '.join(_KEPT)}) = ({', '.join('excluded.' + c for c in _KEPT)}),"
    " submitted_at = coalesce(llm_proxy_statuses.submitted_at, excluded.submitted_at)"
)
"""The SET clause of an upsert: the submit time first recorded stays."""


def listing_json(entry: StatusEntry) -> str:
    listed = Listed.of("", entry)
    return json.dumps(
        {
            "owner": listed.owner,
            "status": listed.status.value,
            # Unknown for entries written without it (a cancel's): the statement takes the job's.
            "submitted_at": entry.submitted_at,
            # The endpoint is the request id's (``endpoint_of``), which an entry does not carry:
            # the index reads and filters it from the id, and leaves the column empty.
            "endpoint": None,
            "model": listed.model,
            "attempts": listed.attempts,
            "error_type": listed.error_type,
            "finished_at": listed.finished_at,
            "upstream_ms": listed.upstream_ms,
            "webhook": listed.webhook,
        }
    )


def values(listing: str, submitted_fallback: str) -> str:
    """The listed columns' values, from the record ``listing``; ``submitted_fallback`` is an SQL
    expression for the submit time when the entry does not carry it."""
    return ", ".join(
        f"coalesce({listing}.submitted_at, {submitted_fallback}, {listing}.finished_at, 0)"
        if column.strip() == "submitted_at"
        else f"{listing}.{column.strip()}"
        for column in COLUMNS.split(",")
    )


_LIVE = "(expires_at IS NULL OR expires_at > now())"
_LIST_COLUMNS = (
    "request_id, owner, submitted_at, status, endpoint, model, attempts, error_type, finished_at,"
    " upstream_ms, webhook"
)
# Statuses, and waiting jobs not yet given one (a job gets its first status when a worker starts
# it), each read along its own (owner, submitted_at, request_id) index and merged.
_LIST = f"""
SELECT * FROM (
    (SELECT {_LIST_COLUMNS} FROM llm_proxy_statuses
     WHERE owner = %(owner)s AND {_LIVE} AND {{status_filter}} AND {{endpoint_filter}}
        AND (submitted_at, request_id) < (%(at)s, %(id)s)
     ORDER BY submitted_at DESC, request_id DESC LIMIT %(limit)s)
    UNION ALL
    (SELECT request_id, owner, submitted_at, 'pending', NULL, body::json ->> 'model', 0,
        NULL, NULL, NULL, NULL
     FROM llm_proxy_jobs AS j
     WHERE owner = %(owner)s AND state < 3 AND {{pending_filter}}
        AND (submitted_at, request_id) < (%(at)s, %(id)s)
        AND NOT EXISTS (SELECT 1 FROM llm_proxy_statuses AS s WHERE s.request_id = j.request_id)
     ORDER BY submitted_at DESC, request_id DESC LIMIT %(limit)s)
) AS listed
ORDER BY submitted_at DESC, request_id DESC LIMIT %(limit)s
"""  # noqa: S608
_PER_MINUTE = """
SELECT finished_at / 60000 * 60000 AS minute, count(*) FILTER (WHERE status = 'completed'),
    count(*) FILTER (WHERE status = 'error')
FROM llm_proxy_statuses WHERE owner = %(owner)s AND finished_at >= %(since)s GROUP BY minute
"""
_LATENCIES = f"""
SELECT upstream_ms FROM llm_proxy_statuses
WHERE owner = %(owner)s AND finished_at >= %(since)s AND upstream_ms IS NOT NULL
ORDER BY finished_at DESC LIMIT {RECENT_LATENCIES}
"""  # noqa: S608
_WEBHOOKS = f"""
SELECT webhook, count(*) FROM llm_proxy_statuses
WHERE owner = %(owner)s AND webhook IN ('pending', 'failed') AND {_LIVE} GROUP BY webhook
"""  # noqa: S608
_NEWEST = (2**63 - 1, "\U0010ffff")
"""A cursor after every row."""


class PostgresRequestIndex(RequestIndex):
    def __init__(self, database: Database) -> None:
        self._db = database

    def list_for(
        self,
        owner: str,
        *,
        status: Status | None = None,
        endpoint: str | None = None,
        before: tuple[int, str] | None = None,
        limit: int = 50,
    ) -> list[Listed]:
        at, request_id = before or _NEWEST
        args: dict[str, object] = {"owner": owner, "at": at, "id": request_id, "limit": limit}
        args["status"] = status.value if status is not None else None
        sql = _LIST.format(
            status_filter="true" if status is None else "status = %(status)s",
            # Both from the id: rows written before it was recorded carry a wrong or no endpoint.
            endpoint_filter="true" if endpoint is None else id_condition(endpoint),
            # A waiting job without a status is pending.
            pending_filter="false"
            if status not in (None, Status.PENDING)
            else "true"
            if endpoint is None
            else id_condition(endpoint),
        )
        rows = self._db.execute("cannot read the request index", sql, args)
        return [
            Listed(
                request_id=row[0],
                owner=row[1],
                submitted_at=int(row[2] or 0),
                status=Status(row[3]),
                endpoint=listed_endpoint(row[0]),
                model=row[5],
                attempts=int(row[6] or 0),
                error_type=row[7],
                finished_at=None if row[8] is None else int(row[8]),
                upstream_ms=None if row[9] is None else int(row[9]),
                webhook=row[10],
            )
            for row in rows
        ]

    def summary(self, owner: str, *, since: int) -> Summary:
        args = {"owner": owner, "since": since}
        with self._db.connection("cannot read the request index") as connection:
            per_minute = {
                int(minute): (int(done), int(failed))
                for minute, done, failed in connection.execute(_PER_MINUTE, args).fetchall()
            }
            latencies = [int(ms) for (ms,) in connection.execute(_LATENCIES, args).fetchall()]
            webhooks = {str(state): int(n) for state, n in connection.execute(_WEBHOOKS, args).fetchall()}
        return Summary(
            per_minute=per_minute,
            latencies_ms=latencies,
            webhooks_pending=webhooks.get(WebhookState.PENDING.value, 0),
            webhooks_failed=webhooks.get(WebhookState.FAILED.value, 0),
        )

    def purge_expired(self) -> int:
        """The rows are the statuses' own: their purge removes them."""
        return 0
