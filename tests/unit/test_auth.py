"""Key checking and the generated key."""

from __future__ import annotations

import io
import stat
from pathlib import Path

from llm_proxy.api.auth import KeyChecker, generated_key, owner_of, presented_key
from llm_proxy.storage.sqlite.backend import EmbeddedBackend


def test_each_key_maps_to_its_own_owner() -> None:
    checker = KeyChecker(["alpha-key-1", "beta-key-22"])
    assert checker.owner("alpha-key-1") == owner_of("alpha-key-1")
    assert checker.owner("beta-key-22") == owner_of("beta-key-22")
    assert owner_of("alpha-key-1") != owner_of("beta-key-22")
    for wrong in [None, "", "alpha-key-", "alpha-key-1 ", "ALPHA-KEY-1", "\udcff"]:
        assert checker.owner(wrong) is None


def test_owner_tag_does_not_contain_the_key() -> None:
    assert "alpha-key-1" not in owner_of("alpha-key-1")


def test_presented_key_from_either_header() -> None:
    assert presented_key(" k1 ", None) == "k1"
    assert presented_key(" k1 ", "Bearer other") == "k1"
    assert presented_key(None, "Bearer k2") == "k2"
    assert presented_key("", "bearer k3") == "k3"
    assert presented_key(None, "Basic k4") is None
    assert presented_key(None, None) is None


def test_generated_key_is_strong_private_and_printed_once(tmp_path: Path) -> None:
    backend = EmbeddedBackend(tmp_path)
    first_out = io.StringIO()
    key = generated_key(backend.keep_key, "here", announce=first_out)
    assert len(key) >= 40 and key in first_out.getvalue()
    assert stat.S_IMODE((tmp_path / "api_key").stat().st_mode) == 0o600
    second_out = io.StringIO()
    assert generated_key(backend.keep_key, "here", announce=second_out) == key
    assert key not in second_out.getvalue()
    backend.close()
