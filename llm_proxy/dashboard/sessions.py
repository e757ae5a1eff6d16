"""Dashboard sessions: a signed cookie per signed-in key, its CSRF token, and slowing down guessers.

The signing key is derived from the configured API keys (HMAC-SHA256 of a fixed label keyed by all
of them): every web process and dyno derives the same one without storing anything, a session can
only be forged by someone who holds every API key (who could sign in anyway), and changing or
revoking any API key ends every session. The cookie holds the owner tag (a digest, never the key),
its expiry and a random nonce; the CSRF token is an HMAC of the nonce, so it is tied to the session
and needs no server-side state. Signing out is the one thing kept: the ended session's nonce, in the
back end, until its expiry (``SignedOut``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

COOKIE = "llm_proxy_session"
SESSION_SECONDS = 12 * 3600
"""How long a sign-in lasts."""
_LABEL = b"llm-proxy dashboard session v1"


@dataclass(frozen=True)
class Session:
    owner: str
    expires_at: int
    nonce: str


@dataclass(frozen=True)
class SignedOut:
    """Where sign-outs are kept for every process (the back end): a signed cookie stays valid
    until it expires, so signing out records its session as ended."""

    end: Callable[[str, float], None]
    """Record a session (its nonce) as ended until its expiry (seconds since the epoch)."""
    ended: Callable[[str], bool]


class Sessions:
    def __init__(self, api_keys: Sequence[str], *, lifetime: int = SESSION_SECONDS) -> None:
        if not api_keys:
            raise ValueError("at least one API key is required")
        secret = hashlib.sha256(b"\0".join(k.encode("utf-8") for k in sorted(api_keys))).digest()
        self._key = hmac.new(secret, _LABEL, hashlib.sha256).digest()
        self._lifetime = lifetime

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self, owner: str, now: float | None = None) -> tuple[str, Session]:
        """A new session's cookie value."""
        expires_at = int(now if now is not None else time.time()) + self._lifetime
        session = Session(owner, expires_at, secrets.token_hex(16))
        text = f"{owner}.{expires_at}.{session.nonce}"
        return f"{text}.{self._sign(text)}", session

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie that this service signed and that has not expired."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(".")
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        owner, expires, nonce, signature = parts
        try:
            expected = self._sign(f"{owner}.{expires}.{nonce}")
        except UnicodeEncodeError:
            return None
        if not hmac.compare_digest(expected, signature):
            return None
        if int(expires) <= (now if now is not None else time.time()):
            return None
        return Session(owner, int(expires), nonce)

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf.{session.nonce}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))

    @property
    def lifetime(self) -> int:
        return self._lifetime


def is_https(environ: Mapping[str, Any]) -> bool:
    """Whether the client's connection is HTTPS: Heroku's router (and most proxies) terminate TLS
    and say so in ``X-Forwarded-Proto``."""
    forwarded = str(environ.get("HTTP_X_FORWARDED_PROTO", "")).split(",")[0].strip().lower()
    return forwarded == "https" or environ.get("wsgi.url_scheme") == "https"


def own_origin(environ: Mapping[str, Any]) -> str:
    host = str(environ.get("HTTP_HOST") or environ.get("SERVER_NAME", ""))
    return f"{'https' if is_https(environ) else 'http'}://{host}".lower()


def same_origin(environ: Mapping[str, Any]) -> bool:
    """Whether a state-changing request comes from our own pages: its ``Origin`` (sent by browsers
    with every POST), else its ``Referer``, must be ours. Neither present (a privacy extension
    stripping both) passes here; the CSRF token and SameSite=Strict still apply."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        referer = str(environ.get("HTTP_REFERER") or "")
        if not referer:
            return True
        scheme, _, rest = referer.partition("://")
        origin = f"{scheme}://{rest.split('/')[0]}"
    return str(origin).lower() == own_origin(environ)


PROXY_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128", "fc00::/7")
)
"""Private (RFC 1918, unique local) and loopback addresses: where a proxy of ours calls from.
Listed rather than ``is_private``, which also counts documentation and other reserved ranges."""


def _behind_proxy(peer: str) -> bool:
    """Whether the socket's peer is a proxy of ours: a private or loopback address (Heroku's
    router, a reverse proxy on the same host or network). A client on the internet is neither."""
    try:
        address = ipaddress.ip_address(peer.strip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in PROXY_NETWORKS)


def client_address(environ: Mapping[str, Any]) -> str:
    """The client as the nearest proxy saw it: behind a proxy of ours (``_behind_proxy``), the last
    ``X-Forwarded-For`` entry (Heroku's router appends the address it was called from); else the
    socket's peer. A client reaching the service directly chooses its own ``X-Forwarded-For``, so
    it is not believed then: a new value per attempt would escape the sign-in throttle."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    forwarded = str(environ.get("HTTP_X_FORWARDED_FOR") or "")
    if forwarded.strip() and _behind_proxy(peer):
        return forwarded.split(",")[-1].strip()[:64] or peer
    return peer[:64] or "unknown"


class SignInThrottle:
    """Failed sign-ins per client address: after ``free`` failures each further attempt must wait
    twice as long as the one before (up to ``longest`` seconds), correct key or not, so guessing is
    slow while a typo costs nothing. Bounded memory: the ``capacity`` addresses that failed most
    recently are remembered; a quiet address is forgotten after ``forget`` seconds."""

    def __init__(
        self, *, free: int = 3, longest: float = 300.0, forget: float = 3600.0, capacity: int = 10_000
    ) -> None:
        self._free = free
        self._longest = longest
        self._forget = forget
        self._capacity = capacity
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait(self, address: str, now: float | None = None) -> float:
        """Seconds before this address may try again (0: now)."""
        now = time.monotonic() if now is None else now
        found = self._failures.get(address)
        if found is None:
            return 0.0
        count, last = found
        if now - last > self._forget:
            del self._failures[address]
            return 0.0
        if count < self._free:
            return 0.0
        pause = min(self._longest, 2.0 ** (count - self._free))
        return max(0.0, last + pause - now)

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        count, _ = self._failures.pop(address, (0, now))
        self._failures[address] = (count + 1, now)
        while len(self._failures) > self._capacity:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
