"""The worker supervisor, with tiny real child processes: restarts after a crash, waits while another
worker holds the data directory, and stops a child with SIGTERM, then SIGKILL."""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from llm_proxy import processes
from llm_proxy.web.supervisor import WorkerSupervisor


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        gevent.sleep(0.01)


def child(script: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script)]


def launches(log: Path) -> list[float]:
    """When each child started, as each one wrote it."""
    if not log.exists():
        return []
    return [float(line) for line in log.read_text().split()]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def supervisors() -> Iterator[list[WorkerSupervisor]]:
    """Whatever a test started is stopped, even when it failed half-way."""
    started: list[WorkerSupervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop(timeout=1.0)


def start(supervisors: list[WorkerSupervisor], command: list[str], **delays: float) -> WorkerSupervisor:
    supervisor = WorkerSupervisor(command, env=dict(os.environ), **delays)
    supervisors.append(supervisor)
    supervisor.start()
    return supervisor


def test_a_crashed_worker_is_restarted_and_counted(
    tmp_path: Path, supervisors: list[WorkerSupervisor]
) -> None:
    log = tmp_path / "launches"
    command = child(
        f"""
        import sys, time
        with open({str(log)!r}, "a") as f:
            f.write(f"{{time.time()}}\\n")
        sys.exit(1)
        """
    )
    supervisor = start(supervisors, command, restart_delay=0.05, locked_retry_delay=30.0)
    wait_for(lambda: supervisor.restarts >= 3)
    started = launches(log)
    # Each restart follows a child that ran and exited; the next one may already be running.
    assert supervisor.restarts <= len(started) <= supervisor.restarts + 1
    assert len(started) >= 3


def test_a_locked_worker_is_retried_after_the_locked_delay_without_counting(
    tmp_path: Path, supervisors: list[WorkerSupervisor]
) -> None:
    log = tmp_path / "launches"
    command = child(
        f"""
        import sys, time
        with open({str(log)!r}, "a") as f:
            f.write(f"{{time.time()}}\\n")
        sys.exit({processes.LOCKED})
        """
    )
    locked_retry_delay = 0.4
    supervisor = start(supervisors, command, restart_delay=0.01, locked_retry_delay=locked_retry_delay)
    wait_for(lambda: len(launches(log)) >= 3)
    started = launches(log)
    gaps = [later - earlier for earlier, later in itertools.pairwise(started)]
    assert all(gap >= locked_retry_delay for gap in gaps), gaps  # not the 0.01 s restart delay
    assert supervisor.restarts == 0


def test_a_worker_that_gets_the_lock_after_waiting_runs_on(
    tmp_path: Path, supervisors: list[WorkerSupervisor]
) -> None:
    """Locked twice, then admitted: it keeps running, and waiting for the lock was no restart."""
    log = tmp_path / "launches"
    command = child(
        f"""
        import sys, time
        with open({str(log)!r}, "a") as f:
            f.write(f"{{time.time()}}\\n")
        with open({str(log)!r}) as f:
            runs = len(f.read().split())
        if runs <= 2:
            sys.exit({processes.LOCKED})
        time.sleep(60)
        """
    )
    supervisor = start(supervisors, command, restart_delay=0.01, locked_retry_delay=0.05)
    wait_for(lambda: len(launches(log)) == 3)
    wait_for(lambda: supervisor.pid is not None)
    assert supervisor.restarts == 0
    assert len(launches(log)) == 3


def test_stop_sends_sigterm_to_a_running_worker(tmp_path: Path, supervisors: list[WorkerSupervisor]) -> None:
    ready, terminated = tmp_path / "ready", tmp_path / "terminated"
    command = child(
        f"""
        import signal, sys, time
        def on_term(signum, frame):
            open({str(terminated)!r}, "w").write(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
        """
    )
    supervisor = start(supervisors, command, restart_delay=0.01, locked_retry_delay=0.01)
    wait_for(ready.exists)
    pid = supervisor.pid
    assert pid is not None and not gone(pid)
    began = time.monotonic()
    supervisor.stop(timeout=10.0)
    assert time.monotonic() - began < 5.0  # it ended on SIGTERM, not at the timeout
    assert terminated.read_text() == "15"
    assert gone(pid)
    assert supervisor.pid is None
    assert supervisor.restarts == 0


def test_stop_kills_a_worker_that_ignores_sigterm_after_the_timeout(
    tmp_path: Path, supervisors: list[WorkerSupervisor]
) -> None:
    ready = tmp_path / "ready"
    command = child(
        f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
        """
    )
    supervisor = start(supervisors, command, restart_delay=0.01, locked_retry_delay=0.01)
    wait_for(ready.exists)
    pid = supervisor.pid
    assert pid is not None
    timeout = 0.5
    began = time.monotonic()
    supervisor.stop(timeout=timeout)
    elapsed = time.monotonic() - began
    assert timeout <= elapsed < timeout + 5.0  # waited out the timeout, then did not wait forever
    assert gone(pid)  # only SIGKILL ends a process that ignores SIGTERM
    assert supervisor.pid is None


def test_a_stopped_supervisor_restarts_nothing(tmp_path: Path, supervisors: list[WorkerSupervisor]) -> None:
    log, ready = tmp_path / "launches", tmp_path / "ready"
    command = child(
        f"""
        import time
        with open({str(log)!r}, "a") as f:
            f.write(f"{{time.time()}}\\n")
        open({str(ready)!r}, "w").close()
        time.sleep(60)
        """
    )
    supervisor = start(supervisors, command, restart_delay=0.01, locked_retry_delay=0.01)
    wait_for(ready.exists)
    supervisor.stop(timeout=5.0)
    # A restart would come 0.01 s after the exit; give it many times that to (wrongly) happen.
    gevent.sleep(0.3)
    assert len(launches(log)) == 1
    assert supervisor.restarts == 0
    assert supervisor.pid is None
