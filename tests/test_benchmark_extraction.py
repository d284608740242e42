"""The extraction benchmark times both ways on the same samples, checks they agree, and reports the ratio."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

import benchmark_extraction as bx
import model_builders
from common import UserError
from tests.conftest import ROOT

T = 4  # max_new_tokens in these tests


def toy_args(world, out, *extra: str) -> list[str]:
    return ["--dataset_dir", str(world / "dataset"), "--egpt_model", str(world / "models" / "eventgpt"),
            "--vl_model", str(world / "models" / "video_llava"), "--max_clips", "2", "--max_questions", "2",
            "--max_new_tokens", str(T), "--batch_size", "3", "--repeats", "2", "--warmup", "1",
            "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--output", str(out), *extra]


def test_toy_world_both_ways_same_samples_and_outputs(quick_world, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bx.main(bx.parse_args(toy_args(quick_world, out, "--teacher_forced"))) == 0
    result = json.loads(out.read_text())
    one, bat = result["one_by_one"], result["batched"]
    assert result["num_samples"] == one["samples"] == bat["samples"] == 4
    assert one["generated_positions"] == bat["generated_positions"] > 0
    assert len(one["seconds"]) == len(bat["seconds"]) == 2 and min(one["seconds"] + bat["seconds"]) > 0
    assert one["samples_per_s_min"] <= one["samples_per_s"] <= one["samples_per_s_max"]
    speedup = result["speedup"]
    ratios = [a / b for a, b in zip(one["seconds"], bat["seconds"], strict=True)]
    assert speedup["median"] > 0 and speedup["median"] == pytest.approx(statistics.median(ratios))
    assert speedup["min"] <= speedup["median"] <= speedup["max"]
    assert bat["samples_per_s"] / one["samples_per_s"] == pytest.approx(speedup["ratio_of_median_times"])
    eq = result["equality"]
    assert eq["passed"] and eq["tokens_equal"] and eq["samples_with_equal_tokens"] == 4
    assert "egpt_hidden_tf" in eq["hidden_keys"] and eq["hidden_max_abs_diff"] < eq["hidden_atol"]
    printed = capsys.readouterr().out
    assert "| one-by-one" in printed and "equality check: PASSED" in printed


def test_random_tiny_shape_runs_every_position(quick_world, tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "benchmark_extraction.py", "--random_shape", "tiny", "--hidden", "32", "--layers", "1",
           "--dataset_dir", str(quick_world / "dataset"), "--max_clips", "2", "--max_questions", "2",
           "--max_new_tokens", "5", "--batch_size", "4", "--repeats", "2", "--warmup", "0", "--device", "cpu",
           "--threads", "1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["mode"] == "random:tiny" and result["shape"]["hidden"] == 32 and result["shape"]["heads"] == 2
    assert result["models"]["drafter"]["hidden_size"] == result["models"]["target"]["hidden_size"] == 32
    assert result["models"]["target"]["vocab_size"] == 32064
    # Random weights never stop at EOS: both models fill all positions of all 4 samples.
    assert result["batched"]["generated_positions"] == 2 * 4 * 5
    assert result["equality"]["passed"] and result["speedup"]["median"] > 0
    assert "| speed-up" in proc.stdout


def test_equality_check_catches_a_changed_token_or_state():
    n, t, d = 3, 4, 8
    a = {"egpt_tokens": torch.ones(n, t, dtype=torch.int32), "vl_tokens": torch.ones(n, t, dtype=torch.int32),
         "egpt_mask": torch.ones(n, t, dtype=torch.bool), "vl_mask": torch.ones(n, t, dtype=torch.bool),
         "egpt_hidden": torch.randn(n, t, d).half(), "vl_hidden": torch.randn(n, t, d).half()}
    assert bx.compare(a, dict(a))["passed"]
    b = dict(a, vl_tokens=a["vl_tokens"].clone())
    b["vl_tokens"][1, 2] = 7
    report = bx.compare(a, b)
    assert not report["passed"] and report["samples_with_equal_tokens"] == 2
    c = dict(a, egpt_hidden=a["egpt_hidden"] + 0.5)
    report = bx.compare(a, c)
    assert not report["passed"] and report["tokens_equal"] and report["hidden_max_abs_diff"] == pytest.approx(0.5, 1e-2)


def test_missing_event_pngs_are_one_clear_error(quick_world, tmp_path):
    data = tmp_path / "dataset"
    (data / "train").mkdir(parents=True)
    for name in ("index.json", "mp4"):
        (data / "train" / name).symlink_to(quick_world / "dataset" / "train" / name)
    (data / "questions.json").symlink_to(quick_world / "dataset" / "questions.json")
    args = bx.parse_args(toy_args(quick_world, tmp_path / "x.json"))
    args.dataset_dir = data
    with pytest.raises(UserError, match=r"_0\.png is missing.*preprocess_event_images"):
        bx.main(args)


@pytest.mark.parametrize("flags", [["--hidden", "64"], ["--random_shape", "tiny", "--quant", "4bit"],
                                   ["--random_shape", "tiny", "--hidden", "30", "--heads", "4"]])
def test_bad_flags_are_refused(flags):
    with pytest.raises(SystemExit) as err:
        bx.parse_args(flags)
    assert err.value.code == 2


def test_7b_shape_builds_the_reference_sizes_on_meta():
    """The GPU timing mode builds Vicuna-7B / CLIP ViT-L sized models (checked without memory)."""
    shape = model_builders.resolve_shape("7b", {})
    egpt, vl = model_builders.build_random_runners(shape, ["What is moving?"], torch.device("meta"), torch.float16, 0)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(egpt.llm) == 6_738_415_616  # LLaMA/Vicuna-7B with a 32000-row vocabulary
    assert count(egpt.tower) == 303_507_456  # CLIP ViT-L/14 at 336 px
    assert abs(count(vl.model) - 7.37e9) / 7.37e9 < 0.01  # Video-LLaVA-7B-hf
    assert egpt.eos_token_id == vl.eos_token_id == -1
