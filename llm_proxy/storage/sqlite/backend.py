"""The embedded back end: everything in DATA_DIR on one machine, one worker process.

- ``queue/``: the job queue (persist-queue's SQLite table), ``outbox/``: owed webhooks;
- ``status/``: statuses (diskcache);
- Unix sockets named after DATA_DIR for signals and streamed relays;
- ``worker.lock``: only one worker may consume, since persist-queue's layout was built for one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import (
    Backend,
    Claim,
    ConcurrencyLimit,
    Delivery,
    StorageUnavailable,
    WebSignals,
    WorkerSignals,
)
from llm_proxy.storage.local import LocalLimit
from llm_proxy.storage.sqlite import selfcheck
from llm_proxy.storage.sqlite.outbox import SqliteOutbox
from llm_proxy.storage.sqlite.queue import PersistJobQueue
from llm_proxy.storage.sqlite.signals import EmbeddedWebSignals, EmbeddedWorkerSignals
from llm_proxy.storage.sqlite.statuses import DiskcacheStatusStore

LOCK_FILE = "worker.lock"
KEY_FILE = "api_key"


class EmbeddedBackend(Backend):
    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create DATA_DIR {data_dir}: {exc}") from exc
        selfcheck.check(data_dir)
        self.data_dir = data_dir
        self.queue: PersistJobQueue = PersistJobQueue(data_dir / "queue")
        self.statuses = DiskcacheStatusStore(data_dir / "status")
        self.outbox = SqliteOutbox(data_dir / "outbox")
        self._lock: IO[str] | None = None
        self._signals: list[WebSignals | WorkerSignals] = []

    def web_signals(self) -> WebSignals:
        signals = EmbeddedWebSignals(self.data_dir)
        self._signals.append(signals)
        return signals

    def worker_signals(self) -> WorkerSignals:
        signals = EmbeddedWorkerSignals(self.data_dir)
        self._signals.append(signals)
        return signals

    def concurrency_limit(self, max_concurrent: int) -> ConcurrencyLimit:
        return LocalLimit(max_concurrent)

    def finish(
        self,
        request_id: str,
        entry: StatusEntry,
        *,
        ttl: float,
        delivery: Delivery | None = None,
        claim: Claim | None = None,
        withdraw: bool = False,
    ) -> bool:
        # Three files, so three commits, in the crash-safe order. The lease check and the writes
        # cannot interleave with another consumer's: the lock admits one.
        if claim is not None and not self.queue.holds(claim):
            return False
        if withdraw and not self.queue.withdraw(request_id):
            return False
        self.statuses.put(request_id, entry, ttl=ttl)
        if delivery is not None:
            self.outbox.owe(delivery)
        if claim is not None:
            self.queue.ack(claim)
        return True

    def keep_key(self, candidate: str) -> tuple[str, bool]:
        """In ``DATA_DIR/api_key``, readable by the service's user alone."""
        path = self.data_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            kept = path.read_text(encoding="utf-8").strip()
            if kept:
                return kept, False
            path.unlink()  # left empty by a crash while it was written
            return self.keep_key(candidate)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(candidate + "\n")
        return candidate, True

    def describe_key_store(self) -> str:
        return str(self.data_dir / KEY_FILE)

    def consumer_admitted(self) -> bool:
        """Holds ``DATA_DIR/worker.lock`` for the process's life (its pid written in it)."""
        if self._lock is not None:
            return True
        handle = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        return True

    @property
    def previous_holders_gone(self) -> bool:
        # The lock admits one consumer at a time: whoever claimed before is dead.
        return self._lock is not None

    def close(self) -> None:
        for signals in self._signals:
            signals.close()
        self.outbox.close()
        self.queue.close()
        self.statuses.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
