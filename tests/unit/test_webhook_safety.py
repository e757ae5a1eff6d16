"""The webhook address checker on every class of address, with name resolution faked."""

from __future__ import annotations

import ipaddress
import random
import socket
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from llm_proxy.domain.status import WebhookProgress, WebhookState
from llm_proxy.webhooks.delivery import SCHEDULE, after_attempt, retry_delay
from llm_proxy.webhooks.safety import (
    HostUnresolved,
    NonPublicDestination,
    WebhookRefused,
    address_problem,
    check_destination,
    check_url_literal,
)
from llm_proxy.webhooks.sender import WebhookSender

REFUSED = {
    "loopback": ["127.0.0.1", "127.255.0.9", "::1"],
    "private": ["10.0.0.1", "172.16.5.4", "192.168.0.1", "fc00::1", "fd12:3456::1"],
    "link-local": ["169.254.169.254", "169.254.0.1", "fe80::1"],
    "carrier-grade NAT": ["100.64.0.1", "100.127.255.254"],
    "multicast": ["224.0.0.1", "239.1.2.3", "ff02::1"],
    "unspecified": ["0.0.0.0", "::"],
    "IPv4-mapped": ["::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254"],
    "NAT64": ["64:ff9b::7f00:1", "64:ff9b::a00:1"],
    "6to4": ["2002:7f00:1::", "2002:a00:1::1"],
    "reserved": ["240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "2001:db8::1"],
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001::1"]


@pytest.mark.parametrize(
    "address", [(kind, a) for kind, group in REFUSED.items() for a in group], ids=lambda p: p[1]
)
def test_non_public_addresses_are_refused(address: tuple[str, str]) -> None:
    problem = address_problem(ipaddress.ip_address(address[1]))
    assert problem is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_reasons_name_the_class() -> None:
    assert "loopback" in str(address_problem(ipaddress.ip_address("::ffff:127.0.0.1")))
    assert "metadata" in str(address_problem(ipaddress.ip_address("169.254.169.254")))
    assert "NAT64" in str(address_problem(ipaddress.ip_address("64:ff9b::7f00:1")))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://017700000001/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.1.1.1/x",
        "https://169.254.169.254/latest/meta-data",
        "http://localhost/",
        "http://api.localhost/",
        "http://0.0.0.0/",
    ],
)
def test_literal_tricks_are_refused_at_submit(url: str) -> None:
    assert check_url_literal(url) is not None


@pytest.mark.parametrize("url", ["https://example.com/hook", "http://8.8.8.8/", "https://[2606:4700::1111]/"])
def test_public_urls_pass_the_submit_check(url: str) -> None:
    assert check_url_literal(url) is None


def fake_resolver(*answers: str) -> Any:
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        family = socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    return resolve


def test_every_resolved_address_is_checked() -> None:
    assert check_destination("https://hooks.example/", fake_resolver("8.8.8.8", "1.1.1.1"))
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.7"):
        check_destination("https://hooks.example/", fake_resolver("8.8.8.8", "10.0.0.7"))
    with pytest.raises(WebhookRefused, match="loopback"):
        check_destination("https://hooks.example/", fake_resolver("::ffff:127.0.0.1"))


