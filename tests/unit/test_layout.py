"""The package's layers: imports point only downwards, and the web process stays lean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "llm_proxy"
# Lower ranks are lower layers. A module may import its own sub-package and lower ranks only.
RANKS = {
    "domain": 0,
    "processes": 0,
    "observability": 1,
    "storage": 1,
    "services": 2,
    "upstream": 3,
    "webhooks": 4,
    "ratelimit": 4,
    "api": 5,
    "dashboard": 6,
    "web": 7,
    "worker": 6,
}


def layer(module: str) -> str:
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("llm_proxy.")}


def test_every_import_points_down_a_layer() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue
        here = layer("llm_proxy." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imports_of(path):
            there = layer(target)
            if there != here and RANKS[there] >= RANKS[here]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == []
    assert set(RANKS) == {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()} - {
        "__init__",
        "__pycache__",
    }


def test_the_web_process_does_not_load_webhook_delivery_code() -> None:
    probe = (
        "import sys, app, llm_proxy.web.server; "
        "print(sorted(m for m in sys.modules if 'webhooks' in m or 'requests_hardened' in m))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "requests_hardened" not in loaded and "standardwebhooks" not in loaded
    assert "llm_proxy.webhooks.delivery" not in loaded and "llm_proxy.webhooks.sender" not in loaded
    assert "llm_proxy.webhooks.safety" in loaded
