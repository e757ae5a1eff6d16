"""A throwaway PostgreSQL server for the tests and the benchmark, from the machine's own binaries
(Debian's ``postgresql`` package), on a loopback port, in a temporary folder.

As root the server runs as the ``postgres`` user (it refuses to run as root). Each test gets a
database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from support.harness import free_port

REQUIRE_ENV = "REQUIRE_POSTGRES"
"""Set to 1 (CI does): a missing server fails the Postgres tests instead of skipping them."""


def server_binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self.port = free_port()
        self._root = Path(tempfile.mkdtemp(prefix="llm-proxy-pg-"))
        self._data = self._root / "data"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self._root, "postgres")
        self._run("initdb", "-D", str(self._data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        self._names = itertools.count(1)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(sql)

    def new_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(Exception):
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would)."""
        self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop")

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-l",
            str(self._root / "server.log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self._root} -c listen_addresses=127.0.0.1 -c max_connections=200",
            "start",
        )

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self._root, ignore_errors=True)
