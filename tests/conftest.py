"""Shared fixtures. The test process is an entry point too: it patches first, like app.py."""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402

from support.harness import free_port, wait_until  # noqa: E402
from support.postgres import REQUIRE_ENV, PostgresServer, server_binaries  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
__all__ = ["free_port", "wait_until"]

API_KEY = "test-key-0123456789"


@dataclass
class FakeUpstream:
    process: subprocess.Popen[str]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return dict(requests.get(f"http://127.0.0.1:{self.port}/_stats", timeout=5).json())

    def reset(self) -> None:
        requests.post(f"http://127.0.0.1:{self.port}/_reset", timeout=5)


def start_fake_upstream(delay: float = 0.0) -> FakeUpstream:
    process = subprocess.Popen(
        [sys.executable, str(SUPPORT / "fake_upstream.py"), "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("PORT "), line
    return FakeUpstream(process=process, port=int(line.split()[1]))


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = start_fake_upstream()
    yield upstream
    upstream.process.terminate()
    upstream.process.wait(timeout=10)


@dataclass
class Receiver:
    process: subprocess.Popen[str]
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, name: str) -> list[dict[str, Any]]:
        """Every POST whose path ends with ``/<name>``, in arrival order."""
        everything = requests.get(self.url("/_received"), timeout=5).json()
        return [r for r in everything if r["path"].endswith("/" + name)]


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    process = subprocess.Popen(
        [sys.executable, str(SUPPORT / "webhook_receiver.py")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("PORT "), line
    yield Receiver(process=process, port=int(line.split()[1]))
    process.terminate()
    process.wait(timeout=10)


def procfile_command(kind: str) -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == kind:
            return shlex.split(command.strip())
    raise AssertionError(f"no {kind}: line in the Procfile")


@dataclass
class Service:
    """The real service, started from the Procfile's web line."""

    port: int
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, kind: str = "web", wait: bool = True) -> subprocess.Popen[bytes]:
        command = procfile_command(kind)
        if command[0] == "python":
            command[0] = sys.executable
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        if kind == "web":
            self.process = process
            if wait:
                wait_until(self.healthy, timeout=20)
        else:
            self.extra.append(process)
        return process

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self, key: str = API_KEY) -> dict[str, str]:
        return {"X-API-Key": key}

    def submit(self, body: dict[str, Any], key: str = API_KEY) -> requests.Response:
        return requests.post(
            self.url + "/v1/chat/completions", json=body, headers=self.headers(key), timeout=10
        )

    def status(self, request_id: str, key: str = API_KEY) -> requests.Response:
        return requests.get(
            f"{self.url}/v1/chat/completions/{request_id}", headers=self.headers(key), timeout=10
        )

    def wait_final(self, request_id: str, timeout: float = 20.0) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            body = self.status(request_id).json()
            return body if body.get("status") in ("completed", "error") else None

        return dict(wait_until(final, timeout=timeout, interval=0.05))

    def worker_pids(self) -> list[int]:
        """The embedded worker: named in DATA_DIR/worker.lock (SQLite back end), else the web
        process's child."""
        lock = self.data_dir / "worker.lock"
        text = lock.read_text().strip() if lock.exists() else ""
        if text.isdigit():
            return [int(text)]
        if self.process is None or "DATABASE_URL" not in self.env:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        code = None
        for process in [p for p in [self.process, *self.extra] if p is not None]:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.extra.clear()
        return code


def body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def make_service(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def make(start: bool = True, **env: str) -> Service:
        data_dir = tmp_path / f"data{len(services)}"
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "PORT": str(free_port()),
            "HOST": "127.0.0.1",
            "API_KEY": API_KEY,
            "OPENAI_API_BASE_URL": fake_upstream.base_url,
            "OPENAI_API_KEY": "sk-upstream-secret-0000",
            "DATA_DIR": str(data_dir),
            "RETRY_BASE_DELAY": "0.05",
            "SHUTDOWN_TIMEOUT": "5",
            **env,
        }
        full_env = {k: v for k, v in full_env.items() if v != ""}
        service = Service(
            port=int(full_env["PORT"]),
            data_dir=data_dir,
            env=full_env,
            log_path=tmp_path / f"service{len(services)}.log",
        )
        services.append(service)
        if start:
            service.start()
        return service

    yield make
    for service in services:
        service.stop(signal.SIGKILL, timeout=10)


def missing(message: str, require_env: str) -> NoReturn:
    """A service a test needs is not on this machine: the test fails where ``require_env`` is 1
    (as in CI, which installs it), and is skipped, saying what is missing, elsewhere."""
    if os.environ.get(require_env) == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    """A real PostgreSQL server for the whole run, or None when this machine has none."""
    binaries = server_binaries()
    if binaries is None:
        yield None
        return
    server = PostgresServer(binaries)
    yield server
    server.close()


@pytest.fixture(params=["embedded", "postgres"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that selects each back end, for end-to-end tests run on both."""
    if request.param == "postgres":
        # Short, so that a killed worker's calls run again soon; not so short that one slow
        # renewal on a loaded machine (a third of it) stops every call in flight.
        return {"DATABASE_URL": request.getfixturevalue("database_url"), "LEASE_TIMEOUT": "6"}
    return {}


@pytest.fixture
def database_url(postgres_server: PostgresServer | None) -> Iterator[str]:
    """A fresh, empty database of that server. Without a server the test is skipped, unless
    REQUIRE_POSTGRES=1 (as in CI), which makes it fail."""
    if postgres_server is None:
        missing(
            "no PostgreSQL server binaries (apt-get install postgresql): Postgres tests skipped", REQUIRE_ENV
        )
    url = postgres_server.new_database()
    yield url
    postgres_server.drop_database(url)
