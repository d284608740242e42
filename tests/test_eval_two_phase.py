"""eval_two_phase.py: the reference's table from its own inputs, measured inputs from acceptance files
(per pairing, fallback noted, answer length), the two cost models side by side, and the shell
scripts run end to end on a tiny tasks folder."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import eval_two_phase as etp
from common import UserError, atomic_write_json
from cost_model import estimate_two_phase, load_timing_profile
from tests.test_cost_model import REF_4090, SPEC_TABLE, needs_shared, reference_constants

OWN_PROFILE = reference_constants()


def write_profile(tmp_path):
    path = tmp_path / "profile.json"
    atomic_write_json(OWN_PROFILE.to_json(), path)
    return path


def write_acceptance(root, level, pairs, *, free=None, accept=None, length=10.0, gamma_prefill=7, rollout=None):
    result = {"format": "xmodal_sd.acceptance_metrics", "level": level, "pairs": pairs, "gamma_prefill": gamma_prefill,
              "counts": {"mean_target_answer_tokens": length}, "prefill_free_by_window": free,
              "accept_len_by_gamma": accept}
    if rollout is not None:  # measure_feature_acceptance's roll-out on the live schedule, gamma 5
        result["drafting"] = {"rollout": {"gamma": 5, "live_accepted_per_iteration": rollout}}
    atomic_write_json(result, root / f"{level}_{pairs}" / "acceptance_metrics.json")


@needs_shared
def test_reference_inputs_reproduce_the_spec_table(tmp_path):
    result = etp.main(etp.parse_args(["--reference_inputs", "--reference_cost_model", "--label", "ref",
                                      "--timings", str(REF_4090), "--output_dir", str(tmp_path)]))
    rows = {r["config"]: r for r in result["profiles"][0]["configs"]}
    for pre, _, dec, _, iters, speedup in SPEC_TABLE:
        row = rows[etp.config_name(pre, dec)]
        assert row["speedup"] == row["reference"]["speedup"] == pytest.approx(speedup, abs=0.0105)
        assert row["reference"]["iterations"] == pytest.approx(iters, abs=0.1)
        assert row["honest"]["speedup"] < row["reference"]["speedup"]  # the drafter's own steps cost time
    assert result["settings"]["num_tokens"] == 50
    table = (tmp_path / "two_phase_results_ref.md").read_text()
    assert "speed-up reference" in table and "speed-up honest" in table
    on_disk = json.loads((tmp_path / "two_phase_results_ref.json").read_text())
    assert on_disk["settings"]["headline"] == "reference"


def test_measured_inputs_per_pairing_and_both_models(tmp_path):
    acc = tmp_path / "acc"
    free_curve = [0.5, 0.9, 1.2, 1.4, 1.5, 1.5, 1.5, 1.5]
    write_acceptance(acc, "L1", "free", free=free_curve, length=12.0)
    write_acceptance(acc, "L1", "teacher_forced", free=[0.0] * 8, length=12.0)  # must not be used for prefill
    write_acceptance(acc, "L5F", "teacher_forced", accept=[0.6, 0.9, 1.1, 1.2, 1.25, 1.3], length=12.0)
    write_acceptance(acc, "B1", "free", accept=[0.4, 0.6, 0.7, 0.75, 0.8], length=12.0)  # only free: fallback
    profile = write_profile(tmp_path)
    result = etp.main(etp.parse_args(["--acceptance_dir", str(acc), "--timings", str(profile), "--label", "t",
                                      "--configs", "L1+L5F,B1,L1", "--output_dir", str(tmp_path / "out"),
                                      "--decode_acceptance", "one_step"]))
    assert result["settings"]["num_tokens"] == 12.0 and result["settings"]["gamma_prefill"].startswith("auto")
    rows = {r["config"]: r for r in result["profiles"][0]["configs"]}
    l1 = rows["L1+L5F"]
    # 8 prefill drafts fit in 310 ms (130 + 1.5 + 7 x 25); gamma_decode 5
    assert l1["gamma_prefill"] == 8 and l1["free_tokens"] == 1.5 and l1["accept_len"] == 1.25
    want = estimate_two_phase(OWN_PROFILE, num_tokens=12, free_tokens=1.5, accept_len=1.25, gamma_decode=5,
                              gamma_prefill=8, prefill_adapter="L1", decode_adapter="L5F")
    assert l1["honest"] == want and l1["speedup"] == want["speedup"]
    assert l1["reference"]["cost_model"] == "reference"
    assert rows["B1"]["accept_len"] == 0.8
    assert [n for n in result["notes"] if "B1: no teacher_forced result" in n] != []
    assert len(result["notes"]) == 1  # noted once
    assert rows["L1"]["decode_adapter"] is None and rows["L1"]["honest"]["decode_ms"] > 0
    # best gamma under the honest model is searched over the measured curve
    best = rows["B1"]["honest_best_gamma_decode"]
    assert 1 <= best["gamma_decode"] <= 5 and best["speedup"] >= rows["B1"]["honest"]["speedup"]

    conc = etp.main(etp.parse_args(["--acceptance_dir", str(acc), "--timings", str(profile), "--label", "c",
                                    "--configs", "L5F", "--concurrent_drafter", "--num_tokens", "50",
                                    "--gamma_decode", "3", "--output_dir", str(tmp_path / "out")]))
    row = conc["profiles"][0]["configs"][0]
    assert row["accept_len"] == 1.1 and row["honest"]["egpt_ms_per_iter"] == 0
    fixed = etp.main(etp.parse_args(["--acceptance_dir", str(acc), "--timings", str(profile), "--label", "f",
                                     "--configs", "L1", "--gamma_prefill", "2", "--output_dir", str(tmp_path / "out")]))
    assert fixed["profiles"][0]["configs"][0]["free_tokens"] == 0.9
    assert conc["settings"]["num_tokens"] == 50
    assert "concurrently" in (tmp_path / "out" / "two_phase_results_c.md").read_text()


def test_decode_adapters_are_scored_by_their_rollout_unless_asked(tmp_path):
    acc = tmp_path / "acc"
    write_acceptance(acc, "B1", "teacher_forced", accept=[0.6, 0.9, 1.1, 1.2, 1.25], rollout=0.95, length=12.0)
    write_acceptance(acc, "L5E", "teacher_forced", accept=[0.5, 0.8, 1.0, 1.1, 1.15], length=12.0)  # no roll-out
    profile = write_profile(tmp_path)
    base = ["--acceptance_dir", str(acc), "--timings", str(profile), "--configs", "B1,L5E",
            "--output_dir", str(tmp_path / "out")]
    roll = etp.main(etp.parse_args([*base, "--label", "r"]))
    rows = {r["config"]: r for r in roll["profiles"][0]["configs"]}
    assert rows["B1"]["accept_len"] == 0.95 and rows["L5E"]["accept_len"] == 1.15
    assert roll["notes"] == [n for n in roll["notes"] if "L5E: no roll-out figure" in n] and len(roll["notes"]) == 1
    one = etp.main(etp.parse_args([*base, "--label", "o", "--decode_acceptance", "one_step"]))
    assert one["profiles"][0]["configs"][0]["accept_len"] == 1.25 and one["settings"]["decode_acceptance"] == "one_step"


def test_missing_inputs_and_bad_configs(tmp_path):
    profile = write_profile(tmp_path)
    with pytest.raises(UserError, match="no acceptance result for B1, E3, L1, L2, L3, L4, L5, L5E, L5F in"):
        etp.main(etp.parse_args(["--acceptance_dir", str(tmp_path), "--timings", str(profile),
                                 "--output_dir", str(tmp_path / "o")]))
    assert etp.parse_config("L3+none") == ("L3", None)
    assert etp.parse_config("b1") == (None, "B1")
    with pytest.raises(ValueError, match="bad configuration"):
        etp.parse_config("L5F+L1+L2")
    with pytest.raises(SystemExit):
        etp.parse_args(["--reference_inputs", "--timings", str(profile), "--configs", "L7"])


# ----------------------------------------------------------------------------- shell scripts, end to end


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """Hand-made test data and a tasks folder: every level, both pairings, an older and a newer run
    of L1_free (the newer by its recorded start must be chosen, whatever the folders are called), and a
    folder that is not a run (ignored, counted). Level and pairing are read from the checkpoints, so the
    folder names say nothing."""
    from adapter_checkpoint import save_adapter
    from hidden_adapter import create_adapter
    from tests.test_measure_feature_acceptance import MODELS, D, write_test_data

    root = tmp_path_factory.mktemp("tiny_eval")
    write_test_data(root / "hidden" / "test")
    tasks = root / "tasks"
    for i, level in enumerate(("L1", "L2", "L3", "L4", "L5", "B1", "L5F", "L5E")):
        for pairs in ("free", "teacher_forced"):
            adapter = create_adapter(level, D, max_seq_len=16)
            save_adapter(tasks / f"run_{i}_{pairs}" / "best_model.pt", adapter, pairs=pairs,
                         data={"models": MODELS}, started="2026-01-01T12:00:00")
    save_adapter(tasks / "an_earlier_name" / "best_model.pt", create_adapter("L1", D), pairs="free",
                 data={"models": MODELS}, started="2026-01-02T09:00:00")
    save_adapter(tasks / "interrupted" / "best_model.pt", create_adapter("L1", D), pairs="free",
                 data={"models": MODELS}, started="2026-01-03T09:00:00")  # newest, but not finished: not used
    for run in tasks.glob("*/best_model.pt"):
        finished = run.parent.name != "interrupted"
        (run.parent / "history.json").write_text(json.dumps({"finished": finished, "history": []}))
    (tasks / "notes").mkdir()
    return root


@pytest.mark.slow
def test_shell_scripts_on_a_tiny_tasks_folder(tiny_tasks, tmp_path):
    from tests.conftest import ROOT

    profile = write_profile(tmp_path)
    env = {**os.environ, "TASKS": str(tiny_tasks / "tasks"), "TEST_DATA": str(tiny_tasks / "hidden" / "test"),
           "LM_HEAD": str(tiny_tasks / "hidden" / "lm_head.pt"), "OUT": str(tmp_path / "acceptance"),
           "DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "run_all_eval.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted(p.parent.name for p in (tmp_path / "acceptance").glob("*/acceptance_metrics.json"))
    assert len(runs) == 18 and "L5E_teacher_forced" in runs and "L5_free_target_input" in runs
    l1 = json.loads((tmp_path / "acceptance" / "L1_free" / "acceptance_metrics.json").read_text())
    assert "an_earlier_name" in l1["checkpoint"]  # the newest run of its level and pairing
    assert "1 folder(s) without a readable best_model.pt passed over" in proc.stderr
    again = subprocess.run(["bash", str(ROOT / "run_all_eval.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count(": up to date (") == 16

    env2 = {**os.environ, "ACCEPTANCE": str(tmp_path / "acceptance"), "TIMINGS": f"{profile} {profile}",
            "OUT": str(tmp_path / "two_phase"), "LABEL": "tiny", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "run_two_phase_eval.sh")], env=env2, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for label in ("tiny", "tiny_concurrent", "reference_inputs"):
        assert (tmp_path / "two_phase" / f"two_phase_results_{label}.json").is_file()
    result = json.loads((tmp_path / "two_phase" / "two_phase_results_tiny.json").read_text())
    assert len(result["profiles"]) == 2 and len(result["profiles"][0]["configs"]) == 9  # the six + L5E, L5, L1+B1
    roll = json.loads((tmp_path / "acceptance" / "B1_teacher_forced" / "acceptance_metrics.json").read_text())
    b1 = next(c for c in result["profiles"][0]["configs"] if c["config"] == "B1")
    assert b1["accept_len"] == roll["drafting"]["rollout"]["live_accepted_per_iteration"]  # the roll-out figure

    some = subprocess.run(["bash", str(ROOT / "run_all_eval.sh")],
                          env={**env, "LEVELS": "L3 b1", "OUT": str(tmp_path / "some")}, capture_output=True, text=True)
    assert some.returncode == 0, some.stdout[-2000:] + some.stderr[-2000:]
    assert sorted(p.parent.name for p in (tmp_path / "some").glob("*/acceptance_metrics.json")) == [
        "B1_free", "B1_teacher_forced", "L3_free", "L3_teacher_forced"]

    missing = subprocess.run(["bash", str(ROOT / "run_all_eval.sh")], env={**env, "LM_HEAD": "/nonexistent.pt"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "LM head not found: /nonexistent.pt" in missing.stderr


@needs_shared
def test_shared_profiles_load_for_the_scripts():
    assert load_timing_profile(REF_4090).vl_decode_ms == 25
