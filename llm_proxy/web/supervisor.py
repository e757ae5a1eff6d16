"""Runs the worker as a child of the web process and restarts it when it dies."""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping, Sequence

import gevent
import gevent.subprocess as subprocess

from llm_proxy import processes

log = logging.getLogger("llm_proxy.supervisor")


class WorkerSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        restart_delay: float = 1.0,
        locked_retry_delay: float = 5.0,
    ) -> None:
        self._command = list(command)
        self._env = dict(env)
        self._restart_delay = restart_delay
        self._locked_retry_delay = locked_retry_delay
        self._stopping = False
        self._process: subprocess.Popen[bytes] | None = None
        self._greenlet: gevent.Greenlet[..., None] | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        told_locked = False
        while not self._stopping:
            try:
                self._process = subprocess.Popen(self._command, env=self._env)
            except OSError as exc:
                log.error("cannot start the worker: %s", exc)
                gevent.sleep(self._restart_delay)
                continue
            code = self._process.wait()
            if self._stopping:
                return
            if code == processes.LOCKED:
                if not told_locked:
                    log.warning(
                        "another worker runs on this DATA_DIR; checking again every %.0f s",
                        self._locked_retry_delay,
                    )
                    told_locked = True
                gevent.sleep(self._locked_retry_delay)
                continue
            told_locked = False
            self.restarts += 1
            log.error("the worker exited with code %s; restarting it", code)
            gevent.sleep(self._restart_delay)

    def begin_stop(self) -> None:
        """SIGTERM the worker (it stops dispatching and drains) and restart it no more."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def hurry(self) -> None:
        """Ask the stopping worker to put its calls in flight back now."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(processes.HURRY_SIGNAL)

    def stop(self, timeout: float) -> None:
        """Stop the worker: SIGTERM, ``timeout`` seconds to finish, then SIGKILL."""
        self.begin_stop()
        process = self._process
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.error("the worker did not stop within %.0f s; killing it", timeout)
                process.kill()
                process.wait()
        if self._greenlet is not None:
            self._greenlet.kill()
