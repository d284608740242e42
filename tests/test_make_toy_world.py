"""The toy world: deterministic bytes, idempotent reruns, and models that answer through the loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import make_toy_world
from clip_data import load_index, load_questions
from model_builders import load_eventgpt, load_video_llava


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
    assert stats["samples"] == len(load_index(quick_world / "dataset", "test")) * len(load_questions(
        quick_world / "dataset"))
    assert stats["tf_tokens_outside_drafter_vocab"] == 0  # the toy pair shares one vocabulary
    losses = report["training"]["losses"]
    assert losses["video_llava"]["last"] < losses["video_llava"]["first"]
    egpt_cfg = json.loads((quick_world / "models" / "eventgpt" / "config.json").read_text())
    assert egpt_cfg["model_type"] == "EventChat_llama" and "mm_visual_tower" in egpt_cfg
    vl_cfg = json.loads((quick_world / "models" / "video_llava" / "config.json").read_text())
    assert vl_cfg["model_type"] == "video_llava"


def _row(vl: list[int], egpt: list[int], tf: list[int], ref: str, vl_text: str, egpt_text: str) -> dict:
    return {"clip": "c", "question": "q", "ref": ref, "vl": vl_text, "egpt": egpt_text,
            "vl_tokens": vl, "egpt_tokens": egpt, "tf_tokens": tf}


def test_agreement_statistics_follow_their_definitions():
    """Three hand-made samples whose statistics are worked out by hand."""
    rows = [
        # 4 target tokens; the drafter's own answer agrees at positions 0 and 2, its guesses at 0, 1, 2.
        _row([5, 6, 7, 2], [5, 9, 7, 8, 2], [5, 6, 7, 3], "a red car.", "a red car.", "a blue car."),
        # The drafter stops after 1 token: positions 1.. count as disagreeing. Guesses all right.
        _row([4, 4, 4, 4, 4, 2], [4], [4, 4, 4, 4, 4, 2], "one square.", "one one one", "one"),
        # Identical answers that both differ from the reference.
        _row([8, 2], [8, 2], [9, 2], "a circle.", "a square.", "a square."),
    ]
    stats = make_toy_world.summarise_answers(rows, foreign=3)
    assert stats["samples"] == 3
    assert stats["token_agreement_free_running"] == pytest.approx((2 / 4 + 1 / 6 + 2 / 2) / 3)
    assert stats["token_agreement_teacher_forced"] == pytest.approx((3 / 4 + 6 / 6 + 1 / 2) / 3)
    assert stats["vl_exact_match_reference"] == pytest.approx(1 / 3)
    assert stats["egpt_exact_match_reference"] == 0.0
    assert stats["identical_answers"] == pytest.approx(1 / 3)
    assert stats["degenerate_fraction"] == pytest.approx(1 / 3)  # token 4 fills 5 of 6 positions
    assert stats["egpt_degenerate_fraction"] == 0.0  # a 1-token answer is too short to loop
    assert stats["distinct_vl_answers"] == 3 and stats["distinct_egpt_answers"] == 3
    assert stats["tf_tokens_outside_drafter_vocab"] == 3


def test_report_examples_are_the_models_answers_to_the_known_scene(quick_world):
    """Each example in the report names its clip and question; its reference is the scene's answer, its
    texts are what the saved models answer now, and its agreement figures are recomputed here with a
    plain forward pass over prompt + target answer (not the runner's teacher-forced helper)."""
    from toy_dataset import scene_answer

    data = quick_world / "dataset"
    report = json.loads((quick_world / "models" / "toy_world.json").read_text())
    clips = {c["id"]: c for c in load_index(data, report["agreement_split"])}
    egpt = load_eventgpt(quick_world / "models" / "eventgpt", device="cpu", dtype="fp32")
    vl = load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")
    split_dir = data / report["agreement_split"]
    examples = report["agreement"]["examples"]
    assert len(examples) == 6 and len({(e["clip"], e["question"]) for e in examples}) == 6
    for ex in examples:
        clip = clips[ex["clip"]]
        assert ex["ref"] == scene_answer(clip["meta"], ex["question"])
        # The toy tokenizer spells every reference back exactly, so exact-match figures can be 1.
        for runner in (egpt, vl):
            ids = runner.tokenizer(ex["ref"], add_special_tokens=False).input_ids
            assert runner.tokenizer.decode(ids, skip_special_tokens=True).strip() == ex["ref"]
        ei = egpt.build_inputs([make_toy_world.embed_clip_from_sources(egpt, split_dir, clip)], [ex["question"]])
        vi = vl.build_inputs([make_toy_world.embed_clip_from_sources(vl, split_dir, clip)], [ex["question"]])
        ge, gv = egpt.generate(ei, 50), vl.generate(vi, 50)  # answer_rows generates 50 tokens
        vt, et = gv.tokens[0, gv.mask[0]], ge.tokens[0, ge.mask[0]]
        assert vl.tokenizer.decode(vt, skip_special_tokens=True).strip() == ex["vl"]
        assert egpt.tokenizer.decode(et, skip_special_tokens=True).strip() == ex["egpt"]
        n = len(vt)
        free = sum(int(a) == int(b) for a, b in zip(vt, et, strict=False)) / n
        full = torch.cat([ei.inputs_embeds, egpt.embed_ids(vt[None, : n - 1])], dim=1)
        hidden = egpt.prefill(type(ei)(full, torch.ones(1, full.shape[1], dtype=torch.long))).hidden[0]
        plen = ei.inputs_embeds.shape[1]
        guesses = (hidden[plen - 1 : plen - 1 + n] @ egpt.lm_head_weight().T).argmax(-1)
        assert ex["free_agree"] == pytest.approx(free)
        assert ex["tf_agree"] == pytest.approx(float((guesses == vt).float().mean()), abs=1e-6)


def test_layout_flag_and_the_older_output_spelling(tmp_path):
    args = make_toy_world.parse_args(["--output", str(tmp_path / "w"), "--layout", "dsec"])
    assert args.output_dir == tmp_path / "w" and args.layout == "dsec"
    assert make_toy_world.parse_args(["--output_dir", str(tmp_path)]).layout == "clips"
    with pytest.raises(SystemExit):
        make_toy_world.parse_args(["--output_dir", str(tmp_path), "--layout", "video"])
