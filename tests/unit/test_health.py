"""What /health concludes from the store's probe: grace period, thresholds, cache, timeouts."""

from __future__ import annotations

import gevent

from llm_proxy.services.health import HealthMonitor, worker_silence
from llm_proxy.storage.base import StorageUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Probe:
    def __init__(self) -> None:
        self.age: float | None = None
        self.failure: str | None = None
        self.calls = 0

    def __call__(self) -> float | None:
        self.calls += 1
        if self.failure:
            raise StorageUnavailable(self.failure)
        return self.age


def monitor(probe: Probe, clock: Clock) -> HealthMonitor:
    return HealthMonitor(probe, worker_silence=60, cache_seconds=1, clock=clock)


def test_the_silence_allowed_is_two_leases_and_never_under_five_seconds() -> None:
    assert worker_silence(30) == 60
    assert worker_silence(3) == 6
    assert worker_silence(1) == 5


def test_no_worker_is_reported_only_after_the_grace_period() -> None:
    probe, clock = Probe(), Clock()
    health = monitor(probe, clock)
    assert health.check().to_dict() == {"status": "ok", "problems": []}
    clock.now += 61
    found = health.check()
    assert not found.ok and [p.check for p in found.problems] == ["worker"]
    assert "python worker.py" in found.problems[0].message
    assert found.to_dict()["status"] == "unavailable"


def test_a_stale_heartbeat_is_reported_and_a_fresh_one_clears_it() -> None:
    probe, clock = Probe(), Clock()
    health = monitor(probe, clock)
    clock.now += 100
    probe.age = 59
    assert health.check().ok
    clock.now += 2
    probe.age = 61
    found = health.check()
    assert [p.check for p in found.problems] == ["worker"] and "61 s" in found.problems[0].message
    clock.now += 2
    probe.age = 0.5
    assert health.check().ok


def test_a_store_that_fails_the_probe_is_reported_at_once_with_its_reason_kept_for_the_log() -> None:
    probe, clock = Probe(), Clock()
    health = monitor(probe, clock)
    probe.failure = "database is gone at db.internal:5432"
    found = health.check()
    assert [(p.check, "database is gone" in p.detail) for p in found.problems] == [("store", True)]
    # The public answer names the problem, not the store's own words (hosts, paths).
    assert "db.internal" not in str(found.to_dict())
    clock.now += 2
    probe.failure = None
    assert health.check().ok


def test_results_are_reused_for_a_second() -> None:
    probe, clock = Probe(), Clock()
    health = monitor(probe, clock)
    for _ in range(5):
        health.check()
    assert probe.calls == 1
    clock.now += 1.5
    health.check()
    assert probe.calls == 2


def test_a_probe_that_hangs_counts_as_an_unavailable_store_and_is_shared() -> None:
    calls = []

    def hanging() -> float | None:
        calls.append(1)
        gevent.sleep(5)
        return 0.0

    health = HealthMonitor(hanging, worker_silence=60, probe_timeout=0.1)
    checks = [gevent.spawn(health.check) for _ in range(5)]
    gevent.joinall(checks, timeout=3, raise_error=True)
    assert all(c.ready() for c in checks) and len(calls) == 1
    found = checks[0].value
    assert [p.check for p in found.problems] == ["store"] and "no answer" in found.problems[0].detail
