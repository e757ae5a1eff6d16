"""The storage seam: every interface a back end implements.

The API, the worker and the webhook deliverer only see these. A back end (``sqlite`` now; a
networked one later) provides all of them through one ``Backend``, and ``tests/integration/
test_contract.py`` runs the same suite against each.

Exceptions::

    StorageUnavailable      the back end could not durably store or read (disk full, locked, gone)
    IdempotencyConflict     an idempotency key was reused with another body
    StorageIncompatible     installed libraries or on-disk layout differ from what the code relies on
    StorageDamaged          stored data is damaged or gone: starting would lose requests without a word
    DatabaseUnusable        DATABASE_URL is malformed or its database unreachable at start
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from llm_proxy.domain.job import Job
from llm_proxy.domain.listing import Listed, Summary
from llm_proxy.domain.status import Status, StatusEntry

IDEMPOTENCY_WINDOW = 24 * 3600.0
"""Seconds an idempotency key keeps pointing at its request."""


class StorageUnavailable(Exception):
    """The back end could not durably store or read (disk full, locked, not writable)."""


class StorageIncompatible(Exception):
    """The installed storage libraries or the stored layout are not what this code was built on."""


class StorageDamaged(Exception):
    """The stored data is damaged (a file that is not a sound database) or a part of it is gone
    while the rest still refers to it; the message says which and how to recover. Raised at start,
    where refusing is the only way the loss is not silent."""


class DatabaseUnusable(Exception):
    """DATABASE_URL is malformed, or the database cannot be reached at start (the message never
    holds the password)."""


class QueueFull(Exception):
    """A put refused: ``limit`` jobs already wait (counted in the storing transaction)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests waiting")
        self.limit = limit


class IdempotencyConflict(Exception):
    """The idempotency key was used, within the window, for a request with another body."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the key was used for request {request_id} with another body")
        self.request_id = request_id


# -- the job queue ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Lease:
    """A worker's hold on a claimed job. Only the current token can ack or release the job: a
    worker whose lease lapsed (and whose job another worker took) changes nothing."""

    holder: str
    token: int
    expires_at: float
    """Seconds since the epoch; the holder renews well before."""


@dataclass(frozen=True, kw_only=True)
class Claim:
    ticket: int
    job: Job
    lease: Lease
    fresh: bool = False
    """Never handed out before: no earlier attempt can have left a status behind."""
    cancel_requested: bool = False
    opened_at: int | None = None
    """Set when the claim's own commit stored the first attempt's status (``Opening``): that
    attempt's start, in milliseconds since the epoch. None: nothing was stored with the claim."""


Opening = Callable[[Job, int], StatusEntry]
"""The status of a job's first attempt, started at the given time (milliseconds since the epoch)."""


@dataclass(frozen=True, kw_only=True)
class Queued:
    """A job as ``JobQueue.find`` reports it."""

    ticket: int
    request_id: str
    owner: str
    submitted_at: int
    body_json: str
    in_flight: bool
    fresh: bool
    """Never handed out: no status can exist for it yet."""
    position: int | None
    """1-based place among the waiting jobs; None when in flight."""
    throttled_until: int | None = None
    """Milliseconds since the epoch until which a rate limit holds its model back, when one was
    recorded (``RateGate.end``) and has not passed."""


@dataclass(frozen=True)
class Submitted:
    """What ``put_once`` stored or found: the request that stands for this submit."""

    request_id: str
    replayed: bool
    """The key was used before with the same body: no new job was queued."""


class CancelResult(Enum):
    WITHDRAWN = "withdrawn"
    """It was waiting: it will never be handed out. The caller finishes it."""
    SIGNALLED = "signalled"
    """It is claimed: the cancellation is recorded for its worker (see ``cancel_requested``)."""
    ABSENT = "absent"
    """It is not in the queue (finished, or never there)."""


@dataclass(frozen=True)
class Renewal:
    held: set[tuple[int, int]]
    """(ticket, token) of the claims still held."""
    cancelled: set[int] = field(default_factory=set)
    """Tickets among them whose cancel is recorded."""


