"""The dashboard's routes (a Bottle app of its own) and ``with_dashboard``, which serves it beside
the API under ``/dashboard``.

Pages are rendered on the server from the templates in ``templates/``; ``static/`` holds the one
stylesheet and the one script (polling ``/dashboard/api/overview`` for live numbers). Everything
is served from here: no CDN, no build step, nothing fetched from elsewhere.

Security: every page and JSON answer needs a session (``sessions``); every POST that changes
something needs the session's CSRF token and our own Origin, on top of the cookie's
SameSite=Strict; a key only ever sees its own requests (owner tags, as in the API); failed sign-ins
are answered alike, and slowed down per client address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from bottle import Bottle, HTTPResponse, SimpleTemplate, request

from llm_proxy.api.auth import KeyChecker, owner_of
from llm_proxy.api.http import (
    SECURITY_HEADERS,
    BadLength,
    BodyTooLarge,
    StartResponse,
    UnreadableBody,
    WSGIApp,
    json_response,
    read_body,
)
from llm_proxy.api.service import Ended, RequestService
from llm_proxy.dashboard import views
from llm_proxy.dashboard.sessions import (
    COOKIE,
    Session,
    Sessions,
    SignedOut,
    SignInThrottle,
    client_address,
    is_https,
    same_origin,
)
from llm_proxy.domain.job import now_ms
from llm_proxy.domain.listing import ENDPOINTS, Summary
from llm_proxy.domain.status import Status
from llm_proxy.storage.base import JobQueue, RequestIndex, StorageUnavailable

log = logging.getLogger("llm_proxy.dashboard")

PREFIX = "/dashboard"
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
PAGE_SIZE = 50
RECENT_ROWS = 10
SUMMARY_SECONDS = 2.0
"""How long an owner's summary is reused: many open tabs polling cost one read per interval."""
POLL_SECONDS = 3
HOUR_MS = 3_600_000
FORM_LIMIT = 8192
"""The largest form body a dashboard POST reads (its forms hold a key or a CSRF token): the body
is read before anything else is known of the client, so it is refused beyond this, never stored."""
FORM_FIELDS = 20
CURSOR_DIGITS = 16
"""A cursor's time is milliseconds since the epoch (13 digits for millennia to come)."""
REQUEST_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

# Pages load our own stylesheet and script only; the chart is inline SVG (markup, not an image).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Referrer-Policy same-origin rather than the API's no-referrer: under no-referrer browsers send
# ``Origin: null`` with a form's POST, and the Origin check needs the real one.
_OWN = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "same-origin"}
_HEADERS = [(name, _OWN.get(name, value)) for name, value in SECURITY_HEADERS]

RateLimits = Callable[[], Sequence[Mapping[str, Any]]]
"""The hook for the rate-limit state per model: one mapping per model (column -> value), shown
on the overview when it returns any; None (the default) shows nothing."""


def _valid_id(request_id: str) -> bool:
    return 16 <= len(request_id) <= 64 and set(request_id) <= REQUEST_ID_CHARS


def _cursor(raw: str | None) -> tuple[int, str] | None:
    """The paging cursor ``<submitted_at>.<request_id>``; None (the newest page) for anything else.
    ASCII digits only: ``str.isdigit`` is true of others (``"²"``) that ``int`` refuses."""
    at, _, request_id = (raw or "").partition(".")
    if not (at.isascii() and at.isdigit() and len(at) <= CURSOR_DIGITS) or not _valid_id(request_id):
        return None
    return int(at), request_id


SIGNED_OUT_MARGIN = 3600
"""Seconds a sign-out is kept past its session's expiry: the store's clock may run ahead of the
web process's, which judges the expiry."""


