"""The specification's own "How to reproduce" commands (shared seeds 001 "Training" / "Evaluation", 002
"How to Extract" / "How to Reproduce") run as written on the toy world: only the paths are swapped (the
toy world's folders for ./data/..., the 7B models' for the toy checkpoints), epochs and samples are cut,
and `--quant 4bit` becomes `none` on a CPU. Each runs as a subprocess, like a user's shell, and is checked
for its exit status and for the files it promises. docs/PIPELINE.md ("The specification's commands") maps
each command to this project's; a change of default that breaks one fails here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_checkpoint import read_adapter_config
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable}
# The specification's training commands: (run folder, flags after --adapter_level ...).
TRAINING = {"L1": ["1"], "L2": ["2"], "L3": ["3"], "L4": ["4"], "L5": ["5"], "B1": ["5", "--vlm_only"],
            "L5F": ["6"]}


def run(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ...` (or `bash SCRIPT.sh ...`) from `cwd`, as a user types it."""
    cmd = ["bash", str(ROOT / argv[0]), *argv[1:]] if argv[0].endswith(".sh") else [
        sys.executable, str(ROOT / argv[0]), *argv[1:]]
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def spec(quick_world: Path, quick_hidden: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A working folder laid out as the specification's: ./data/chunked_{train,test}_1s_4bit hold the
    toy world's extracted states (their manifests record the toy target's folder) and no LM head file."""
    work = tmp_path_factory.mktemp("spec")
    data = work / "data"
    shutil.copytree(quick_hidden / "train", data / "chunked_train_1s_4bit")
    shutil.copytree(quick_hidden / "test", data / "chunked_test_1s_4bit")
    return {"work": work, "data": data, "models": quick_world / "models", "dataset": quick_world / "dataset"}


@pytest.fixture(scope="module")
def trained(spec: dict[str, Path]) -> dict[str, Path]:
    """002 "Train all adapters" (and 001's per-level commands), one epoch each: every level's best_model.pt."""
    out = {}
    for name, level in TRAINING.items():
        proc = run("train_hidden_adapter.py", "--train_data", "./data/chunked_train_1s_4bit",
                   "--val_data", "./data/chunked_test_1s_4bit", "--adapter_level", *level, "--num_epochs", "1",
                   "--batch_size", "64", "--output_dir", f"./tasks/{name}", "--device", "cpu", "--no_progress",
                   cwd=spec["work"])
        found = sorted((spec["work"] / "tasks" / name).glob("*/best_model.pt"))
        assert len(found) == 1, f"{name}: {proc.stdout[-2000:]}"
        out[name] = found[0]
        out[f"{name}_log"] = proc.stderr + proc.stdout
    return out


def test_training_commands_write_every_level(trained):
    for name in TRAINING:
        config, extra = read_adapter_config(trained[name])
        assert config.name == name, (name, config.name)
    b1, extra = read_adapter_config(trained["B1"])
    # B1 trains with the token input on: the embedding table came from the target model the extraction
    # recorded, found without --lm_head, and the run said where it came from
    assert b1.token_input and extra["drafting"]["token_input"]
    assert "read from" in trained["B1_log"] and "the target model that extracted" in trained["B1_log"]


def test_extraction_and_lm_head_commands(spec):
    """002 "How to Extract" (--quant 4bit needs a GPU: none here) and 001's LM head command."""
    work = spec["work"]
    run("extract_hidden_states.py", "--split", "train", "--chunked", "--quant", "none",
        "--dataset_dir", str(spec["dataset"]), "--egpt_model", str(spec["models"] / "eventgpt"),
        "--vl_model", str(spec["models"] / "video_llava"), "--output_dir", "./data/extracted_train",
        "--max_questions", "1", "--max_new_tokens", "6", "--device", "cpu", cwd=work)
    manifest = json.loads((work / "data" / "extracted_train" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and all((work / "data" / "extracted_train" / c["file"]).is_file()
                                               for c in manifest["chunks"])
    run("extract_vl_lm_head.py", "--vl_model", str(spec["models"] / "video_llava"),
        "--output", "./data/vl_lm_head.pt", "--device", "cpu", cwd=work)
    assert (work / "data" / "vl_lm_head.pt").is_file()


def test_evaluation_commands(spec, trained):
    """001 "Level 2" (measure_feature_acceptance per checkpoint), 002's run_all_eval.sh (L1-L2) and
    run_remaining_eval.sh (L3-L5, B1, L5F: LEVELS=... here), and run_two_phase_eval.sh."""
    work = spec["work"]
    head = work / "data" / "vl_lm_head.pt"
    if not head.is_file():
        run("extract_vl_lm_head.py", "--vl_model", str(spec["models"] / "video_llava"), "--output", str(head),
            "--device", "cpu", cwd=work)
    for name in ("L1", "B1"):
        run("measure_feature_acceptance.py", "--checkpoint", str(trained[name]),
            "--test_data", "./data/chunked_test_1s_4bit", "--lm_head", "./data/vl_lm_head.pt", "--device", "cpu",
            cwd=work)
        assert (trained[name].parent / "acceptance_teacher_forced" / "acceptance_metrics.json").is_file()
    env = {**ENV, "TEST_DATA": str(work / "data" / "chunked_test_1s_4bit"), "LM_HEAD": str(head),
           "OUT": str(work / "results" / "acceptance"), "DEVICE": "cpu"}
    for levels in ("L1 L2", "L3 L4 L5 B1 L5F"):  # the specification's run_all_eval.sh, run_remaining_eval.sh
        run("run_all_eval.sh", cwd=ROOT, env={**env, "TASKS": str(work / "tasks"), "LEVELS": levels})
    results = sorted(p.parent.name for p in (work / "results" / "acceptance").glob("*/acceptance_metrics.json"))
    assert {f"{name}_teacher_forced" for name in TRAINING} <= set(results)
    proc = run("run_two_phase_eval.sh", cwd=ROOT, env={**ENV, "ACCEPTANCE": str(work / "results" / "acceptance"),
                                                       "OUT": str(work / "results" / "two_phase"), "LABEL": "spec"})
    assert "left out: L5E, E3 (no acceptance result for E3, L5E" in proc.stdout  # the specification trains neither
    assert (work / "results" / "two_phase" / "two_phase_results_spec.json").is_file()


def test_live_benchmark_command_without_adapters(spec):
    """002 "Run true E2E wall-clock benchmark": no adapter named, so it runs what needs none and says so."""
    work = spec["work"]
    proc = run("benchmark_e2e_wallclock.py", "--dataset_dir", str(spec["dataset"]), "--max_samples", "2",
               "--max_new_tokens", "50", "--egpt_model", str(spec["models"] / "eventgpt"),
               "--vl_model", str(spec["models"] / "video_llava"), "--device", "cpu", "--repeats", "1",
               "--warmup", "1", "--output_dir", "./results/e2e", cwd=work)
    assert "left out: prefill (needs --prefill_adapter), decode (needs --decode_adapter)" in proc.stdout
    result = json.loads((work / "results" / "e2e" / "e2e_wallclock.json").read_text())
    assert {"target", "hf_generate"} <= set(result["configs"]) and "decode" not in json.dumps(
        sorted(result["configs"]))
    stages = result["configs"]["target"]["stage_ms_median_per_answer"]
    assert stages and all(v >= 0 for v in stages.values())
    named = subprocess.run([sys.executable, str(ROOT / "benchmark_e2e_wallclock.py"), "--dataset_dir",
                            str(spec["dataset"]), "--configs", "decode", "--dry_run"], cwd=work, env=ENV,
                           capture_output=True, text=True)
    assert named.returncode == 2 and "need --decode_adapter" in named.stderr and "Traceback" not in named.stderr
