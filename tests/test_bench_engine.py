"""The engine micro-benchmark (``python -m bench.engine``) keeps working and keeps its promises."""

from __future__ import annotations

import re

import pytest

from bench import engine


@pytest.mark.parametrize(
    "extra", [[], ["--vary", "--connections", "3", "--access-log", "json", "--metrics"]]
)
def test_engine_benchmark_sends_one_write_each_way_per_request(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A short run serves its requests through the real engine (every response checked
    byte for byte) and each request and response crosses the engine in one write."""
    assert engine.main(["--requests", "128", "--repeat", "1", "--seconds", "10", *extra]) == 0
    out = capsys.readouterr().out
    assert "engine: 128 requests x 1 repeats" in out
    assert re.search(r"us/request: best \d+\.\d\d", out)
    assert "writes/request: to client 1.00, to backend 1.00" in out