class Dashboard:
    def __init__(
        self,
        *,
        service: RequestService,
        queue: JobQueue,
        index: RequestIndex,
        api_keys: Sequence[str],
        max_concurrent: int,
        rate_limits: RateLimits | None = None,
        throttle: SignInThrottle | None = None,
        sessions: Sessions | None = None,
        signed_out: SignedOut | None = None,
    ) -> None:
        self._service = service
        self._queue = queue
        self._index = index
        self._keys = KeyChecker(api_keys)
        self._owners = frozenset(owner_of(key) for key in api_keys)
        self._sessions = sessions or Sessions(api_keys)
        self._signed_out = signed_out
        self._throttle = throttle or SignInThrottle()
        self._max_concurrent = max_concurrent
        self._rate_limits = rate_limits
        self._summaries: dict[str, tuple[float, Summary]] = {}
        self._templates: dict[str, SimpleTemplate] = {}
        self._static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}

    # -- plumbing ----------------------------------------------------------------------------------

    def render(self, name: str, code: int = 200, /, **data: Any) -> HTTPResponse:
        template = self._templates.get(name)
        if template is None:
            template = self._templates[name] = SimpleTemplate(name=name, lookup=[str(TEMPLATES)])
        data.setdefault("session", None)
        data.setdefault("csrf", "")
        data.setdefault("poll", 0)
        reply = HTTPResponse(body=template.render(**data), status=code)
        reply.content_type = "text/html; charset=utf-8"
        return reply

    def session(self) -> Session | None:
        found = self._sessions.read(request.get_cookie(COOKIE))
        if found is None or found.owner not in self._owners:
            return None
        if self._signed_out is not None and self._signed_out.ended(found.nonce):
            return None
        return found

    def _cookie(self, value: str, max_age: int) -> str:
        secure = "; Secure" if is_https(request.environ) else ""
        return f"{COOKIE}={value}; Path={PREFIX}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def _page(self, name: str, session: Session, **data: Any) -> HTTPResponse:
        return self.render(name, session=session, csrf=self._sessions.csrf_token(session), **data)

    def _refused(self, why: str) -> HTTPResponse:
        return self.render("message", 403, title="Refused", message=why)

    def _unavailable(self, exc: StorageUnavailable) -> HTTPResponse:
        log.error("dashboard: storage unavailable: %s", exc)
        reply = self.render(
            "message", 503, title="Unavailable", message="The store cannot be read right now; retry shortly."
        )
        reply.set_header("Retry-After", "5")
        return reply

    def _form(self) -> dict[str, str] | HTTPResponse:
        """The fields of a POST's urlencoded form (the first value of each), read with a bound:
        Bottle's ``request.forms`` would read any body in full (a chunked one to a temporary file)
        before a check could refuse it."""
        try:
            raw = read_body(request.environ, FORM_LIMIT)
        except BodyTooLarge:
            reply = self.render("message", 413, title="Too large", message="That form is too large.")
            reply.set_header("Connection", "close")
            return reply
        except BadLength:
            return self.render("message", 400, title="Bad request", message="Invalid Content-Length.")
        except UnreadableBody as exc:
            reply = self.render("message", exc.status, title="Bad request", message=exc.message)
            reply.set_header("Connection", "close")
            return reply
        kind = str(request.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return {}
        try:
            fields = parse_qs(raw.decode("ascii", "replace"), max_num_fields=FORM_FIELDS)
        except ValueError:
            return self.render("message", 400, title="Bad request", message="That form has too many fields.")
        return {name: values[0] for name, values in fields.items() if values}

    def _checked_post(self) -> tuple[Session, dict[str, str]] | HTTPResponse:
        """The session and form of a state-changing request that passes every cross-site check."""
        if not same_origin(request.environ):
            return self._refused("This action must come from the dashboard's own pages.")
        session = self.session()
        if session is None:
            return self._refused("Sign in first.")
        form = self._form()
        if isinstance(form, HTTPResponse):
            return form
        if not self._sessions.csrf_ok(session, form.get("csrf")):
            return self._refused(
                "This form is out of date or did not come from the dashboard; reload the page."
            )
        return session, form

    def _summary(self, owner: str) -> Summary:
        now = time.monotonic()
        cached = self._summaries.get(owner)
        if cached is not None and cached[0] > now:
            return cached[1]
        summary = self._index.summary(owner, since=now_ms() - HOUR_MS)
        self._summaries[owner] = (now + SUMMARY_SECONDS, summary)
        return summary

    def _overview(self, owner: str) -> dict[str, Any]:
        counts = self._queue.counts()
        limits: Sequence[Mapping[str, Any]] = ()
        if self._rate_limits is not None:
            try:
                limits = self._rate_limits()
            except StorageUnavailable as exc:
                log.warning("dashboard: rate-limit state unavailable: %s", exc)
        return views.overview(
            summary=self._summary(owner),
            waiting=counts.waiting,
            in_flight=counts.in_flight,
            max_concurrent=self._max_concurrent,
            recent=self._index.list_for(owner, limit=RECENT_ROWS),
            rate_limits=limits,
            now_ms=now_ms(),
        )

    # -- the app -----------------------------------------------------------------------------------

    def wsgi(self) -> WSGIApp:
        app = Bottle()
        app.config["catchall"] = False

        def store_guarded(callback: Callable[..., Any]) -> Callable[..., Any]:
            # Every route reads the store at least for its session (``SignedOut``): when it
            # cannot, a 503 that says to retry, as JSON under the API, never a 500.
            def guarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    return callback(*args, **kwargs)
                except StorageUnavailable as exc:
                    if request.path.startswith(f"{PREFIX}/api/"):
                        log.error("dashboard: storage unavailable: %s", exc)
                        reply = json_response(
                            503, {"error": {"message": "Retry shortly.", "type": "service_unavailable"}}
                        )
                        reply.set_header("Retry-After", "5")
                        return reply
                    return self._unavailable(exc)

            return guarded

        app.install(store_guarded)

        def signed_in_page(page: Callable[..., HTTPResponse]) -> Callable[..., HTTPResponse]:
            def guarded(**kwargs: Any) -> HTTPResponse:
                session = self.session()
                if session is None:
                    return HTTPResponse(status=303, headers={"Location": f"{PREFIX}/sign-in"})
                try:
                    return page(session, **kwargs)
                except StorageUnavailable as exc:
                    return self._unavailable(exc)

            return guarded

        def signed_in_json(answer: Callable[..., Any]) -> Callable[..., HTTPResponse]:
            def guarded(**kwargs: Any) -> HTTPResponse:
                session = self.session()
                if session is None:
                    return json_response(
                        401, {"error": {"message": "Sign in first.", "type": "authentication_error"}}
                    )
                try:
                    return json_response(200, answer(session, **kwargs))
                except StorageUnavailable as exc:
                    log.error("dashboard: storage unavailable: %s", exc)
                    return json_response(
                        503, {"error": {"message": "Retry shortly.", "type": "service_unavailable"}}
                    )

            return guarded

        def overview(session: Session) -> HTTPResponse:
            return self._page(
                "overview", session, title="Overview", poll=POLL_SECONDS, **self._overview(session.owner)
            )

        app.route(PREFIX, "GET", signed_in_page(overview))
        app.route(f"{PREFIX}/", "GET", signed_in_page(overview))
        app.route(f"{PREFIX}/api/overview", "GET", signed_in_json(lambda s: self._overview(s.owner)))

        def sign_in_form() -> HTTPResponse:
            if self.session() is not None:
                return HTTPResponse(status=303, headers={"Location": PREFIX})
            return self.render("sign_in", title="Sign in", failed=False)

        def sign_in() -> HTTPResponse:
            if not same_origin(request.environ):
                return self._refused("Sign in from the dashboard's own page.")
            address = client_address(request.environ)
            wait = self._throttle.wait(address)
            if wait > 0:
                reply = self.render("sign_in", 429, title="Sign in", failed=True, wait=int(wait + 0.999))
                reply.set_header("Retry-After", str(int(wait + 0.999)))
                return reply
            form = self._form()
            if isinstance(form, HTTPResponse):
                return form
            presented = form.get("api_key") or ""
            owner = self._keys.owner(presented.strip())
            if owner is None:
                self._throttle.failed(address)
                # The same answer whatever was wrong: empty, unknown, malformed.
                return self.render("sign_in", 401, title="Sign in", failed=True, wait=0)
            self._throttle.succeeded(address)
            value, _ = self._sessions.issue(owner)
            reply = HTTPResponse(status=303, headers={"Location": PREFIX})
            reply.set_header("Set-Cookie", self._cookie(value, self._sessions.lifetime))
            return reply

        def sign_out() -> HTTPResponse:
            try:
                checked = self._checked_post()
                if isinstance(checked, HTTPResponse):
                    return checked
                session, _ = checked
                if self._signed_out is not None:
                    # For every process: a copy of the cookie (kept by a browser, or stolen) no
                    # longer opens the dashboard.
                    self._signed_out.end(session.nonce, session.expires_at + SIGNED_OUT_MARGIN)
                reply = HTTPResponse(status=303, headers={"Location": f"{PREFIX}/sign-in"})
            except StorageUnavailable as exc:
                # This browser is signed out all the same; the page says to retry for the rest.
                reply = self._unavailable(exc)
            reply.set_header("Set-Cookie", self._cookie("", 0))
            return reply

        def listing(session: Session) -> dict[str, Any]:
            query = request.query
            status_name = query.get("status") or ""
            status = Status(status_name) if status_name in {s.value for s in Status} else None
            endpoint = query.get("endpoint") if query.get("endpoint") in ENDPOINTS else None
            before = _cursor(query.get("before"))
            rows = self._index.list_for(
                session.owner, status=status, endpoint=endpoint, before=before, limit=PAGE_SIZE + 1
            )
            more = len(rows) > PAGE_SIZE
            rows = rows[:PAGE_SIZE]
            filters = {
                k: v
                for k, v in (("status", status_name if status else ""), ("endpoint", endpoint or ""))
                if v
            }
            older = ""
            if more and rows:
                cursor = f"{rows[-1].submitted_at}.{rows[-1].request_id}"
                older = f"{PREFIX}/requests?{urlencode({**filters, 'before': cursor})}"
            now = now_ms()
            return {
                "rows": [views.row(listed, now) for listed in rows],
                "status_filter": status.value if status else "",
                "endpoint_filter": endpoint or "",
                "statuses": [s.value for s in Status],
                "endpoints": list(ENDPOINTS),
                "older": older,
                "paged": before is not None,
                "newest": f"{PREFIX}/requests?{urlencode(filters)}",
            }

        def requests_page(session: Session) -> HTTPResponse:
            wanted = (request.query.get("id") or "").strip()
            if wanted:
                if _valid_id(wanted):
                    return HTTPResponse(status=303, headers={"Location": f"{PREFIX}/requests/{wanted}"})
                return self._page("message", session, title="Not found", message="No request has that id.")
            return self._page("requests", session, title="Requests", **listing(session))

        app.route(f"{PREFIX}/requests", "GET", signed_in_page(requests_page))
        app.route(f"{PREFIX}/api/requests", "GET", signed_in_json(listing))

        def one_request(session: Session, request_id: str) -> HTTPResponse:
            found = self._service.lookup(request_id) if _valid_id(request_id) else None
            # Another key's request is answered exactly like one that does not exist.
            if found is None or found.entry.owner != session.owner:
                return self.render(
                    "message",
                    404,
                    session=session,
                    csrf=self._sessions.csrf_token(session),
                    title="Not found",
                    message="No request of yours has that id (or its result expired).",
                )
            data = views.detail(request_id, found.entry, found.position, now_ms())
            notice = request.query.get("notice") or ""
            return self._page("request", session, title=f"Request {request_id}", notice=notice[:200], **data)

        app.route(f"{PREFIX}/requests/<request_id>", "GET", signed_in_page(one_request))

        def cancel(request_id: str) -> HTTPResponse:
            checked = self._checked_post()
            if isinstance(checked, HTTPResponse):
                return checked
            if not _valid_id(request_id):
                return self.render(
                    "message", 404, title="Not found", message="No request of yours has that id."
                )
            try:
                # The same path as DELETE /v1/<endpoint>/<id>.
                result = self._service.cancel(checked[0].owner, request_id)
            except StorageUnavailable as exc:
                return self._unavailable(exc)
            if result is None:
                return self.render(
                    "message", 404, title="Not found", message="No request of yours has that id."
                )
            if isinstance(result, Ended):
                notice = f"already {result.entry.status.value}"
            elif result.entry.status.final:
                notice = "cancelled"
            else:
                notice = "cancel requested"
            return HTTPResponse(
                status=303, headers={"Location": f"{PREFIX}/requests/{request_id}?notice={notice}"}
            )

        def static(name: str) -> HTTPResponse:
            if name not in self._static:
                return self.render("message", 404, title="Not found", message="No such file.")
            reply = HTTPResponse(body=self._static[name], status=200)
            reply.set_header("Content-Type", STATIC[name])
            return reply

        def not_found(error: Any) -> str:
            return self.render("message", 404, title="Not found", message="No such page.").body  # type: ignore[no-any-return]

        app.route(f"{PREFIX}/sign-in", "GET", sign_in_form)
        app.route(f"{PREFIX}/sign-in", "POST", sign_in)
        app.route(f"{PREFIX}/sign-out", "POST", sign_out)
        app.route(f"{PREFIX}/requests/<request_id>/cancel", "POST", cancel)
        app.route(f"{PREFIX}/static/<name>", "GET", static)
        app.error_handler[404] = not_found
        app.error_handler[405] = lambda error: "Method not allowed"
        return DashboardMiddleware(app)


class DashboardMiddleware:
    """The dashboard's own security headers (a CSP that lets its pages load their stylesheet and
    script, which the API's ``default-src 'none'`` forbids), and a plain 500 page for anything that
    escapes a route, logged once."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def secured(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, headers + _HEADERS, exc_info)

        try:
            return self.app(environ, secured)
        except Exception:
            log.exception(
                "dashboard: unhandled error for %s %s",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
            )
            body = b"<!doctype html><title>Error</title><p>The dashboard failed; the error is logged."
            secured("500 Internal Server Error", [("Content-Type", "text/html; charset=utf-8")], None)
            return [body]


def with_dashboard(api: WSGIApp, dashboard: WSGIApp) -> WSGIApp:
    """One WSGI app: ``/dashboard`` and below to the dashboard, everything else to the API."""

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        if path == PREFIX or path.startswith(PREFIX + "/"):
            return dashboard(environ, start_response)
        return api(environ, start_response)

    return dispatch
