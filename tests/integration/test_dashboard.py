"""The dashboard in-process (webtest) on both back ends: sessions, cookies, CSRF, who sees what."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from webtest import TestApp, TestRequest

from conftest import API_KEY
from llm_proxy.dashboard.app import Dashboard, with_dashboard
from llm_proxy.dashboard.sessions import COOKIE, Sessions, SignedOut, SignInThrottle
from llm_proxy.domain.status import Status
from llm_proxy.storage.base import StorageUnavailable
from support.web import OTHER_KEY, InProcessWeb, chat

HOST = "dash.test"
ORIGIN = f"http://{HOST}"


class Dash:
    def __init__(self, web: InProcessWeb) -> None:
        self.web = web
        self.sessions = Sessions([API_KEY, OTHER_KEY])
        dashboard = Dashboard(
            service=web.service,
            queue=web.queue,
            index=web.backend.requests,
            api_keys=[API_KEY, OTHER_KEY],
            max_concurrent=2,
            throttle=SignInThrottle(free=2, longest=60),
            sessions=self.sessions,
            signed_out=SignedOut(end=web.backend.end_session, ended=web.backend.session_ended),
        )
        # Reached through a proxy of ours (as Heroku's router): its X-Forwarded-For is believed.
        self.wsgi = with_dashboard(web.app.app, dashboard.wsgi())
        self.app = TestApp(self.wsgi, extra_environ={"HTTP_HOST": HOST, "REMOTE_ADDR": "10.1.2.3"})

    def sign_in(self, key: str = API_KEY, **headers: str) -> Any:
        return self.app.post(
            "/dashboard/sign-in", {"api_key": key}, headers={"Origin": ORIGIN, **headers}, status="*"
        )

    def csrf(self) -> str:
        page = self.app.get("/dashboard/requests")
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert found is not None
        return found.group(1)

    def submit(self, key: str = API_KEY, content: str = "hello") -> str:
        reply = self.web.submit(chat(content), key=key, status=202)
        return str(reply.json["request_id"])


@pytest.fixture(params=["embedded", "postgres"])
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    url = request.getfixturevalue("database_url") if request.param == "postgres" else None
    web = InProcessWeb(tmp_path / "data", database_url=url)
    try:
        yield Dash(web)
    finally:
        web.close()


def test_no_page_and_no_json_without_a_session(dash: Dash) -> None:
    request_id = dash.submit()
    for path in ("/dashboard", "/dashboard/", "/dashboard/requests", f"/dashboard/requests/{request_id}"):
        reply = dash.app.get(path, status=303)
        assert reply.headers["Location"].endswith("/dashboard/sign-in")
        assert request_id not in reply.text
    for path in ("/dashboard/api/overview", "/dashboard/api/requests"):
        reply = dash.app.get(path, status=401)
        assert reply.json["error"]["type"] == "authentication_error"
    # A forged, a tampered and an expired cookie are no session either.
    value, _ = dash.sessions.issue("0" * 32)
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    expired, _ = dash.sessions.issue("0" * 32, now=0)
    for cookie in ("forged.1.2.3", tampered, expired):
        dash.app.set_cookie(COOKIE, cookie)
        dash.app.get("/dashboard/api/overview", status=401)
    # Neither are posts.
    dash.app.reset()
    dash.app.post(
        f"/dashboard/requests/{request_id}/cancel", {"csrf": "x"}, headers={"Origin": ORIGIN}, status=403
    )
    assert dash.web.service.lookup(request_id).entry.status is Status.PENDING  # type: ignore[union-attr]


def test_the_session_cookie_is_http_only_strict_expiring_and_secure_over_https(dash: Dash) -> None:
    reply = dash.sign_in()
    assert reply.status_int == 303 and reply.headers["Location"].endswith("/dashboard")
    cookie = reply.headers["Set-Cookie"]
    attributes = [part.strip() for part in cookie.split(";")]
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/dashboard" in attributes
    assert "Max-Age=43200" in attributes and "Secure" not in attributes
    assert API_KEY not in cookie
    dash.app.get("/dashboard", status=200)

    # Behind an HTTPS-terminating proxy (X-Forwarded-Proto), the cookie is Secure, and the page's
    # own origin is https://..., so the http one is foreign there.
    dash.sign_in(**{"X-Forwarded-Proto": "https"}).mustcontain("Refused")
    reply = dash.app.post(
        "/dashboard/sign-in",
        {"api_key": API_KEY},
        headers={"Origin": f"https://{HOST}", "X-Forwarded-Proto": "https"},
        status=303,
    )
    assert "Secure" in [part.strip() for part in reply.headers["Set-Cookie"].split(";")]


def test_pages_carry_a_policy_that_allows_only_their_own_files(dash: Dash) -> None:
    dash.sign_in()
    reply = dash.app.get("/dashboard")
    policies = reply.headers.getall("Content-Security-Policy")
    assert (
        len(policies) == 1 and "script-src 'self'" in policies[0] and "frame-ancestors 'none'" in policies[0]
    )
    assert reply.headers["X-Frame-Options"] == "SAMEORIGIN" and reply.headers["Cache-Control"] == "no-store"
    assert (
        'src="/dashboard/static/dashboard.js"' in reply.text and "http" not in reply.text.split("<body>")[0]
    )
    assert dash.app.get("/dashboard/static/dashboard.css").content_type == "text/css"
    dash.app.get("/dashboard/static/../app.py", status=404)
    # The API keeps its own, stricter policy.
    api = dash.app.get("/health", status="*")
    assert api.headers.getall("Content-Security-Policy") == ["default-src 'none'; frame-ancestors 'none'"]


def test_wrong_keys_are_refused_alike_and_repeated_failures_slow_down(dash: Dash) -> None:
    first = dash.sign_in("wrong-key")
    second = dash.sign_in("")
    assert first.status_int == second.status_int == 401
    assert "Set-Cookie" not in first.headers
    assert first.text == second.text and "Sign-in failed." in first.text
    # The third failure in a row waits: even the right key must wait now, and says nothing of it.
    third = dash.sign_in(API_KEY)
    assert third.status_int == 429 and int(third.headers["Retry-After"]) >= 1
    assert "Set-Cookie" not in third.headers
    # Another address is not slowed down by this one's failures.
    other = dash.sign_in(API_KEY, **{"X-Forwarded-For": "203.0.113.9"})
    assert other.status_int == 303


def test_a_key_sees_only_its_own_requests(dash: Dash) -> None:
    mine = dash.submit(API_KEY, "mine")
    theirs = dash.submit(OTHER_KEY, "theirs")
    dash.sign_in(API_KEY)
    overview = dash.app.get("/dashboard/api/overview").json
    assert [row["id"] for row in overview["recent"]] == [mine]
    assert overview["waiting"] == 2  # the queue's depth is the service's
    listed = dash.app.get("/dashboard/api/requests").json
    assert [row["id"] for row in listed["rows"]] == [mine]
    page = dash.app.get("/dashboard/requests")
    assert mine in page.text and theirs not in page.text
    assert "mine" in dash.app.get(f"/dashboard/requests/{mine}").text
    other = dash.app.get(f"/dashboard/requests/{theirs}", status=404)
    assert "theirs" not in other.text
    # Finding it by id leads to the same refusal.
    found = dash.app.get("/dashboard/requests", {"id": theirs}, status=303)
    dash.app.get(found.headers["Location"], status=404)
    # Nor can it be cancelled.
    dash.app.post(
        f"/dashboard/requests/{theirs}/cancel", {"csrf": dash.csrf()}, headers={"Origin": ORIGIN}, status=404
    )
    assert dash.web.service.lookup(theirs).entry.status is Status.PENDING  # type: ignore[union-attr]


def test_cross_site_posts_are_refused(dash: Dash) -> None:
    request_id = dash.submit()
    dash.sign_in()
    token = dash.csrf()
    cancel = f"/dashboard/requests/{request_id}/cancel"
    dash.app.post(cancel, {}, headers={"Origin": ORIGIN}, status=403)  # no token
    dash.app.post(cancel, {"csrf": "0" * 64}, headers={"Origin": ORIGIN}, status=403)  # wrong token
    dash.app.post(cancel, {"csrf": token}, headers={"Origin": "https://evil.example"}, status=403)
    dash.app.post(cancel, {"csrf": token}, headers={"Referer": "https://evil.example/x"}, status=403)
    dash.app.post(
        "/dashboard/sign-out", {"csrf": token}, headers={"Origin": "https://evil.example"}, status=403
    )
    dash.app.post(
        "/dashboard/sign-in", {"api_key": API_KEY}, headers={"Origin": "https://evil.example"}, status=403
    )
    # Another session's token is not this one's.
    _, session = dash.sessions.issue(dash.sessions.read(dash.app.cookies[COOKIE]).owner)  # type: ignore[union-attr]
    dash.app.post(cancel, {"csrf": dash.sessions.csrf_token(session)}, headers={"Origin": ORIGIN}, status=403)
    assert dash.web.service.lookup(request_id).entry.status is Status.PENDING  # type: ignore[union-attr]

    done = dash.app.post(cancel, {"csrf": token}, headers={"Origin": ORIGIN}, status=303)
    assert "notice=cancelled" in done.headers["Location"]
    assert dash.web.service.lookup(request_id).entry.status is Status.CANCELLED  # type: ignore[union-attr]
    page = dash.app.get(done.headers["Location"])
    assert "cancelled" in page.text and "Cancel this request" not in page.text


def test_sign_out_ends_the_session_in_the_browser(dash: Dash) -> None:
    dash.sign_in()
    token = dash.csrf()
    reply = dash.app.post("/dashboard/sign-out", {"csrf": token}, headers={"Origin": ORIGIN}, status=303)
    assert "Max-Age=0" in reply.headers["Set-Cookie"]
    dash.app.get("/dashboard", status=303)
    dash.app.get("/dashboard/api/overview", status=401)


def test_a_copy_of_a_signed_out_cookie_opens_nothing(dash: Dash) -> None:
    """A signed cookie stays valid until it expires: signing out must end its session where it
    is checked, or a copy (another browser tab's, a stolen one) would go on working."""
    dash.sign_in()
    kept = dash.app.cookies[COOKIE]
    other = TestApp(dash.wsgi, extra_environ={"HTTP_HOST": HOST, "REMOTE_ADDR": "10.1.2.4"})
    other.set_cookie(COOKIE, kept)
    other.get("/dashboard", status=200)
    token = dash.csrf()
    dash.app.post("/dashboard/sign-out", {"csrf": token}, headers={"Origin": ORIGIN}, status=303)
    other.get("/dashboard", status=303)
    other.get("/dashboard/api/overview", status=401)
    # Signing in again starts a new session, which works.
    dash.sign_in()
    dash.app.get("/dashboard", status=200)


def test_a_store_that_cannot_say_who_signed_out_answers_503_never_500(dash: Dash, tmp_path: Path) -> None:
    def unavailable(*args: Any) -> Any:
        raise StorageUnavailable("cannot read sign-outs: the database is gone")

    dash.sign_in()
    token = dash.csrf()
    failing = Dashboard(
        service=dash.web.service,
        queue=dash.web.queue,
        index=dash.web.backend.requests,
        api_keys=[API_KEY, OTHER_KEY],
        max_concurrent=2,
        sessions=dash.sessions,
        signed_out=SignedOut(end=unavailable, ended=unavailable),
    )
    app = TestApp(with_dashboard(dash.web.app.app, failing.wsgi()), extra_environ={"HTTP_HOST": HOST})
    app.set_cookie(COOKIE, dash.app.cookies[COOKIE])
    page = app.get("/dashboard", status=503)
    assert "retry shortly" in page.text and page.headers["Retry-After"] == "5"
    answer = app.get("/dashboard/api/overview", status=503)
    assert answer.json["error"]["type"] == "service_unavailable"
    # Signing out still signs this browser out, and says to retry.
    reply = app.post("/dashboard/sign-out", {"csrf": token}, headers={"Origin": ORIGIN}, status=503)
    assert "Max-Age=0" in reply.headers["Set-Cookie"]


def test_the_requests_page_filters_and_pages_by_cursor(dash: Dash) -> None:
    ids = [dash.submit(content=f"n{n}") for n in range(55)]
    dash.sign_in()
    first = dash.app.get("/dashboard/api/requests").json
    older = dash.app.get(first["older"].replace("/dashboard/requests", "/dashboard/api/requests")).json
    # Newest first; submits within one millisecond are ordered by id, each listed once.
    seen = [row["id"] for row in first["rows"] + older["rows"]]
    assert len(first["rows"]) == 50 and not older["older"]
    assert sorted(seen) == sorted(ids)
    page = dash.app.get("/dashboard/requests")
    assert 'href="/dashboard/requests?before=' in page.text
    assert dash.app.get("/dashboard/api/requests", {"status": "error"}).json["rows"] == []
    pending = dash.app.get("/dashboard/api/requests", {"status": "pending"}).json["rows"]
    assert len(pending) == 50 and pending[0]["model"] == "gpt-test"


ENDPOINT_BODIES = {
    "/v1/chat/completions": {"model": "gpt-test", "messages": [{"role": "user", "content": "chat with me"}]},
    "/v1/embeddings": {"model": "embed-test", "input": "embed this text"},
    "/v1/responses": {"model": "gpt-test", "input": "ask the responses api"},
    "/v1/completions": {"model": "gpt-test", "prompt": "complete this prompt"},
}
ANSWERS = {
    "/v1/chat/completions": {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "chat answer"}}]
    },
    "/v1/embeddings": {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.123456] * 8} for i in range(2)],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    },
    "/v1/responses": {
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "the responses answer", "annotations": []}],
            },
        ],
    },
    "/v1/completions": {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "the completion text"}],
    },
}
SHOWN = {
    "/v1/chat/completions": ("chat with me", "chat answer"),
    "/v1/embeddings": ("embed this text", "2 vectors of 8 dimensions"),
    "/v1/responses": ("ask the responses api", "the responses answer"),
    "/v1/completions": ("complete this prompt", "the completion text"),
}


