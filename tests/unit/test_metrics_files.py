"""The multiprocess metrics files: one that cannot be read is set aside, the others still count."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from llm_proxy.observability.metrics import DAMAGED_SUFFIX, TolerantMultiProcessCollector


def _counter_file(path: Path, value: float) -> None:
    """A file as a process's counter leaves it (what prometheus_client writes)."""
    values = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    key = mmap_key("llm_proxy_requests_total", "llm_proxy_requests_total", ["status"], ["completed"], "Done.")
    values.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    values.close()  # type: ignore[no-untyped-call]


def _total(collector: TolerantMultiProcessCollector) -> float:
    return sum(
        float(sample.value)
        for metric in collector.collect()
        for sample in metric.samples
        if sample.name == "llm_proxy_requests_total"
    )


def test_a_junk_file_is_moved_aside_once_and_the_others_still_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _counter_file(tmp_path / "counter_1.db", 2)
    _counter_file(tmp_path / "counter_2.db", 3)
    junk = tmp_path / "counter_3.db"
    junk.write_bytes(bytes(range(256)) * 64)
    collector = TolerantMultiProcessCollector(str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="llm_proxy.metrics"):
        assert _total(collector) == 5
        assert _total(collector) == 5
    assert [r.getMessage().split(" cannot")[0] for r in caplog.records] == [f"metrics file {junk}"]
    assert not junk.exists() and (tmp_path / f"counter_3.db{DAMAGED_SUFFIX}").exists()
    assert (tmp_path / "counter_1.db").exists() and (tmp_path / "counter_2.db").exists()


def test_sound_files_are_read_in_one_pass(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _counter_file(tmp_path / "counter_1.db", 4)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.metrics"):
        assert _total(TolerantMultiProcessCollector(str(tmp_path))) == 4
    assert caplog.records == []