class QueueCounts(NamedTuple):
    waiting: int
    in_flight: int


ALL_MODELS = "*"
"""In ``RateGate.begin``'s answer: no job at all may be claimed now."""


class RateGate(ABC):
    """Decides, inside a claim, which waiting jobs may be called upstream now (the rate limits,
    ``llm_proxy.worker.pacing``). A back end shared by several workers keeps the limits' state
    (one text per model) in its store: it reads it in the claiming transaction, hands it to
    ``begin`` and stores what ``end`` returns before committing, so that every worker's claims
    count against one state. A back end with a single worker keeps none: ``begin(None)``."""

    @abstractmethod
    def begin(self, shared: Mapping[str, str] | None) -> Collection[str]:
        """Start judging one claim; returns the models whose waiting jobs are left waiting
        (``ALL_MODELS``: every job)."""

    @abstractmethod
    def admit(self, request_id: str, model: str, body: dict[str, Any]) -> bool:
        """Whether this job may be called now (offered oldest first). Once a job is refused,
        later jobs of its model are not offered in this claim: order is kept within a model."""

    @abstractmethod
    def end(self) -> tuple[dict[str, str], dict[str, float]]:
        """(state to store by model, seconds since the epoch until which each refused model is
        held back) once the claim is decided; the back end records the latter for ``find``."""


class JobQueue(ABC):
    """A durable FIFO of jobs, claimed under leases."""

    @abstractmethod
    def put(self, job: Job, *, max_waiting: int | None = None) -> int:
        """Store the job durably (on disk when this returns) and return its ticket.

        Raises QueueFull when ``max_waiting`` jobs already wait (counted atomically with the
        insert, so concurrent puts never overshoot it), StorageUnavailable when it could not be
        stored."""

    @abstractmethod
    def put_once(self, job: Job, key: str, *, max_waiting: int | None = None) -> Submitted:
        """Store the job unless this owner used ``key`` within ``IDEMPOTENCY_WINDOW``: then answer
        with that earlier request (same body) or raise IdempotencyConflict (another body). Checked
        and recorded atomically; a replay is answered even when the queue is full."""

    @abstractmethod
    def find(self, request_id: str) -> Queued | None:
        """The job with this id while it is not finished (waiting or in flight)."""

    @abstractmethod
    def cancel(self, request_id: str) -> CancelResult:
        """Cancel a queued job in one step (see ``CancelResult``)."""

    @abstractmethod
    def throttles(self) -> dict[str, float]:
        """The models a rate limit holds back now (``ALL_MODELS``: every one), with until when
        (seconds since the epoch): what the claims recorded last."""

    @abstractmethod
    def cancel_requested(self, request_id: str) -> bool:
        """Whether a cancellation was recorded for this in-flight job."""

    @abstractmethod
    def claim_many(
        self,
        limit: int,
        *,
        holder: str,
        lease_seconds: float,
        gate: RateGate | None = None,
        opening: Opening | None = None,
    ) -> list[Claim]:
        """Take up to ``limit`` of the oldest waiting jobs without blocking, each under a new lease
        of ``holder`` (in one step: one commit for all). With a ``gate``, only jobs it admits are
        taken: the jobs of models it holds back are passed over, so they block no other model.
        With an ``opening``, a store whose queue and statuses share a commit may store it as the
        status of each fresh claim that has no cancel recorded, saving its worker a write before
        the call; such claims say so (``Claim.opened_at``)."""

    @abstractmethod
    def share_rates(
        self, models: Collection[str], change: Callable[[Mapping[str, str] | None], dict[str, str]]
    ) -> None:
        """Run ``change`` on the stored rate-limit state of ``models`` and store what it returns,
        atomically with respect to claims and to other changes (see ``RateGate``). A back end with
        a single worker keeps no such state: it runs ``change(None)`` and stores nothing."""

    @abstractmethod
    def renew(self, claims: list[Claim], lease_seconds: float) -> Renewal:
        """Extend the leases of these claims that are still current and not lapsed. A claim missing
        from ``held`` is lost: its job may be another worker's now (a lapsed lease's slot may
        already be counted as free). ``cancelled`` names the held ones with a cancel recorded, so
        a cancel whose signal was lost still reaches its worker."""

    @abstractmethod
    def holds(self, claim: Claim) -> bool:
        """Whether the claim's lease is still the job's current one."""

    @abstractmethod
    def ack(self, claim: Claim) -> bool:
        """The job reached a final state: it is never handed out again. False (and nothing
        changed) when the lease is no longer current. Concurrent acks may share a commit."""

    @abstractmethod
    def release(self, claim: Claim) -> bool:
        """Put a claimed job back among the waiting ones, at its old place. False (and nothing
        changed) when the lease is no longer current."""

    @abstractmethod
    def requeue_lapsed(self, before: float) -> int:
        """Jobs whose lease ended wait again: their holder is gone. ``before`` is the caller's
        time.time(), or infinity when every holder is known gone; a back end whose leases are
        stamped by a server clock may judge by that clock instead. Returns how many."""

    @abstractmethod
    def counts(self) -> QueueCounts:
        """Waiting and in-flight jobs, read together and counted across processes."""

    @abstractmethod
    def compact(self) -> int:
        """Forget finished jobs and expired idempotency keys. Returns how many jobs were dropped."""

    @abstractmethod
    def close(self) -> None: ...


