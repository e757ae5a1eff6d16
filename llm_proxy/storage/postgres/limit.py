"""The networked back end's ceiling is counted in the claiming transaction (see ``queue``): a
claimed job's slot is taken until the job is finished or put back, which free it in the same
statement and wake the workers. Here, only this worker's own bound on top of it."""

from __future__ import annotations

from llm_proxy.storage.local import LocalLimit
from llm_proxy.storage.postgres.queue import PostgresJobQueue


class SharedLimit(LocalLimit):
    def __init__(self, max_concurrent: int, queue: PostgresJobQueue) -> None:
        super().__init__(max_concurrent)
        queue.with_ceiling(max_concurrent)
