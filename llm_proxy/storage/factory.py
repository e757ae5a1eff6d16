"""The one place a back end is chosen; both entry points open theirs here."""

from __future__ import annotations

from pathlib import Path

from llm_proxy.storage.base import Backend


def open_backend(*, data_dir: Path) -> Backend:
    """The embedded back end in ``data_dir`` (created if missing).

    Raises StorageUnavailable when it cannot be opened, StorageIncompatible when the installed
    libraries or the stored layout are not what the code relies on."""
    from llm_proxy.storage.sqlite.backend import EmbeddedBackend

    return EmbeddedBackend(data_dir)
