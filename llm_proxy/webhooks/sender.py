"""One webhook POST: signed (Standard Webhooks), to a checked destination, reading only the start
of the answer."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gevent
import requests
import requests_hardened
from requests.adapters import HTTPAdapter
from requests_hardened.ip_filter import InvalidIPAddress
from standardwebhooks.webhooks import Webhook
from urllib3.exceptions import NameResolutionError

from llm_proxy.upstream.outcome import parse_retry_after
from llm_proxy.webhooks.safety import (
    ALLOW_PRIVATE_HINT,
    HostUnresolved,
    NonPublicDestination,
    WebhookRefused,
    address_problem,
    check_destination,
)

USER_AGENT = "llm-proxy-webhooks/1.0 (+https://github.com/llm-proxy)"
READ_LIMIT = 1024
"""Bytes of a receiver's answer we read at most: we only need its status code."""


@dataclass(frozen=True, kw_only=True)
class Attempt:
    delivered: bool = False
    final: bool = False
    """No further attempt can help (410, refused destination)."""
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None


UNRESOLVED = "the webhook host name did not resolve"


def _unresolved(exc: BaseException) -> bool:
    """Whether a connection failure was a name that did not resolve. requests and urllib3 wrap it
    a few levels deep (ConnectionError > MaxRetryError.reason > NameResolutionError > gaierror)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror | NameResolutionError):
            return True
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        todo.extend(x for x in linked if isinstance(x, BaseException))
    return False


def _refused_address(exc: InvalidIPAddress) -> str:
    text = str(exc)
    try:
        problem = address_problem(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        problem = None
    return f"refused: the webhook host resolves to {text}, {problem or 'not public'}; {ALLOW_PRIVATE_HINT}"


class WebhookSender:
    """Makes one signed POST to a checked destination, reading only the start of the answer."""

    def __init__(
        self,
        *,
        secret: str | None,
        allow_private: bool,
        timeout: float,
        resolve: Callable[..., Any] | None = None,
    ) -> None:
        self._signer = Webhook(secret) if secret else None
        self._allow_private = allow_private
        self._timeout = timeout
        self._resolve = resolve
        session: requests.Session
        if allow_private:
            session = requests.Session()
            adapter = HTTPAdapter(pool_maxsize=64, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        else:
            # Resolves, checks and pins the connection to the checked address (DNS rebinding).
            session = requests_hardened.HTTPSession(
                requests_hardened.Config(
                    ip_filter_enable=True,
                    ip_filter_allow_loopback_ips=False,
                    never_redirect=True,
                    default_timeout=(timeout, timeout),
                    user_agent_override=USER_AGENT,
                )
            )
        session.trust_env = False  # an HTTP(S)_PROXY variable must not route around the checks
        self._session = session

    def headers(self, webhook_id: str, body: str, now: float | None = None) -> dict[str, str]:
        stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(stamp.timestamp())),
        }
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(webhook_id, stamp, body)
        return headers

    def _check(self, url: str) -> Attempt | None:
        """The attempt's end when the destination cannot be used now, or None to go on."""
        if self._allow_private:
            return None
        try:
            if self._resolve is not None:
                check_destination(url, self._resolve)
            else:
                check_destination(url)
        except NonPublicDestination as exc:
            return Attempt(final=True, error=f"refused: {exc}; {ALLOW_PRIVATE_HINT}")
        except WebhookRefused as exc:
            return Attempt(final=True, error=f"refused: {exc}")
        except HostUnresolved as exc:
            # Not final: DNS failures are transient (a resolver down, a record not yet published).
            return Attempt(error=str(exc))
        return None

    def send(self, url: str, webhook_id: str, body: str) -> Attempt:
        # One deadline covers the resolution too: a resolver that never answers must not hold a
        # sending slot for longer than a receiver that never answers.
        deadline = gevent.Timeout(self._timeout)
        deadline.start()
        resolving = True
        try:
            checked = self._check(url)
            if checked is not None:
                return checked
            resolving = False
            reply = self._session.post(
                url,
                data=body.encode("utf-8"),
                headers=self.headers(webhook_id, body),
                timeout=(self._timeout, self._timeout),
                allow_redirects=False,
                stream=True,
            )
            try:
                reply.raw.read(READ_LIMIT, decode_content=False)
            finally:
                reply.close()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            if resolving:
                return Attempt(error=f"{UNRESOLVED} within {self._timeout:g} s")
            return Attempt(error=f"timeout: no answer within {self._timeout:g} s")
        except InvalidIPAddress as exc:
            return Attempt(final=True, error=_refused_address(exc))
        except requests.Timeout:
            return Attempt(error=f"timeout: no answer within {self._timeout:g} s")
        except requests.RequestException as exc:
            if _unresolved(exc):
                return Attempt(error=UNRESOLVED)
            return Attempt(error=f"connection failed ({type(exc).__name__})")
        finally:
            deadline.close()
        status = reply.status_code
        if 200 <= status < 300:
            return Attempt(delivered=True, status=status)
        if status == 410:
            return Attempt(final=True, status=status, error="the receiver answered 410 Gone")
        retry_after = parse_retry_after(reply.headers) if status in (429, 503) else None
        return Attempt(status=status, error=f"the receiver answered HTTP {status}", retry_after=retry_after)

    def close(self) -> None:
        self._session.close()
