"""Configuration: every environment variable is read once, here, into one frozen object.

Entry points call ``load_config(os.environ)``; nothing else reads the environment, so tests build a
``Config`` directly and never patch ``os.environ``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

DEFAULT_UPSTREAM = "https://api.openai.com/v1"


class ConfigError(ValueError):
    """A configuration variable has a value the service cannot run with."""


@dataclass(frozen=True, kw_only=True)
class Config:
    port: int = 3000
    api_keys: tuple[str, ...] = ()
    """Keys accepted in X-API-Key / Authorization: Bearer. Empty: a generated key is used."""
    openai_api_key: str | None = None
    openai_api_base_url: str = DEFAULT_UPSTREAM
    max_concurrent: int = 2
    max_retries: int = 3
    request_timeout: float = 300.0
    result_ttl: float = 3600.0
    data_dir: Path = Path("./data")
    max_body_bytes: int = 1024 * 1024
    max_response_bytes: int = 32 * 1024 * 1024
    """Largest upstream answer read (a streamed one: its relayed events); a larger one is an error."""
    embedded_worker: bool = True
    max_queue: int = 10_000
    shutdown_timeout: float = 20.0
    retry_base_delay: float = 0.5
    """First backoff wait between upstream attempts; doubles each time."""
    retry_max_delay: float = 30.0
    log_level: str = "INFO"
    webhook_secret: str | None = None
    """``whsec_`` + base64 key; when set, webhooks carry Standard Webhooks signatures."""
    webhook_retry_base: float = 5.0
    webhook_allow_private: bool = False
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 32
    metrics_public: bool = False
    """GET /metrics without a key (for a scraper on a private network)."""
    sync_wait_max: float = 25.0
    """Longest a long-poll or a wait-mode submit holds its connection (Heroku cuts at 30 s)."""
    database_url: str | None = None
    """Set: everything is kept in this PostgreSQL database, shared by every process."""
    lease_timeout: float = 30.0
    """Seconds a claimed request may go without its worker's renewal before another takes it."""
    database_pool_size: int = 2
    """Connections per process (plus one for LISTEN)."""
    rate_limit_adaptive: bool = True
    """Pace calls by the upstream's x-ratelimit-* headers; a 429 pauses its model for everybody."""
    max_rpm: int | None = None
    """Upstream calls in any 60 s window at most, over every model."""
    max_tpm: int | None = None
    """Tokens (estimated before the call, corrected from usage) in any 60 s window at most."""
    rate_limits: tuple[tuple[str, int | None, int | None], ...] = ()
    """Per-model ceilings (model, rpm, tpm), from ``RATE_LIMITS``."""

    def __repr__(self) -> str:
        # Secrets never reach a log, even through an accidental repr.
        shown = {
            f.name: (
                "***"
                if f.name in ("api_keys", "openai_api_key", "webhook_secret", "database_url")
                else getattr(self, f.name)
            )
            for f in dataclasses.fields(self)
        }
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def warnings(self) -> list[str]:
        """What may work but is probably a mistake, for the start-up log."""
        found = []
        if self.openai_api_key is None and urlsplit(self.openai_api_base_url).hostname == OPENAI_HOST:
            found.append(
                "OPENAI_API_KEY is not set and the upstream (OPENAI_API_BASE_URL) is OpenAI's:"
                " it will refuse every call (401)"
            )
        return found


def _int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {raw!r}")
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _base_url(name: str, raw: str) -> str:
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an absolute http(s) URL, got {raw!r}")
    return url


PLACEHOLDERS = {
    "API_KEY": "change-me-to-a-long-random-key",
    "OPENAI_API_KEY": "sk-your-upstream-key",
}
"""The example values of ``.env.example``: a service started with them would accept a key anyone
can read and send a key the upstream refuses."""
OPENAI_HOST = "api.openai.com"


def _not_placeholder(name: str, value: str) -> str:
    if value == PLACEHOLDERS.get(name):
        raise ConfigError(
            f"{name} is still the example value from .env.example; set a real one"
            + (" (or remove it to have a key generated)" if name == "API_KEY" else "")
        )
    return value


def _keys(name: str, raw: str) -> tuple[str, ...]:
    keys = tuple(_not_placeholder(name, k.strip()) for k in raw.split(",") if k.strip())
    for key in keys:
        if len(key) < 8:
            raise ConfigError(f"{name}: every key must be at least 8 characters long")
    return keys


def _webhook_secret(name: str, raw: str) -> str:
    secret = raw.strip()
    body = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        key = b""
    if not secret.startswith("whsec_") or len(key) < 16:
        raise ConfigError(
            f"{name} must be 'whsec_' followed by a base64 key of at least 16 bytes "
            '(generate one with: python -c "import base64, secrets; '
            "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\")"
        )
    return secret


def _database_url(name: str, raw: str) -> str:
    url = raw.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        # The value may hold a password: never repeat it.
        raise ConfigError(f"{name} must be a postgres:// or postgresql:// URL")
    return url


