"""The throughput benchmark's arithmetic and table (bench_throughput.py; no engine is started: milliseconds)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_throughput as bt  # noqa: E402


def test_summarize_pairs_rounds_and_counts_prompt_tokens():
    # round 2 is slow for both engines (another job): the paired per-round ratios stay 2, 2, 2
    times = {"unpruned": [4.0, 8.0, 4.0], "pruned": [2.0, 4.0, 2.0]}
    s = bt.summarize(times, {"unpruned": 800, "pruned": 100}, n=8)
    assert s["ratio"] == pytest.approx(2.0)
    assert s["ratios"] == pytest.approx([2.0, 2.0, 2.0])
    assert s["unpruned"]["req_s"] == pytest.approx(2.0)          # 8 requests / median 4 s
    assert s["pruned"]["tok_s"] == pytest.approx(50.0)           # 100 prompt tokens / median 2 s


def test_table_says_whether_the_target_is_met():
    s = bt.summarize({"unpruned": [3.0], "pruned": [1.0]}, {"unpruned": 6, "pruned": 2}, n=3)
    table = bt.format_table({"vLLM": s}, {"a": 3.0, "b": 4.0})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| a |")
            or line.startswith("| b |")}
    assert rows["a"].rstrip(" |").endswith("yes")     # 3.0 >= 0.8 x 3.0
    assert rows["b"].rstrip(" |").endswith("no")      # 3.0 < 0.8 x 4.0 = 3.2
    assert "| vLLM | 1.000 | 3.000 | 2.0 | 2.0 | 3.00 (3.00) |" in table
