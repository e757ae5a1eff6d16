"""The README and the shipped files stay true to the code."""

from __future__ import annotations

import re

from config import load_config
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
    # The example itself is a valid configuration.
    values = dict(
        line.split("=", 1) for line in example.splitlines() if line.strip() and not line.startswith("#")
    )
    load_config(values)


def test_docker_image_gets_every_file_the_service_reads() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "openapi.json" in dockerfile and "*.py" in dockerfile
    assert 'CMD ["python", "app.py"]' in dockerfile
