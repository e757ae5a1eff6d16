"""Configuration parsing: defaults, every variable, and a clear error naming a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import Config, ConfigError, load_config


def test_defaults() -> None:
    config = load_config({})
    assert config == Config()
    assert (config.port, config.max_concurrent, config.max_retries) == (3000, 2, 3)
    assert (config.request_timeout, config.result_ttl) == (300.0, 3600.0)
    assert config.data_dir == Path("./data") and config.embedded_worker is True
    assert config.max_body_bytes == 1024 * 1024 and config.max_queue == 10_000
    assert config.openai_api_base_url == "https://api.openai.com/v1"
    assert config.api_keys == ()


def test_every_variable_is_read() -> None:
    config = load_config(
        {
            "PORT": "8080",
            "API_KEY": "key-one-1234, key-two-5678 ,",
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_API_BASE_URL": "http://localhost:11434/v1/",
            "MAX_CONCURRENT": "7",
            "MAX_RETRIES": "0",
            "REQUEST_TIMEOUT": "2.5",
            "RESULT_TTL": "60",
            "DATA_DIR": "/tmp/x",
            "MAX_BODY_BYTES": "2048",
            "EMBEDDED_WORKER": "false",
            "MAX_QUEUE": "5",
            "SHUTDOWN_TIMEOUT": "3",
            "RETRY_BASE_DELAY": "0.1",
            "RETRY_MAX_DELAY": "1",
            "LOG_LEVEL": "debug",
        }
    )
    assert config.port == 8080
    assert config.api_keys == ("key-one-1234", "key-two-5678")
    assert config.openai_api_base_url == "http://localhost:11434/v1"
    assert (config.max_concurrent, config.max_retries, config.request_timeout) == (7, 0, 2.5)
    assert config.data_dir == Path("/tmp/x") and config.embedded_worker is False
    assert (config.max_body_bytes, config.max_queue, config.shutdown_timeout) == (2048, 5, 3.0)
    assert (config.retry_base_delay, config.retry_max_delay, config.log_level) == (0.1, 1.0, "DEBUG")


@pytest.mark.parametrize(
    "name,value",
    [
        ("MAX_CONCURRENT", "abc"),
        ("MAX_CONCURRENT", "0"),
        ("PORT", "70000"),
        ("PORT", "x"),
        ("MAX_RETRIES", "-1"),
        ("REQUEST_TIMEOUT", "soon"),
        ("REQUEST_TIMEOUT", "nan"),
        ("RESULT_TTL", "inf"),
        ("EMBEDDED_WORKER", "maybe"),
        ("OPENAI_API_BASE_URL", "api.openai.com"),
        ("API_KEY", "short"),
        ("MAX_BODY_BYTES", "10"),
        ("LOG_LEVEL", "loud"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})


def test_empty_values_mean_default() -> None:
    assert load_config({"MAX_CONCURRENT": "", "API_KEY": " "}) == Config()


def test_repr_hides_secrets() -> None:
    text = repr(load_config({"API_KEY": "very-secret-key", "OPENAI_API_KEY": "sk-secret"}))
    assert "very-secret-key" not in text and "sk-secret" not in text


@pytest.mark.parametrize("name", ["API_KEY", "OPENAI_API_KEY"])
def test_the_example_placeholders_are_refused_by_name(name: str) -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    placeholder = next(line.split("=", 1)[1] for line in example.splitlines() if line.startswith(f"{name}="))
    with pytest.raises(ConfigError) as raised:
        load_config({name: placeholder})
    assert str(raised.value).startswith(name) and ".env.example" in str(raised.value)
    if name == "API_KEY":
        # Nor hidden among real keys.
        with pytest.raises(ConfigError):
            load_config({name: f"a-real-key-123456,{placeholder}"})


def test_an_unset_upstream_key_for_openai_is_warned_about() -> None:
    assert any("OPENAI_API_KEY" in w for w in load_config({}).warnings())
    assert load_config({"OPENAI_API_KEY": "sk-real"}).warnings() == []
    # A local upstream (Ollama, vLLM) may need no key.
    assert load_config({"OPENAI_API_BASE_URL": "http://127.0.0.1:11434/v1"}).warnings() == []
