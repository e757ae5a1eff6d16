"""The rate-limit variables: parsed, validated, and a bad value names its variable."""

from __future__ import annotations

import pytest

from config import ConfigError, load_config


def test_rate_limit_defaults_pace_without_ceilings() -> None:
    config = load_config({})
    assert config.rate_limit_adaptive is True
    assert (config.max_rpm, config.max_tpm, config.rate_limits) == (None, None, ())


def test_rate_limit_variables_are_read() -> None:
    config = load_config(
        {
            "RATE_LIMIT_ADAPTIVE": "false",
            "MAX_RPM": "600",
            "MAX_TPM": "100000",
            "RATE_LIMITS": "gpt-4o=500:30000, gpt-4o-mini=5000:2000000,ft:gpt-4o:org::x1=7,o1=:900",
        }
    )
    assert config.rate_limit_adaptive is False
    assert (config.max_rpm, config.max_tpm) == (600, 100000)
    assert config.rate_limits == (
        ("gpt-4o", 500, 30000),
        ("gpt-4o-mini", 5000, 2000000),
        ("ft:gpt-4o:org::x1", 7, None),
        ("o1", None, 900),
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RATE_LIMIT_ADAPTIVE", "maybe"),
        ("MAX_RPM", "0"),
        ("MAX_RPM", "many"),
        ("MAX_TPM", "-5"),
        ("RATE_LIMITS", "gpt-4o"),
        ("RATE_LIMITS", "gpt-4o=fast"),
        ("RATE_LIMITS", "=5:6"),
        ("RATE_LIMITS", "gpt-4o=:"),
        ("RATE_LIMITS", "gpt-4o=1:2:3"),
        ("RATE_LIMITS", "gpt-4o=0:10"),
        ("RATE_LIMITS", "a=1,a=2"),
    ],
)
def test_bad_rate_limit_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({name: value})
