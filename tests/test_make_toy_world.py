"""The toy world: deterministic bytes, idempotent reruns, and models that answer through the loaders."""

from __future__ import annotations

import json
from pathlib import Path

import make_toy_world
from model_loaders import load_eventgpt, load_video_llava
from toy_dataset import load_index, load_questions


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "event_image" not in p.parts}


def build(out: Path, *extra: str) -> dict:
    return make_toy_world.main(make_toy_world.parse_args(["--output_dir", str(out), "--quick", "--threads", "2",
                                                          *extra]))


def test_same_seed_gives_the_same_bytes(quick_world, tmp_path):
    again = tmp_path / "again"
    build(again)
    a, b = files_of(quick_world), files_of(again)
    assert a.keys() == b.keys()
    assert any(k.endswith("model.safetensors") for k in a) and any(k.endswith(".mp4") for k in a)
    differing = [k for k in a if a[k] != b[k]]
    assert not differing


def test_other_seed_gives_other_models(quick_world, tmp_path):
    other = tmp_path / "other"
    build(other, "--seed", "1")
    name = "models/eventgpt/model.safetensors"
    assert (other / name).read_bytes() != (quick_world / name).read_bytes()


def test_rerun_is_idempotent(quick_world):
    weights = quick_world / "models" / "video_llava" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    report = build(quick_world)
    assert weights.stat().st_mtime_ns == before
    assert report["settings"]["quick"] is True


def test_report_and_formats(quick_world):
    report = json.loads((quick_world / "models" / "toy_world.json").read_text())
    stats = report["agreement"]
    for key in ("token_agreement_free_running", "token_agreement_teacher_forced", "degenerate_fraction"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["samples"] == len(load_index(quick_world / "dataset", "test")) * len(load_questions(
        quick_world / "dataset"))
    losses = report["training"]["losses"]
    assert losses["video_llava"]["last"] < losses["video_llava"]["first"]
    egpt_cfg = json.loads((quick_world / "models" / "eventgpt" / "config.json").read_text())
    assert egpt_cfg["model_type"] == "EventChat_llama" and "mm_visual_tower" in egpt_cfg
    vl_cfg = json.loads((quick_world / "models" / "video_llava" / "config.json").read_text())
    assert vl_cfg["model_type"] == "video_llava"


def test_both_models_answer_a_question_through_the_loaders(quick_world):
    data = quick_world / "dataset"
    clip = load_index(data, "test")[0]
    question = load_questions(data)[0]
    for runner in (load_eventgpt(quick_world / "models" / "eventgpt", device="cpu", dtype="fp32"),
                   load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")):
        inputs = runner.build_inputs([runner.clip_features(data / "test", clip)], [question])
        out = runner.generate(inputs, 12)
        assert out.mask[0, 0] and out.tokens.shape == (1, 12)
        text = runner.tokenizer.decode(out.tokens[0][out.mask[0]], skip_special_tokens=True)
        assert text.strip()