# -- statuses --------------------------------------------------------------------------------------


class StatusStore(ABC):
    """Status entries keyed by request id. Entries without a ttl never expire nor get evicted."""

    @abstractmethod
    def put(
        self, request_id: str, entry: StatusEntry, ttl: float | None = None, *, claim: Claim | None = None
    ) -> None:
        """Store (replace) the entry; with a ttl it disappears that many seconds from now. With a
        ``claim`` (a worker writing a job's progress), only while its lease is current: a worker
        whose job another one holds cannot overwrite that one's status."""

    @abstractmethod
    def get(self, request_id: str) -> StatusEntry | None: ...

    @abstractmethod
    def update(
        self, request_id: str, change: Callable[[StatusEntry], StatusEntry | None]
    ) -> StatusEntry | None:
        """Read, change and write the entry atomically: no other write falls in between. ``change``
        returns the new entry, or None to leave it as it is; it must not block or yield. The entry
        keeps its expiry (``expires_at``). Returns the entry as stored, None if there is none."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Delete expired entries now. Returns how many."""

    @abstractmethod
    def close(self) -> None: ...


# -- the index of requests per owner (the dashboard's lists) ---------------------------------------


class RequestIndex(ABC):
    """Every live request per owner, pending ones included, kept by the back end as it stores jobs
    and statuses. Rows of expired results (``RESULT_TTL``) are never listed."""

    @abstractmethod
    def list_for(
        self,
        owner: str,
        *,
        status: Status | None = None,
        endpoint: str | None = None,
        before: tuple[int, str] | None = None,
        limit: int = 50,
    ) -> list[Listed]:
        """The owner's requests, newest first (by ``submitted_at``, then request id), only those
        strictly older than the cursor ``before`` (``submitted_at``, ``request_id`` of the last row
        of the previous page). Reads one index range: as fast at 50,000 rows as at 50."""

    @abstractmethod
    def summary(self, owner: str, *, since: int) -> Summary:
        """The owner's requests finished since ``since`` (milliseconds since the epoch), per
        minute; the upstream latencies of the latest of them; and webhooks pending or failed."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Forget the rows of expired results now (a back end whose rows go with the status
        entries' own purge returns 0)."""


# -- the webhook outbox ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """A webhook owed to a client: ``payload`` (JSON text) to ``url``."""

    request_id: str
    owner: str
    url: str
    payload: str

    @property
    def webhook_id(self) -> str:
        """The same on every attempt, so receivers can drop duplicates."""
        return f"msg_{self.request_id}"


