"""The latency benchmark runs end to end on a tiny width and writes a complete JSON report."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_latency_benchmark_writes_every_level(tmp_path):
    out = tmp_path / "lat.json"
    cmd = [sys.executable, "benchmark_adapter_latency.py", "--hidden_dim", "16", "--repeats", "3", "--warmup", "1",
           "--seq_len", "6", "--device", "cpu", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["level"] for r in report["levels"]] == ["L1", "L2", "L3", "L4", "L5", "B1", "L5F"]
    for row in report["levels"]:
        for key in ("sequence", "step"):
            m = row[key]
            assert 0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"]
    assert report["levels"][4]["decode_step"].startswith("incremental step after 5 cached")
    assert "| L5F" in proc.stdout


def test_latency_benchmark_rejects_unknown_level():
    proc = subprocess.run([sys.executable, "benchmark_adapter_latency.py", "--levels", "L9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "valid: L1, L2" in proc.stderr
