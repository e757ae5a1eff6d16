"""Which webhook destinations are allowed: no request of ours may reach the proxy's own network.

Checked twice: at submit, a URL whose host is a literal non-public address is refused; at delivery,
every address the host resolves to must be public, and the connection itself goes through
requests-hardened's adapter, which resolves again, checks the address it will use and pins the
connection to it (so DNS rebinding between the two looks cannot slip a private address in).

A name that does not resolve is not refused: DNS failures are usually transient (a resolver down, a
record not yet published), so the delivery is retried on the normal schedule.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]

# Ranges Python's ipaddress may call global (depending on the version) that still reach internal
# hosts or wrap an IPv4 address we must check on its own.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_6TO4 = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_EXTRA_BLOCKED = (
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("192.88.99.0/24"),  # 6to4 relay anycast
    ipaddress.ip_network("198.18.0.0/15"),  # benchmarking
    ipaddress.ip_network("5f00::/16"),  # segment routing
    ipaddress.ip_network("2001:20::/28"),  # ORCHIDv2
    ipaddress.ip_network("3fff::/20"),  # documentation
)


ALLOW_PRIVATE_HINT = "set WEBHOOK_ALLOW_PRIVATE=true to allow it (local development)"
"""Said with every refusal of a non-public address: a local receiver is the usual first try."""


class WebhookRefused(Exception):
    """The destination is not allowed; the message says why (safe to show the user)."""


class NonPublicDestination(WebhookRefused):
    """The host is or resolves to a non-public address: WEBHOOK_ALLOW_PRIVATE would allow it."""


class HostUnresolved(Exception):
    """The host name did not resolve (now): worth another attempt later, unlike a refusal."""


def address_problem(ip: IPAddress) -> str | None:
    """Why this address may not receive a webhook, or None if it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _wrapped(ip.ipv4_mapped, "IPv4-mapped")
        if any(ip in net for net in _NAT64):
            return _wrapped(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64")
        if ip in _6TO4:
            return _wrapped(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF), "6to4")
        if ip in _TEREDO:
            return "a Teredo tunnel address"
        compatible = _ipv4_compatible(ip)
        if compatible is not None:
            return _wrapped(compatible, "IPv4-compatible")
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or any(ip in net for net in _EXTRA_BLOCKED) or not ip.is_global:
        return "a reserved address"
    return None


def _wrapped(inner: ipaddress.IPv4Address, how: str) -> str:
    problem = address_problem(inner)
    wrapped = f"an IPv4 address wrapped in IPv6 ({how})"
    return f"{wrapped}: {problem}" if problem else wrapped


def _ipv4_compatible(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # ::a.b.c.d (deprecated IPv4-compatible form), but not :: or ::1 which are handled as such.
    value = int(ip)
    if value >> 32 == 0 and value > 1:
        return ipaddress.IPv4Address(value)
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, including legacy IPv4 forms (2130706433, 0x7f.1, 127.1)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_url_literal(url: str) -> str | None:
    """At submit: why the URL's host is a refused literal address, or None."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "the host is a loopback name"
    ip = literal_address(host)
    if ip is None:
        return None
    problem = address_problem(ip)
    return f"the host is {problem}" if problem else None


def check_destination(url: str, resolve: Resolver = socket.getaddrinfo) -> list[IPAddress]:
    """At delivery: resolve the host; refuse unless every address is public. Returns the addresses.

    Raises WebhookRefused (NonPublicDestination for a non-public address) when no attempt can
    succeed, HostUnresolved when the name did not resolve this time."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookRefused("the webhook URL is not an absolute http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        # The name cannot even be encoded for DNS (IDNA): no later attempt can do better.
        raise WebhookRefused("the webhook host is not a valid host name") from None
    except socket.gaierror as exc:
        raise HostUnresolved(f"the webhook host name did not resolve ({exc.strerror or exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        problem = address_problem(ip)
        if problem:
            raise NonPublicDestination(f"the webhook host resolves to {ip}, {problem}")
        addresses.append(ip)
    if not addresses:
        raise HostUnresolved("the webhook host name did not resolve (no address)")
    return addresses
