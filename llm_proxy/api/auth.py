"""API keys: checking a request's key (one Bottle plugin for every route), and the generated key
used when API_KEY is unset."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from bottle import HTTPResponse, Route

from llm_proxy.api.http import error_response, header


def owner_of(key: str) -> str:
    """A stable, non-reversible tag of a key, stored with each request instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


class KeyChecker:
    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one API key is required")
        # Comparing fixed-length digests keeps the comparison constant-time whatever the length.
        self._digests = [(hashlib.sha256(k.encode("utf-8")).digest(), owner_of(k)) for k in keys]

    def owner(self, presented: str | None) -> str | None:
        """The owner tag of a valid key, None otherwise. Every key is compared, in constant time."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for candidate, owner in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = owner
        return found


def presented_key(api_key_header: str | None, authorization_header: str | None) -> str | None:
    """The key from ``X-API-Key``, else from ``Authorization: Bearer``."""
    if api_key_header and api_key_header.strip():
        return api_key_header.strip()
    authorization = authorization_header or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def generated_key(keep: Callable[[str], tuple[str, bool]], where: str, announce: TextIO = sys.stderr) -> str:
    """The key kept by the back end (``keep``: see ``Backend.keep_key``), created and printed, this
    once, by the process that creates it."""
    key, created = keep("sk-proxy-" + secrets.token_urlsafe(32))
    if not created:
        announce.write(f"llm-proxy: API_KEY is unset; using the generated key kept in {where}\n")
        return key
    banner = "=" * 72
    announce.write(
        f"\n{banner}\n"
        "llm-proxy: API_KEY is not set, so a key was generated for this service.\n"
        f"  API key: {key}\n"
        f"It is kept in {where} and will not be printed again.\n"
        "Send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>', or set API_KEY.\n"
        f"{banner}\n\n"
    )
    announce.flush()
    return key


class KeyAuth:
    """A Bottle plugin: every route gets the caller's owner tag as its ``owner`` argument, or the
    caller gets a 401. A route declared with ``auth=False`` is open to anyone."""

    name = "auth"
    api = 2

    def __init__(self, keys: KeyChecker) -> None:
        self._keys = keys

    def apply(self, callback: Callable[..., Any], route: Route) -> Callable[..., Any]:
        if not route.config.get("auth", True):
            return callback

        def authenticated(*args: Any, **kwargs: Any) -> Any:
            owner = self._keys.owner(presented_key(header("X-API-Key"), header("Authorization")))
            if owner is None:
                return unauthorized()
            return callback(*args, owner=owner, **kwargs)

        return authenticated


def unauthorized() -> HTTPResponse:
    return error_response(
        401,
        "Invalid or missing API key. Send it in the X-API-Key header or as 'Authorization: Bearer <key>'.",
        "authentication_error",
        headers={"WWW-Authenticate": 'Bearer realm="llm-proxy"'},
    )
