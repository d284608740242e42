"""The whole pipeline (`run_pipeline.sh`) on a reduced toy world: every stage runs, every artefact
exists, parses and holds values in range, and a rerun skips the finished work."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from adapter_checkpoint import load_adapter
from hidden_adapter import ADAPTER_NAMES, NEXT_POSITION_LEVELS
from tests.conftest import ROOT

# the levels run_pipeline.sh trains by default (its LEVELS line)
LEVELS = tuple(re.search(r'^LEVELS=\$\{LEVELS:-"([^"]+)"\}', (ROOT / "run_pipeline.sh").read_text(), re.M)
               .group(1).split())
assert set(LEVELS) <= set(ADAPTER_NAMES), LEVELS

PNG = b"\x89PNG\r\n\x1a\n"


def run_pipeline(tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA": str(tmp / "data"), "TASKS": str(tmp / "tasks"), "RESULTS": str(tmp / "results"),
           "TOY_ARGS": "--quick --threads 1", "MAX_QUESTIONS": "2", "MAX_NEW_TOKENS": "8", "CHUNK_SIZE": "4",
           "EXTRACT_BATCH": "4", "BENCH_ARGS": "--max_clips 2 --repeats 1 --warmup 0",
           "TRAIN_ARGS": "--num_epochs 1 --batch_size 16", "DECODE_TRAIN_ARGS": "--num_epochs 1 --batch_size 16",
           "E2E_SAMPLES": "2",
           "E2E_ARGS": "--warmup 0 --repeats 1 --synthetic_acceptance 0.5,1.0", "CUDA_VISIBLE_DEVICES": "",
           "DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("pipeline")
    done = run_pipeline(tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, done


def finite_in(x: float, lo: float, hi: float) -> bool:
    return x is not None and math.isfinite(x) and lo <= x <= hi


def pairings(level: str) -> tuple[str, ...]:
    """What the pipeline trains: decode (next-position) levels on teacher-forced pairs only."""
    return ("teacher_forced",) if level in NEXT_POSITION_LEVELS else ("free", "teacher_forced")


@pytest.mark.slow
def test_every_adapter_is_trained_and_evaluated(pipeline):
    tmp, _ = pipeline
    for level in LEVELS:
        for pairs in pairings(level):
            runs = sorted((tmp / "tasks").glob(f"{level}_{pairs}_*"))
            assert len(runs) == 1, (level, pairs, runs)
            adapter, extra = load_adapter(runs[0] / "best_model.pt")
            assert adapter.config.name == level and extra["pairs"] == pairs
            assert json.loads((runs[0] / "history.json").read_text())["finished"] is True
            acc_file = tmp / "results" / "acceptance" / f"{level}_{pairs}" / "acceptance_metrics.json"
            acc = json.loads(acc_file.read_text())
            m = acc["metrics"]
            assert acc["level"] == level and acc["counts"]["samples"] > 0 and m["token_positions"] > 0
            for key in ("token_top1", "token_top5", "cos_mean", "accept@0.90"):
                assert finite_in(m[key], -1.0 if key == "cos_mean" else 0.0, 1.0), (level, pairs, key, m[key])
            assert m["token_top1"] <= m["token_top5"]
            if adapter.predicts == "next":
                assert finite_in(m["accept_len"], 0.0, acc["gamma_decode"])
                roll = acc["drafting"]["rollout"]
                assert finite_in(roll["live_accepted_per_iteration"], 0.0, acc["gamma_decode"])
                assert adapter.config.token_input and extra["drafting"]["rollout_steps"] > 1
                assert sum(extra["draft_calibration"]["count"]) > 0
            else:
                assert finite_in(m["prefill_free"], 0.0, acc["gamma_prefill"])
            png = tmp / "results" / "acceptance" / f"{level}_{pairs}" / "per_position.png"
            assert png.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_live_benchmark_two_phase_and_report(pipeline):
    tmp, _ = pipeline
    res = tmp / "results"
    live = json.loads((res / "e2e" / "e2e_wallclock.json").read_text())
    assert live["lossless_checked"] is True and live["num_samples"] == 2
    assert {"target", "synthetic_p1"} <= set(live["configs"])
    assert any(k.startswith("two_phase[") for k in live["configs"])
    # every decode drafter under both draft-length rules, with the H200 7B profile's modelled speed-up beside
    for level in ("B1", "L5E", "L5F", "L5", "E3"):
        for name in (f"decode[{level}]", f"decode[{level},expected]"):
            assert finite_in(live["configs"][name]["modelled_speedup_reference"], 0.01, 100.0), name
    for name, c in live["configs"].items():
        assert finite_in(c["speedup"]["median"], 0.01, 100.0), name
    assert live["configs"]["synthetic_p1"]["accepted_per_iteration"] > live["configs"]["synthetic_p0.5"][
        "accepted_per_iteration"]
    assert (res / "e2e" / "e2e_wallclock.png").read_bytes()[:8] == PNG
    deep = json.loads((res / "e2e_deep" / "e2e_wallclock.json").read_text())  # B1 and E3 at DEEP_GAMMA
    assert deep["gamma_decode"] == 8 and deep["lossless_checked"] is True
    assert {c["drafting"]["decode"]["level"] for c in deep["configs"].values()
            if c["drafting"]["kind"] == "decode"} == {"B1", "E3"}
    assert not [name for name in deep["configs"] if "tree" in name]  # the deep run compares the heads' chains
    for label in ("toy", "toy_concurrent", "reference_inputs"):
        two = json.loads((res / "two_phase" / f"two_phase_results_{label}.json").read_text())
        assert len(two["profiles"]) == 4  # the three shipped profiles + the one measured live
        for profile in two["profiles"]:
            assert len(profile["configs"]) == (6 if label == "reference_inputs" else 10)  # + E3
            for cfg in profile["configs"]:
                assert finite_in(cfg["honest"]["speedup"], 0.01, 100.0)
                assert finite_in(cfg["reference"]["speedup"], 0.01, 100.0)
    report = (res / "RESULTS.md").read_text()
    for heading in ("## Data", "## Adapters: offline acceptance", "## Free pairs vs teacher-forced pairs",
                    "## Training", "## Two-phase estimates", "## Live speculative decoding (measured)",
                    "## Decode drafters", "## Offline vs live acceptance", "Do the events add acceptance?",
                    "## Draft depth: the decode heads at two windows", "Does the EAGLE-3 head add acceptance?"):
        assert heading in report
    assert "nan" not in report.lower().split() and "None" not in report
    for level in LEVELS:
        assert f"| {level} " in report
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (res / link).is_file(), link


@pytest.mark.slow
def test_rerun_skips_finished_work(pipeline):
    tmp, _ = pipeline
    again = run_pipeline(tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    trained = sum(len(pairings(level)) for level in LEVELS)
    assert again.stdout.count("kept ") >= trained + 3  # every trained run, two benchmarks, the live benchmark
    assert "up to date" in again.stdout
    for level in LEVELS:
        for pairs in pairings(level):
            assert len(list((tmp / "tasks").glob(f"{level}_{pairs}_*"))) == 1


@pytest.mark.parametrize("script", ["run_pipeline.sh", "run_all_eval.sh", "run_two_phase_eval.sh", "run_tests.sh",
                                    "setup.sh", "timings/gpu_check.sh"])
def test_shell_scripts_answer_help_without_working(script, tmp_path):
    """--help prints the header and every setting with its current value, exits 0, and starts nothing
    (PY points at a missing python, so any stage that ran would fail)."""
    env = {**os.environ, "PY": str(tmp_path / "no_python"), "PYTHON": str(tmp_path / "no_python"),
           "FORCE": "1", "DATA": str(tmp_path / "data")}
    before = sorted(p.name for p in ROOT.iterdir())
    proc = subprocess.run(["bash", str(ROOT / script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "settings (environment variables)" in proc.stdout and "setup:" not in proc.stdout
    assert sorted(p.name for p in ROOT.iterdir()) == before and not (tmp_path / "data").exists()
    text = (ROOT / script).read_text()
    for line in text.splitlines():
        if "=${" in line and line.split("=", 1)[0].isupper() and line.startswith(line.split("=", 1)[0] + "=${"):
            assert line.split("=", 1)[0] in proc.stdout, f"{script}: {line.split('=', 1)[0]} not in --help"
    if script == "run_pipeline.sh":
        assert "FORCE              = 1" in proc.stdout and "retrain" in proc.stdout
