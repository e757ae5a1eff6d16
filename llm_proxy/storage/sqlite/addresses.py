"""Names of the embedded back end's Unix sockets: one set per DATA_DIR."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WORKER = "worker"
WEB = "web"
RELAY = "relay"


def address_for(data_dir: Path, role: str = WORKER) -> str:
    """A Linux abstract socket address (no file to clean up), the same for every process that
    opens the same DATA_DIR."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:24]
    return f"\0llm-proxy-{digest}" + ("" if role == WORKER else f"-{role}")