@dataclass(frozen=True)
class OwedDelivery:
    ticket: int
    delivery: Delivery


class Outbox(ABC):
    """Webhook deliveries owed, durably, until their sender is done with them."""

    @abstractmethod
    def owe(self, delivery: Delivery) -> None:
        """Record the delivery durably; raises StorageUnavailable if it could not be recorded."""

    @abstractmethod
    def take(self, limit: int, *, hold: float) -> list[OwedDelivery]:
        """Up to ``limit`` owed deliveries not taken by a live sender, oldest first. They are this
        sender's for ``hold`` seconds; once that is over without ``keep``, another sender may take
        them (a delivery resumes from the progress in its status, so nothing is sent twice but the
        attempt under way when its sender died)."""

    @abstractmethod
    def keep(self, owed: list[OwedDelivery], *, hold: float) -> set[int]:
        """The deliveries this sender is still working on stay its own ``hold`` seconds more.
        Returns the tickets it still holds: one missing was taken up by another sender (this one
        was cut off longer than its hold), which now sends it; this one must stop."""

    @abstractmethod
    def done(self, owed: OwedDelivery) -> None:
        """The delivery ended (delivered or given up): it is never taken again."""

    @abstractmethod
    def recover(self) -> int:
        """Deliveries taken by a sender that is gone are owed again. Only the back end's one sender
        calls it, when it starts. Returns how many."""

    @abstractmethod
    def compact(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


# -- signals between processes ---------------------------------------------------------------------


class RelaySink(ABC):
    """In a web process: where the streamed events of one request arrive."""

    @abstractmethod
    def next(self, timeout: float) -> bytes | None:
        """The next event; b"" if none came within ``timeout``; None once the relay ended."""

    @abstractmethod
    def close(self) -> None: ...


class RelaySender(ABC):
    """In a worker: sends one request's events to the web process its client waits on."""

    @abstractmethod
    def send(self, event: bytes) -> None:
        """Best effort: a client that went away must not stop the request itself."""

    @abstractmethod
    def close(self) -> None: ...


class WebSignals(ABC):
    """A web process's side of the back end's notifier. Every signal is a hint that saves latency:
    a lost one costs time (workers poll, waiters re-read the store), never a request."""

    @abstractmethod
    def work_queued(self) -> None:
        """New jobs wait: wake the workers."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Ask the worker running this job to abort it (the cancel flag is already stored)."""

    @abstractmethod
    def announce_final(self, request_id: str) -> None:
        """This request became final here: wake waiters in other web processes."""

    @abstractmethod
    def listen_finals(
        self, on_final: Callable[[str], None], on_gap: Callable[[], None] = lambda: None
    ) -> None:
        """Call ``on_final`` with each request id that became final, until ``close``; call
        ``on_gap`` when announcements may have been missed (after a reconnection). Blocks (run it
        in its own greenlet)."""

    @abstractmethod
    def open_relay(self, request_id: str) -> RelaySink:
        """Receive the events a worker relays for this request (open before it is queued)."""

    @abstractmethod
    def close(self) -> None: ...


class WorkerSignals(ABC):
    """A worker's side of the back end's notifier."""

    @abstractmethod
    def listen(self, on_work: Callable[[], None], on_cancel: Callable[[str], None]) -> None:
        """Call ``on_work`` when jobs were queued and ``on_cancel`` with each cancelled request id,
        until ``close``. Blocks (run it in its own greenlet)."""

    @abstractmethod
    def announce_final(self, request_id: str) -> None:
        """Wake the web processes waiting on this request. Never blocks the caller."""

    @abstractmethod
    def relay(self, request_id: str) -> RelaySender: ...

    @abstractmethod
    def close(self) -> None: ...


# -- the global concurrency ceiling ----------------------------------------------------------------


class Slot(ABC):
    """One job's hold on the upstream ceiling, given back exactly once."""

    @abstractmethod
    def release(self) -> None: ...


class ConcurrencyLimit(ABC):
    """``MAX_CONCURRENT`` upstream calls in flight at most, across every worker of the back end.

    ``free`` and ``hold`` are this worker's own bound; a back end with several workers also counts
    the ceiling inside ``JobQueue.claim_many``, in the claiming transaction, so that two workers can
    never both take the last slot."""

    @abstractmethod
    def free(self, timeout: float) -> int:
        """How many jobs this worker may claim now, waiting up to ``timeout`` for one to free up."""

    @abstractmethod
    def hold(self, claim: Claim) -> Slot:
        """The slot of a job just claimed (within what ``free`` allowed)."""


# -- a back end ------------------------------------------------------------------------------------


class Backend(ABC):
    """One back end, opened once per process; ``storage.factory.open_backend`` picks it."""

    queue: JobQueue
    statuses: StatusStore
    outbox: Outbox
    requests: RequestIndex

    @abstractmethod
    def web_signals(self) -> WebSignals:
        """The notifier's web side (one per web process)."""

    @abstractmethod
    def worker_signals(self) -> WorkerSignals:
        """The notifier's worker side (one per worker process)."""

    @abstractmethod
    def concurrency_limit(self, max_concurrent: int) -> ConcurrencyLimit: ...

    @abstractmethod
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
        """End a request: store its final ``entry`` for ``ttl`` seconds, owe its webhook
        ``delivery``, and ack its ``claim``, committed together where the back end can, else in that
        order (a crash in between leaves the claim to lapse, and the job's next holder completes
        what is missing). With a claim whose lease is no longer current nothing changes and False is
        returned. With ``withdraw`` (the web cancelling a job that waits, no claim) the job leaves
        the queue in the same step; False, and nothing changes, when it no longer waits."""

    @abstractmethod
    def keep_key(self, candidate: str) -> tuple[str, bool]:
        """The API key generated for a service started without API_KEY, kept by the back end so
        that every process accepts the same one: ``candidate`` when none was kept yet (True: this
        process created it), else the kept one (False)."""

    @abstractmethod
    def end_session(self, session: str, until: float) -> None:
        """Record that the dashboard session ``session`` was signed out, for every process, until
        ``until`` (seconds since the epoch: when it would have expired anyway)."""

    @abstractmethod
    def session_ended(self, session: str) -> bool:
        """Whether ``session`` was signed out (``end_session``) and would not have expired yet."""

    @abstractmethod
    def describe_key_store(self) -> str:
        """Where ``keep_key`` keeps the key, for the message that names it."""

    @abstractmethod
    def consumer_admitted(self) -> bool:
        """Whether this process may consume (claim jobs, send webhooks). The embedded back end
        admits one consumer at a time (a file lock); False means another one runs."""

    @property
    @abstractmethod
    def previous_holders_gone(self) -> bool:
        """Whether, once admitted, every earlier lease is known dead (the embedded back end's one
        consumer knows; a networked one waits for leases to lapse)."""

    def lost_requests(self) -> list[str]:
        """Requests whose status is still pending or processing although the queue holds them no
        more, so no worker will ever end them: the worker ends them as lost at its start, before it
        claims anything. Only a back end whose queue and statuses live in separate files can lose
        one without the other (a queue database deleted or moved aside); one that keeps both in one
        database, ended in one transaction, has none, as this default says."""
        return []

    @abstractmethod
    def beat(self, holder: str) -> None:
        """Record, for ``probe`` in every process, that the worker ``holder`` is alive and its
        dispatch loop turns. Raises StorageUnavailable when it could not be recorded."""

    @abstractmethod
    def probe(self) -> float | None:
        """Read and write the store, as cheaply as proves both work (``/health`` asks about once a
        second), and return how many seconds ago the freshest heartbeat of any worker (``beat``)
        was recorded; None when there is none. Raises StorageUnavailable when the store cannot be
        read or written. Waiting on another writer's lock is contention, not a failure: a back end
        may report the store as working then."""

    @abstractmethod
    def close(self) -> None: ...
