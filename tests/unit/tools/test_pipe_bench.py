"""scripts/pipe_bench.py runs: each way hands the child the whole image (it checks the
child's acknowledgement) and prints a time for each."""

from __future__ import annotations

import pytest

from scripts import pipe_bench


def test_pipe_bench_times_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    rows = pipe_bench.main(["--sizes", "64,128", "--rounds", "3"])
    assert [side for side, *_ in rows] == [64, 128]
    assert all(t > 0 for _, *times in rows for t in times)
    out = capsys.readouterr().out
    assert "shm reused ms" in out and "128x128" in out