def test_each_endpoints_requests_are_listed_filtered_and_shown(dash: Dash) -> None:
    ids = {
        path: str(
            dash.web.app.post(
                path,
                json.dumps(body),
                headers={"X-API-Key": API_KEY},
                content_type="application/json",
                status=202,
            ).json["request_id"]
        )
        for path, body in ENDPOINT_BODIES.items()
    }
    dash.sign_in()
    listed = dash.app.get("/dashboard/api/requests").json
    assert {row["id"]: row["endpoint"] for row in listed["rows"]} == {i: path for path, i in ids.items()}
    assert listed["endpoints"] == list(ENDPOINT_BODIES)
    for path, request_id in ids.items():
        filtered = dash.app.get("/dashboard/api/requests", {"endpoint": path}).json
        assert [row["id"] for row in filtered["rows"]] == [request_id]
        assert filtered["endpoint_filter"] == path
    assert '<option value="/v1/embeddings"' in dash.app.get("/dashboard/requests").text
    # Each one's question and answer on its page (the vectors counted, not shown).
    for path, request_id in ids.items():
        found = dash.web.service.lookup(request_id)
        assert found is not None
        done = found.entry.replace(status=Status.COMPLETED, response_json=json.dumps(ANSWERS[path]))
        dash.web.statuses.put(request_id, done, ttl=60)
        page = dash.app.get(f"/dashboard/requests/{request_id}").text
        asked, answered = SHOWN[path]
        assert asked in page and answered in page and f"<dd>{path}</dd>" in page
        assert "0.123456" not in page
    assert [
        row["id"]
        for row in dash.app.get("/dashboard/api/requests", {"endpoint": "/v1/responses"}).json["rows"]
    ] == [ids["/v1/responses"]]


