"""The README and the shipped files stay true to the code."""

from __future__ import annotations

import re

from config import PLACEHOLDERS, load_config
from conftest import ROOT


def config_variables() -> set[str]:
    source = (ROOT / "config.py").read_text()
    return set(re.findall(r'take\("([A-Z_]+)"', source))


def test_every_configuration_variable_is_documented_and_in_the_example() -> None:
    variables = config_variables()
    assert len(variables) >= 20
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for name in sorted(variables):
        assert f"| `{name}` |" in readme, name
        assert name in example, name
    # The example is a valid configuration once its two placeholder keys are replaced (which the
    # start insists on).
    values = dict(
        line.split("=", 1) for line in example.splitlines() if line.strip() and not line.startswith("#")
    )
    assert {values[name] for name in PLACEHOLDERS} == set(PLACEHOLDERS.values())
    load_config({**values, "API_KEY": "a-real-key-123456", "OPENAI_API_KEY": "sk-real"})


def test_docker_image_gets_every_file_the_service_reads() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied: set[str] = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    # The entry points and config.py, and the whole package (its openapi.json included).
    assert {p.name for p in ROOT.glob("*.py")} <= copied
    assert "llm_proxy" in copied and (ROOT / "llm_proxy" / "api" / "openapi.json").exists()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "llm_proxy" not in ignored and not any(p.endswith(".json") for p in ignored)
    assert 'CMD ["python", "app.py"]' in dockerfile