def failing_resolver(code: int, message: str) -> Any:
    def fail(*_: Any, **__: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(code, message)

    return fail


def test_an_unresolvable_host_is_not_refused() -> None:
    # Not a WebhookRefused: the name may resolve on a later attempt.
    with pytest.raises(HostUnresolved, match="did not resolve") as raised:
        check_destination("https://nowhere.invalid/", failing_resolver(socket.EAI_NONAME, "Name not known"))
    assert not isinstance(raised.value, WebhookRefused)


def test_a_host_name_that_cannot_be_encoded_is_refused() -> None:
    def idna(*_: Any, **__: Any) -> list[tuple[Any, ...]]:
        raise UnicodeError("label too long")

    with pytest.raises(WebhookRefused, match="not a valid host name"):
        check_destination("https://hooks.example/", idna)


def test_a_non_public_answer_is_a_non_public_refusal() -> None:
    with pytest.raises(NonPublicDestination, match=r"127\.0\.0\.1, a loopback address"):
        check_destination("https://hooks.example/", fake_resolver("127.0.0.1"))
    with pytest.raises(WebhookRefused) as raised:
        check_destination("ftp://hooks.example/", fake_resolver("8.8.8.8"))
    assert not isinstance(raised.value, NonPublicDestination)


def test_sender_refuses_before_connecting() -> None:
    sender = WebhookSender(
        secret=None, allow_private=False, timeout=1, resolve=fake_resolver("93.184.216.34", "169.254.169.254")
    )
    attempt = sender.send("http://hooks.example/", "msg_1", "{}")
    assert attempt.final and not attempt.delivered
    assert attempt.error is not None and attempt.error.startswith("refused")
    assert "WEBHOOK_ALLOW_PRIVATE" in attempt.error


def test_a_loopback_refusal_says_how_to_allow_it() -> None:
    sender = WebhookSender(secret=None, allow_private=False, timeout=1, resolve=fake_resolver("127.0.0.1"))
    attempt = sender.send("http://hooks.example:8080/hook", "msg_1", "{}")
    assert attempt.final and attempt.status is None
    assert attempt.error == (
        "refused: the webhook host resolves to 127.0.0.1, a loopback address; "
        "set WEBHOOK_ALLOW_PRIVATE=true to allow it (local development)"
    )


def test_a_private_address_met_when_connecting_says_how_to_allow_it() -> None:
    # The first look saw a public address; the connection's own look (DNS rebinding) sees loopback.
    sender = WebhookSender(
        secret=None, allow_private=False, timeout=5, resolve=fake_resolver("93.184.216.34")
    )
    attempt = sender.send("http://localhost:9/hook", "msg_1", "{}")
    assert attempt.final and not attempt.delivered
    assert attempt.error is not None and attempt.error.startswith("refused: the webhook host resolves to")
    assert "loopback" in attempt.error and "WEBHOOK_ALLOW_PRIVATE=true" in attempt.error


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (socket.EAI_NONAME, "Name or service not known"),
        (socket.EAI_AGAIN, "Temporary failure in name resolution"),
    ],
)
def test_a_dns_failure_is_a_retryable_attempt(code: int, message: str) -> None:
    sender = WebhookSender(
        secret=None, allow_private=False, timeout=1, resolve=failing_resolver(code, message)
    )
    attempt = sender.send("http://hooks.example/hook", "msg_1", "{}")
    assert not attempt.final and not attempt.delivered and attempt.status is None
    assert attempt.error == f"the webhook host name did not resolve ({message})"
    progress = after_attempt(WebhookProgress(), attempt, 5.0, random.Random(0), 1_700_000_000.0)
    assert progress.state is WebhookState.PENDING and progress.next_attempt_at is not None


@pytest.mark.parametrize("allow_private", [False, True])
def test_a_name_that_never_resolves_is_retried(allow_private: bool) -> None:
    # The machine's own resolver (RFC 2606: .invalid never resolves; with no resolver at all the
    # lookup fails too). Allowing private addresses skips our check: requests' failure says the same.
    sender = WebhookSender(secret=None, allow_private=allow_private, timeout=5)
    attempt = sender.send("http://no-such-host.invalid/hook", "msg_1", "{}")
    assert not attempt.final and not attempt.delivered and attempt.status is None
    assert attempt.error is not None
    assert attempt.error.startswith("the webhook host name did not resolve")


def test_signature_headers_verify_with_the_reference_library() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    sender = WebhookSender(secret=secret, allow_private=True, timeout=1)
    body = '{"request_id": "r", "status": "completed"}'
    headers = sender.headers("msg_r", body)
    assert Webhook(secret).verify(body, headers) == {"request_id": "r", "status": "completed"}


def test_retry_schedule_has_bounded_jitter_then_gives_up() -> None:
    rand = random.Random(3)
    for failures, factor in enumerate(SCHEDULE, start=1):
        for _ in range(20):
            delay = retry_delay(failures, 5.0, None, rand)
            assert delay is not None and 0.8 * 5 * factor <= delay <= 1.2 * 5 * factor
    assert retry_delay(len(SCHEDULE) + 1, 5.0, None, rand) is None
    assert retry_delay(1, 5.0, 0.0, rand) == 0.0
    assert retry_delay(len(SCHEDULE) + 1, 5.0, 1.0, rand) is None
