"""The wall-clock benchmark: flags, paired speed-up arithmetic, and runs on the quick toy world that
check what was written (every configuration, lossless check, timing profile the cost model reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import benchmark_e2e_wallclock as bench
import speculative_decoding as sd
from adapter_checkpoint import save_adapter
from common import UserError
from hidden_adapter import create_adapter
from vlm_runners import video_llava_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_flags_are_validated() -> None:
    args = bench.parse_args(["--dataset_dir", "d", "--configs", "synthetic"])
    assert args.configs == ["target", "synthetic"]  # the baseline is always measured
    assert args.synthetic_acceptance == [0.5, 0.7, 0.8, 0.9, 1.0]
    assert args.draft_stop == ["fixed"]
    assert bench.parse_args(["--dataset_dir", "d", "--draft_confidence", "0.3"]).draft_stop == ["confidence"]
    for bad in (["--configs", "fast"], ["--synthetic_acceptance", "1.5"], ["--gamma_decode", "0"],
                ["--random_shape", "tiny", "--quant", "4bit"], ["--draft_confidence", "1.5"],
                ["--draft_stop", "fixed,sometimes"], ["--draft_stop", "confidence"],
                ["--draft_stop", "expected", "--random_adapters"], ["--synthetic_cost_ms", "-1"],
                ["--synthetic_cost_ms", "nan"], ["--synthetic_cost_ms", "inf"],
                ["--synthetic_cost_ms", "L4"], ["--synthetic_cost_ms", "fast"], ["--prompt_lookup_tokens", "0"],
                ["--prompt_lookup_ngram", "2,x"], ["--tie_margin", "1.5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--dataset_dir", "d", *bad])
    assert bench.parse_args(["--dataset_dir", "d", "--synthetic_cost_ms", "1.3"]).synthetic_cost_ms == 1.3
    assert bench.parse_args(["--dataset_dir", "d", "--synthetic_cost_ms", "b1"]).synthetic_cost_ms == "B1"
    args = bench.parse_args(["--dataset_dir", "d", "--configs", "prompt_lookup", "--prompt_lookup_tokens", "3,10"])
    assert bench.lookup_configs(args) == {"prompt_lookup[K3,N2]": (3, 2), "prompt_lookup[K3,N3]": (3, 3),
                                          "prompt_lookup[K10,N2]": (10, 2), "prompt_lookup[K10,N3]": (10, 3)}
    assert bench.lookup_configs(bench.parse_args(["--dataset_dir", "d", "--configs", "synthetic"])) == {}


def test_tie_margin_against_the_target_alone() -> None:
    """A configuration may exceed the target-alone run's ties by max(2, margin x its outputs); the target
    alone is the baseline and never fails."""
    tie = {"position": 3, "tokens": [1, 2], "margin": 0.0, "tolerance": 0.1, "paths": 5}
    checks = {"target": {"outputs": 100, "ties": [tie]}, "ok": {"outputs": 100, "ties": [tie] * 3},
              "over": {"outputs": 100, "ties": [tie] * 4}, "many": {"outputs": 1000, "ties": [tie] * 11}}
    v = bench.tie_verdicts(checks, margin=0.01)
    assert [v[n]["passed"] for n in checks] == [True, True, False, True]
    assert v["over"]["max_ties"] == 3 and v["many"]["max_ties"] == 11 and v["ok"]["target_ties"] == 1
    assert v["over"]["numeric_tie_count"] == 4 and v["over"]["outputs_checked"] == 100
    assert bench.tie_cell(v["over"]) == "4 (1) / 3 FAILED" and bench.tie_cell(v["ok"]) == "3 (1) / 3"


def test_adapter_configs_without_adapters_fail_clearly() -> None:
    args = bench.parse_args(["--dataset_dir", "d", "--configs", "two_phase"])
    runner = SimpleNamespace(hidden_size=64)
    with pytest.raises(UserError, match="--decode_adapter"):
        bench.load_adapters(args, runner, runner)
    args = bench.parse_args(["--dataset_dir", "d", "--configs", "prefill", "--random_adapters",
                             "--prefill_adapter", "B1"])
    with pytest.raises(UserError, match="per-position"):
        bench.load_adapters(args, SimpleNamespace(hidden_size=64, device="cpu", dtype=torch.float32), runner)


def _rec(ms: float, vision: float, accepted: int = 0, iterations: int = 4) -> dict:
    return {"ms": ms, "vision_ms": vision, "tokens": 8, "phase1": {"drafted": 2, "first_accepted": 1},
            "prefill_drafted": 2, "prefill_accepted": 1, "iterations": iterations, "drafted": 2 * iterations,
            "accepted": accepted, "per_position_tries": {0: iterations, 1: iterations},
            "per_position_hits": {0: accepted}, "stage_ms": {"verify": 1.0}, "foreign_tokens": 0}


def test_speedup_is_paired_per_repeat() -> None:
    runs = {"target": [[_rec(100, 20), _rec(100, 20)], [_rec(200, 20), _rec(200, 20)]],
            "fast": [[_rec(50, 20, 2), _rec(50, 20, 2)], [_rec(50, 20, 2), _rec(50, 20, 2)]]}
    out = bench.aggregate(runs, gamma=2)
    assert out["fast"]["speedup"] == {"median": 3.0, "min": 2.0, "max": 4.0}  # 200/100 and 400/200
    assert out["fast"]["speedup_llm_only"]["min"] == pytest.approx(160 / 60)
    assert out["fast"]["accepted_per_iteration"] == 0.5
    assert out["fast"]["tokens_per_verify"] == 1.5
    assert out["fast"]["per_position_acceptance"] == {0: 0.5, 1: 0.0}
    assert out["target"]["speedup"]["median"] == 1.0


# A hand-made draft calibration (acceptance rising with confidence), as training stores it.
CALIBRATION = {"edges": [i / 20 for i in range(21)], "count": [10] * 20, "rate": [i / 20 for i in range(20)],
               "mean_confidence": [i / 20 + 0.025 for i in range(20)], "accept": [i / 20 for i in range(20)]}


@pytest.fixture(scope="module")
def checkpoints(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Untrained L1 (prefill), L5F, and token-input B1 and L5E (decode), each with a draft calibration."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(quick_world / "models" / "video_llava").text_config.vocab_size
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    paths = []
    for level, kw in (("L1", {}), ("L5F", {}), ("B1", {"token_input": True, "vocab_size": vocab}),
                      ("L5E", {"token_input": True, "vocab_size": vocab})):
        path = folder / f"{level}.pt"
        save_adapter(path, create_adapter(level, 64, dropout=0.0, **kw), draft_calibration=CALIBRATION)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_cli_runs_every_config_on_quick_world(quick_world: Path, checkpoints: list[Path],
                                              tmp_path: Path) -> None:
    from cost_model import load_timing_profile

    out = tmp_path / "e2e"
    models = quick_world / "models"
    cmd = [sys.executable, str(ROOT / "benchmark_e2e_wallclock.py"), "--dataset_dir", str(quick_world / "dataset"),
           "--egpt_model", str(models / "eventgpt"), "--vl_model", str(models / "video_llava"),
           "--prefill_adapter", str(checkpoints[0]), "--decode_adapter", *map(str, checkpoints[1:]),
           "--max_samples", "2", "--max_new_tokens", "6", "--repeats", "2", "--warmup", "1",
           "--synthetic_acceptance", "0,1", "--gamma_decode", "3", "--draft_stop", "fixed,expected", "--device", "cpu",
           "--prompt_lookup_tokens", "3,5", "--prompt_lookup_ngram", "2", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "e2e_wallclock.json").read_text())
    decode = [f"{lv}{stop}" for lv in ("L5F", "B1", "L5E") for stop in ("", ",expected")]
    lookups = {"prompt_lookup[K3,N2]", "prompt_lookup[K5,N2]"}
    assert set(result["configs"]) == {"target", "hf_generate", "prefill[L1]", *(f"decode[{d}]" for d in decode),
                                      *(f"two_phase[L1+{d}]" for d in decode), "synthetic_p0", "synthetic_p1",
                                      *lookups, "decode[B1,tree]", "decode[L5E,tree]"}
    assert result["lossless_checked"] and result["draft_stop"] == ["fixed", "expected"]
    # 21 configs x (2 samples x 2 repeats + 1 warm-up), then ours and transformers' on 2 x 2 + 1 text prompts
    assert result["lossless_outputs_checked"] == 21 * (2 * 2 + 1) + 2 * (2 * 2 + 1)
    assert result["lossless_passed"] and result["lossless_failures"] == [] and result["numeric_tie_count"] == 0
    assert result["tie_margin"] == {"fraction": 0.01, "minimum": 2}
    for name, res in result["configs"].items():  # every configuration's own count, warm-up included
        assert res["lossless"]["outputs_checked"] == 5 and res["lossless"]["passed"], name
    assert result["assisted"]["lossless"]["outputs_checked"] == 10
    for name in lookups:
        res = result["configs"][name]
        assert res["drafting"]["kind"] == "prompt_lookup" and res["tokens_per_verify"] >= 1
        assert res["speedup_vs_hf_generate"]["median"] > 0 and res["modelled_speedup"] is None
        assert result["runs"][name][0][0]["forwards"] >= 1
    assert result["decode_modes"] == {f"decode[{d}]": {"L5F": "fused+L5F", "B1": "rollout+B1",
                                                        "L5E": "rollout+L5E"}[d.split(",")[0]] for d in decode} | {
        f"decode[{lv},tree]": f"rollout+{lv}+tree(d3,k4,n15)" for lv in ("B1", "L5E")}  # the roll-out heads only
    tree = result["configs"]["decode[B1,tree]"]
    assert tree["drafting"]["tree"] == {"depth": 3, "topk": 4, "frontier": 4, "budget": 15, "auto": False}
    assert 0 < tree["nodes_per_verify"] <= 15 and len(tree["per_position_acceptance"]) <= 3
    assert tree["modelled_speedup_reference"] > 0 and "Draft trees" in (out / "e2e_wallclock.md").read_text()
    assert result["adapters"] == {"prefill": ["L1"], "decode": ["L5F", "B1", "L5E"]}
    # the expected-gain stop drafts fewer than gamma where this untrained head is unsure; fixed always gamma
    b1, b1_gain = result["configs"]["decode[B1]"], result["configs"]["decode[B1,expected]"]
    assert b1["drafted_per_iteration"] >= b1_gain["drafted_per_iteration"]
    assert b1_gain["modelled_speedup_reference"] > 0  # also modelled under the shipped H200 7B profile
    assert result["reference_profile"].endswith("h200_fp16_eager_7b.json")
    for name, res in result["configs"].items():
        assert res["speedup"]["min"] > 0 and res["tokens_per_s"] > 0, name
        assert len(result["runs"][name]) == 2 and len(result["runs"][name][0]) == 2
    assert result["configs"]["synthetic_p0"]["accepted_per_iteration"] == 0
    assert result["configs"]["synthetic_p1"]["accepted_per_iteration"] > 1
    assert result["configs"]["two_phase[L1+L5F]"]["modelled_speedup"] > 0  # the model beside the measurement
    phase1 = result["runs"]["prefill[L1]"][0][0]["phase1"]
    assert phase1["drafter_start_ms"] < phase1["target_end_ms"] and "overlap_ms" in phase1
    assert result["assisted"]["ours_tokens_per_s"] > 0 and result["assisted"]["theirs_tokens_per_s"] > 0
    profile = load_timing_profile(out / "timing_profile.json")
    assert profile.vl_decode_ms > 0 and set(profile.adapter_step_ms) >= {"L1", "B1", "L5F", "L5E"}
    assert (out / "e2e_wallclock.png").stat().st_size > 0
    report = (out / "e2e_wallclock.md").read_text()
    assert "speed-up" in report and "Prompt lookup decoding" in report and "ties" in report


def test_a_lossless_mismatch_fails_the_run(quick_world: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    right_reference = sd.greedy_reference

    def wrong_reference(target, inputs, max_new_tokens):
        return [t + 1 for t in right_reference(target, inputs, max_new_tokens)]

    monkeypatch.setattr(sd, "greedy_reference", wrong_reference)
    models = quick_world / "models"
    args = bench.parse_args(["--dataset_dir", str(quick_world / "dataset"), "--egpt_model", str(models / "eventgpt"),
                             "--vl_model", str(models / "video_llava"), "--configs", "target", "--max_samples", "1",
                             "--max_new_tokens", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                             "--output_dir", str(tmp_path)])
    assert bench.main(args) == 1
    assert not (tmp_path / "e2e_wallclock.json").exists()


def test_static_cache_run_records_its_path_and_the_generate_baseline(quick_world: Path, tmp_path: Path) -> None:
    """--static_cache on the quick world: lossless (no ties in fp32), the path in the result and in the
    profile's source, and each configuration's speed against transformers' generate on the same samples."""
    models = quick_world / "models"
    args = bench.parse_args(["--dataset_dir", str(quick_world / "dataset"), "--egpt_model", str(models / "eventgpt"),
                             "--vl_model", str(models / "video_llava"), "--configs", "target,hf_generate,synthetic",
                             "--synthetic_acceptance", "1", "--gamma_decode", "3", "--max_samples", "2",
                             "--max_new_tokens", "6", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                             "--static_cache", "--max_cache_len", "1024", "--reference_profile", "none",
                             "--synthetic_cost_ms", "B1", "--synthetic_tree_width", "2", "--verify_widths", "32",
                             "--output_dir", str(tmp_path)])
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "e2e_wallclock.json").read_text())
    assert result["decode_path"]["cache"] == "static" and result["decode_path"]["verify_width"] == 4  # gamma_decode + 1
    # the controlled drafter as a tree on the static path: two siblings a depth, lossless, its width timed
    tree = result["configs"]["synthetic_tree_p1_w2"]
    assert tree["drafting"]["tree_width"] == 2 and tree["tokens_per_verify"] > 1
    assert 0 < tree["nodes_per_verify"] <= 3 * 2 and tree["modelled_speedup"] > 0
    assert {"7", "32"} <= set(map(str, result["profile"]["vl_verify_ms"]))
    assert result["decode_path"]["adapter_steps"] == "static"
    # the controlled drafter costs the B1 draft step this run measured on its (static) path
    assert result["synthetic_cost_level"] == "B1"
    assert result["synthetic_cost_ms"] == result["profile"]["adapter_step_ms"]["B1"] > 0
    assert result["numeric_tie_count"] == 0 and result["cuda_max_memory_gib"] is None
    assert result["configs"]["target"]["speedup_vs_hf_generate"]["median"] > 0
    assert result["configs"]["synthetic_p1"]["accepted_per_iteration"] > 1
    assert "path static" in result["profile"]["source"]
    assert "vs hf generate" in (tmp_path / "e2e_wallclock.md").read_text()
    with pytest.raises(SystemExit):
        bench.parse_args(["--dataset_dir", "d", "--compile", "--quant", "4bit"])
    assert bench.parse_args(["--dataset_dir", "d", "--compile"]).static_cache


