"""The runs of a tasks folder are read from their checkpoints, never from folder names."""

from __future__ import annotations

import os
import subprocess
import sys

import training_runs
from adapter_checkpoint import save_adapter
from hidden_adapter import create_adapter
from tests.conftest import ROOT


def write_run(folder, level: str, pairs: str, started: str | None = None) -> None:
    extra = {"pairs": pairs} | ({"started": started} if started else {})
    save_adapter(folder / "best_model.pt", create_adapter(level, 16, max_seq_len=8), **extra)


def test_newest_run_per_level_and_pairing_from_the_checkpoints(tmp_path):
    write_run(tmp_path / "B1_free_20990101_000000", "L3", "teacher_forced", "2026-01-01T00:00:00")  # name lies
    write_run(tmp_path / "zzz", "L3", "teacher_forced", "2025-06-01T00:00:00")  # sorts last, started first
    write_run(tmp_path / "b", "B1", "teacher_forced", "2026-02-01T00:00:00")
    write_run(tmp_path / "old_format", "L1", "free")  # no recorded start: its file time counts
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "best_model.pt").write_bytes(b"not a checkpoint")
    runs, ignored = training_runs.newest_runs(tmp_path)
    assert sorted(runs) == [("B1", "teacher_forced"), ("L1", "free"), ("L3", "teacher_forced")]
    assert runs[("L3", "teacher_forced")].folder.name == "B1_free_20990101_000000"
    assert runs[("B1", "teacher_forced")].config.rolls_out
    assert ignored == 2
    only, _ = training_runs.newest_runs(tmp_path, levels=["3", "l1"])
    assert sorted(only) == [("L1", "free"), ("L3", "teacher_forced")]


def test_the_listing_command_the_shell_runner_reads(tmp_path):
    write_run(tmp_path / "one", "L5", "teacher_forced", "2026-01-01T00:00:00")
    write_run(tmp_path / "two", "L2", "free", "2026-01-01T00:00:00")
    proc = subprocess.run([sys.executable, str(ROOT / "training_runs.py"), str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert lines == [["L2", "free", "0", str(tmp_path / "two")], ["L5", "teacher_forced", "1", str(tmp_path / "one")]]
    bad = subprocess.run([sys.executable, str(ROOT / "training_runs.py"), str(tmp_path), "--levels", "L9"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown adapter level" in bad.stderr