@pytest.mark.parametrize(
    "cursor", ["\u00b2.chatreq_0123456789abcdef", "1" * 40 + ".chatreq_0123456789abcdef", "-1.x"]
)
def test_a_bad_paging_cursor_shows_the_newest_page(dash: Dash, cursor: str) -> None:
    request_id = dash.submit()
    dash.sign_in()
    # Raw bytes: Bottle reads a query as Latin-1, where %B2 is "²" (isdigit() true, int() refuses).
    query = "before=" + quote(cursor, encoding="latin-1")
    assert [row["id"] for row in dash.app.get(f"/dashboard/api/requests?{query}").json["rows"]] == [
        request_id
    ]
    page = dash.app.get(f"/dashboard/requests?{query}")
    assert request_id in page.text


def chunked(data: bytes, size: int = 4096) -> bytes:
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)
    )
    return framed + b"0\r\n\r\n"


def test_dashboard_posts_refuse_large_bodies_before_reading_them(dash: Dash) -> None:
    big = b"api_key=" + b"k" * 50_000  # over the limit, under Bottle's own (100 KiB)
    form = "application/x-www-form-urlencoded"
    # A declared length over the limit: refused unread.
    dash.app.post("/dashboard/sign-in", big, headers={"Origin": ORIGIN}, content_type=form, status=413)
    # A chunked one: read up to the limit only.
    request = TestRequest.blank(
        "/dashboard/sign-in",
        method="POST",
        headers={"Origin": ORIGIN, "Host": HOST, "Transfer-Encoding": "chunked"},
        content_type="application/x-www-form-urlencoded",
    )
    request.environ["wsgi.input"] = io.BytesIO(chunked(big))
    request.environ.pop("CONTENT_LENGTH", None)
    request.environ["REMOTE_ADDR"] = "10.1.2.3"
    assert request.get_response(dash.wsgi).status_int == 413
    # Signed in, the other POSTs are bounded alike; small forms still work.
    assert dash.sign_in().status_int == 303
    token = dash.csrf()
    request_id = dash.submit()
    cancel = f"/dashboard/requests/{request_id}/cancel"
    padded = f"csrf={token}&pad=".encode() + b"p" * 50_000
    dash.app.post(cancel, padded, headers={"Origin": ORIGIN}, content_type=form, status=413)
    dash.app.post("/dashboard/sign-out", padded, headers={"Origin": ORIGIN}, content_type=form, status=413)
    assert dash.web.service.lookup(request_id).entry.status is Status.PENDING  # type: ignore[union-attr]
    dash.app.post(cancel, {"csrf": token}, headers={"Origin": ORIGIN}, status=303)
    assert dash.web.service.lookup(request_id).entry.status is Status.CANCELLED  # type: ignore[union-attr]


def test_a_direct_client_cannot_escape_the_throttle_by_forging_x_forwarded_for(dash: Dash) -> None:
    def attempt(n: int, peer: str) -> int:
        reply = dash.app.post(
            "/dashboard/sign-in",
            {"api_key": "wrong-key"},
            headers={"Origin": ORIGIN, "X-Forwarded-For": f"198.51.100.{n}"},
            extra_environ={"REMOTE_ADDR": peer},
            status="*",
        )
        return int(reply.status_int)

    # Reached directly from the internet: keyed on the socket's peer, whatever the header says.
    assert [attempt(n, "203.0.113.7") for n in range(3)] == [401, 401, 429]
    # Through a proxy of ours (private or loopback peer): each forwarded client on its own.
    assert [attempt(n, "127.0.0.1") for n in range(3)] == [401, 401, 401]
    assert [attempt(n, "10.0.0.5") for n in range(3, 6)] == [401, 401, 401]
