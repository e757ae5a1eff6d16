"""The benchmark's quick mode runs end to end, so it cannot rot. Its figures are not judged here:
speed is measured by the benchmark itself, never asserted in a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FIGURES = {
    "submit throughput",
    "status (completed) throughput",
    "status (pending) throughput",
    "dispatch latency p50",
    "dispatch latency p99",
    "slot efficiency",
    "peak upstream concurrency",
    "worker capacity",
    "RSS growth",
    "open fd growth",
    "DATA_DIR after expiry",
    "wait-mode throughput",
    "wait-mode added latency p50",
    *(
        f"rate limits, pacing {label}: {figure}"
        for label in ("on", "off")
        for figure in ("goodput", "upstream 429s", "ended rate_limited")
    ),
}
POSTGRES_FIGURES = {
    f"{name} [postgres]"
    for name in (
        "submit throughput",
        "status (completed) throughput",
        "status (pending) throughput",
        "dispatch latency p50",
        "dispatch latency p99",
        "slot efficiency",
        "peak upstream concurrency",
        "worker capacity",
        "two workers / one",
    )
}


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path: Path, postgres_server: object) -> None:
    out = tmp_path / "bench.json"
    # The gevent client: CI machines have no wrk, and this keeps that path exercised everywhere.
    env = {**os.environ, "BENCH_CLIENT": "gevent"}
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["client"] == "gevent" and report["quick"] is True
    figures = {f["name"]: f for f in report["figures"]}
    # The Postgres column is measured wherever a server can be started (always in CI).
    assert set(figures) == (FIGURES | POSTGRES_FIGURES if postgres_server is not None else FIGURES)
    ratios = [f["ratio"] for f in report["figures"] if f["ratio"] is not None]
    assert len(ratios) == (7 if postgres_server is not None else 4) and all(r > 0 for r in ratios)
    assert figures["peak upstream concurrency"]["value"] >= 1
    assert "| submit throughput |" in done.stdout