def _rate_limits(name: str, raw: str) -> tuple[tuple[str, int | None, int | None], ...]:
    """``model=rpm:tpm`` pairs, comma-separated; either number may be left out (``gpt-4o=500``,
    ``gpt-4o=:30000``). The model is split off at the last ``=``: names may hold colons."""
    found: dict[str, tuple[int | None, int | None]] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        model, equals, limits = item.rpartition("=")
        rpm_raw, _, tpm_raw = limits.partition(":")
        if not equals or not model.strip() or ":" in tpm_raw or not (rpm_raw.strip() or tpm_raw.strip()):
            raise ConfigError(
                f"{name}: {item!r} is not model=rpm:tpm (e.g. gpt-4o=500:30000, gpt-4o=500, gpt-4o=:30000)"
            )
        rpm = _int(name, rpm_raw, 1) if rpm_raw.strip() else None
        tpm = _int(name, tpm_raw, 1) if tpm_raw.strip() else None
        if model.strip() in found:
            raise ConfigError(f"{name}: model {model.strip()!r} is listed twice")
        found[model.strip()] = (rpm, tpm)
    return tuple((model, rpm, tpm) for model, (rpm, tpm) in found.items())


def _level(name: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def load_config(env: Mapping[str, str]) -> Config:
    """Build the config from environment variables; raise ConfigError naming the bad variable."""
    values: dict[str, object] = {}

    def take(name: str, field: str, parse: Callable[[str, str], T]) -> None:
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            values[field] = parse(name, raw)

    take("PORT", "port", lambda n, r: _int(n, r, 1))
    take("API_KEY", "api_keys", _keys)
    take("OPENAI_API_KEY", "openai_api_key", lambda n, r: _not_placeholder(n, r.strip()))
    take("OPENAI_API_BASE_URL", "openai_api_base_url", _base_url)
    take("MAX_CONCURRENT", "max_concurrent", lambda n, r: _int(n, r, 1))
    take("MAX_RETRIES", "max_retries", lambda n, r: _int(n, r, 0))
    take("REQUEST_TIMEOUT", "request_timeout", lambda n, r: _float(n, r, 0.001))
    take("RESULT_TTL", "result_ttl", lambda n, r: _float(n, r, 1))
    take("DATA_DIR", "data_dir", lambda n, r: Path(r.strip()))
    take("MAX_BODY_BYTES", "max_body_bytes", lambda n, r: _int(n, r, 1024))
    take("MAX_RESPONSE_BYTES", "max_response_bytes", lambda n, r: _int(n, r, 1024))
    take("EMBEDDED_WORKER", "embedded_worker", _bool)
    take("MAX_QUEUE", "max_queue", lambda n, r: _int(n, r, 1))
    take("SHUTDOWN_TIMEOUT", "shutdown_timeout", lambda n, r: _float(n, r, 0))
    take("RETRY_BASE_DELAY", "retry_base_delay", lambda n, r: _float(n, r, 0))
    take("RETRY_MAX_DELAY", "retry_max_delay", lambda n, r: _float(n, r, 0))
    take("LOG_LEVEL", "log_level", _level)
    take("WEBHOOK_SECRET", "webhook_secret", _webhook_secret)
    take("WEBHOOK_RETRY_BASE", "webhook_retry_base", lambda n, r: _float(n, r, 0))
    take("WEBHOOK_ALLOW_PRIVATE", "webhook_allow_private", _bool)
    take("WEBHOOK_TIMEOUT", "webhook_timeout", lambda n, r: _float(n, r, 0.01))
    take("WEBHOOK_CONCURRENCY", "webhook_concurrency", lambda n, r: _int(n, r, 1))
    take("SYNC_WAIT_MAX", "sync_wait_max", lambda n, r: _float(n, r, 0))
    take("METRICS_PUBLIC", "metrics_public", _bool)
    take("DATABASE_URL", "database_url", _database_url)
    take("LEASE_TIMEOUT", "lease_timeout", lambda n, r: _float(n, r, 1))
    take("DATABASE_POOL_SIZE", "database_pool_size", lambda n, r: _int(n, r, 1))
    take("RATE_LIMIT_ADAPTIVE", "rate_limit_adaptive", _bool)
    take("MAX_RPM", "max_rpm", lambda n, r: _int(n, r, 1))
    take("MAX_TPM", "max_tpm", lambda n, r: _int(n, r, 1))
    take("RATE_LIMITS", "rate_limits", _rate_limits)
    port = values.get("port", 3000)
    if isinstance(port, int) and port > 65535:
        raise ConfigError(f"PORT must be <= 65535, got {port}")
    return Config(**values)  # type: ignore[arg-type]


def load_from_process_env() -> Config:
    """Read `.env` (when present; real environment variables win), then the environment."""
    from dotenv import load_dotenv

    load_dotenv(dotenv_path=Path.cwd() / ".env", override=False)
    return load_config(os.environ)