def test_numeric_ties_beyond_the_margin_fail_a_configuration(quick_world: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties within the margin pass, ties beyond it fail the configuration: the result is still written,
    the failing configuration is marked and named, and the run exits 1."""
    right_check = sd.check_lossless

    def tied(spec, reference, what, recompute=None, dtype=torch.float32):
        ties = right_check(spec, reference, what, recompute, dtype)
        if what.startswith("synthetic_p1"):  # three ties per answer: 3 x 2 outputs, far over max(2, 1%)
            ties += [sd.NumericTie(1, (4, 5), 0.0, 0.1, 5)] * 3
        return ties

    monkeypatch.setattr(sd, "check_lossless", tied)
    models = quick_world / "models"
    args = bench.parse_args(["--dataset_dir", str(quick_world / "dataset"), "--egpt_model", str(models / "eventgpt"),
                             "--vl_model", str(models / "video_llava"), "--configs", "target,synthetic",
                             "--synthetic_acceptance", "0.5,1", "--max_samples", "1", "--max_new_tokens", "4",
                             "--repeats", "1", "--warmup", "1", "--device", "cpu", "--reference_profile", "none",
                             "--output_dir", str(tmp_path)])
    assert bench.main(args) == 1
    result = json.loads((tmp_path / "e2e_wallclock.json").read_text())
    assert not result["lossless_passed"] and result["numeric_tie_count"] == 6
    (failure,) = result["lossless_failures"]
    assert failure.startswith("synthetic_p1: 6 numeric ties in 2 outputs, the target alone 0, at most 2 allowed")
    assert result["configs"]["synthetic_p0.5"]["lossless"]["passed"]
    assert "6 (0) / 2 FAILED" in (tmp_path / "e2e_wallclock.md").read_text()


def test_prompt_lookup_is_lossless_where_the_prompt_ends_in_an_earlier_token(quick_world: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' prompt lookup on the target's prompt embeddings: the lookup ids are the prompt's own
    (checked against the embeddings) with a last id the prompt does not hold. transformers' first step
    runs on the embeddings alone, so candidates there would be misaligned: a question that repeats the
    prompt's last token ('ASSISTANT:') would get some with the prompt's own last id, and gets none. The
    answer is the target's greedy answer, and the pass counts add up."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    import model_builders as mb
    from clip_data import load_index
    from e2e_measure import lookup_ids, prompt_lookup

    first_step: list[int] = []  # candidates proposed when the sequence is the prompt alone
    plain = PromptLookupCandidateGenerator.get_candidates

    def spy(self, input_ids, **kwargs):
        out, logits = plain(self, input_ids, **kwargs)
        if input_ids.shape[1] == prompt_len:
            first_step.append(out.shape[1] - input_ids.shape[1])
        return out, logits

    monkeypatch.setattr(PromptLookupCandidateGenerator, "get_candidates", spy)
    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")
    ds = quick_world / "dataset"
    feats = vl.clip_features(ds / "test", load_index(ds, "test")[0])
    for question in ("What is moving in the scene?", "Say ASSISTANT: what moves?"):
        inputs = vl.build_inputs([feats], [question])
        prompt_len = inputs.inputs_embeds.shape[1]
        ids = lookup_ids(vl, inputs, question)
        assert ids.shape[1] == prompt_len and int(ids[0, -1]) not in ids[0, :-1].tolist()
        reference = sd.greedy_reference(vl, inputs, 12)
        for k, n in ((3, 2), (10, 3)):
            first_step.clear()
            tokens, stats = prompt_lookup(vl, inputs, question, 12, k, n)
            assert tokens == reference, (question, k, n)
            assert first_step == [0] and 1 <= stats["forwards"] <= len(tokens) and stats["drafted"] >= 0
    own_last = ids.clone()
    own_last[0, -1] = vl.tokenizer(video_llava_prompt(question)).input_ids[-1]
    first_step.clear()
    prompt_lookup(vl, inputs, question, 12, 3, 2, ids=own_last)
    assert first_step[0] > 0  # what the unique last id prevents
    with pytest.raises(ValueError, match="do not match"):
        lookup_ids(vl, inputs, "another question")
