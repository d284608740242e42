"""The latency benchmark: its statistics mean what they say (fake clock), and the report describes
every level with its real parameter count and decode-step kind."""

import json
import subprocess
import sys

import pytest
import torch

import benchmark_adapter_latency as bal
import timing
from hidden_adapter import create_adapter
from tests.conftest import ROOT


class FakeClock:
    """Stands in for the `time` module: time passes only inside the timed function."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_time_ms_reports_the_timed_runs(monkeypatch):
    """Warm-up runs are not timed; median, p10/p90, min and max are those of the timed runs, in ms
    (timing.time_ms, summarised by timing.spread)."""
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    ms = iter([1000.0, 1000.0, 5.0, 1.0, 3.0, 2.0, 4.0])  # two warm-up runs, then five timed ones
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(ms) / 1e3

    stats = bal.latency(fn, torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7
    assert stats["median_ms"] == pytest.approx(3.0)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["max_ms"] == pytest.approx(5.0)
    # 10th and 90th percentiles interpolated between measured runs (1..5 ms): 1.4 and 4.6 ms.
    assert stats["p10_ms"] == pytest.approx(1.4) and stats["p90_ms"] == pytest.approx(4.6)


STEP_KIND = {
    "L1": "one position", "L2": "one position", "L3": "one position",
    "L4": "full 6-position rerun (bidirectional)",
    "L5": "incremental step after 5 cached positions", "B1": "incremental step after 5 cached positions",
    "L5F": "incremental step after 5 cached positions", "L5E": "incremental step after 5 cached positions",
    "E3": "incremental step after 5 cached positions", "E3E": "incremental step after 5 cached positions",
}


def test_latency_benchmark_writes_every_level(tmp_path):
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "benchmark_adapter_latency.py", "--hidden_dim", "16", "--repeats", "3", "--warmup", "1",
           "--seq_len", "6", "--device", "cpu", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert (report["hidden_dim"], report["seq_len"], report["repeats"], report["warmup"]) == (16, 6, 3, 1)
    assert report["device_type"] == "cpu" and report["dtype"] == "float32"
    assert [r["level"] for r in report["levels"]] == list(STEP_KIND)
    for row in report["levels"]:
        assert row["params"] == sum(p.numel() for p in create_adapter(row["level"], 16).parameters())
        assert row["decode_step"] == STEP_KIND[row["level"]]
        # The table shows the JSON's own figures, not other numbers.
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"| {row['level']} "))
        for key in ("sequence", "step"):
            assert f"{row[key]['median_ms']:.3f} ({row[key]['p10_ms']:.3f}-{row[key]['p90_ms']:.3f})" in line


def test_latency_benchmark_rejects_unknown_level():
    proc = subprocess.run([sys.executable, "benchmark_adapter_latency.py", "--levels", "L9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "valid: L1, L2" in proc.stderr


def test_latency_benchmark_times_the_static_path(tmp_path):
    """--static_cache times the causal levels' step on a preallocated cache, as the engine's static path
    drafts; the other levels keep their step; the path is recorded."""
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "benchmark_adapter_latency.py", "--hidden_dim", "16", "--repeats", "3", "--warmup", "1",
           "--seq_len", "6", "--device", "cpu", "--levels", "B1", "L5F", "L1", "--static_cache", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["step_path"] == "static"
    kinds = {r["level"]: r["decode_step"] for r in report["levels"]}
    assert kinds["B1"] == kinds["L5F"] == "eager step, preallocated cache, after 5 positions"
    assert kinds["L1"] == STEP_KIND["L1"]
