"""Tests for toy_dataset.py: layout, determinism, resumability, video, simulated events, answer text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import clip_data as cd
import toy_dataset as td
from common import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_sequences": (1, 1, 1), "clips_per_sequence": 2, "height": 48, "width": 64, "fps": 10,
        "duration_s": 1.0, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy_a")
    return out, td.write_toy_dataset(out, seed=0, **TINY)


def _moving_scene(motion: str, height: int = 48, width: int = 64) -> list[dict]:
    v = {"left": (-30.0, 0.0), "right": (30.0, 0.0), "static": (0.0, 0.0)}[motion]
    return [{
        "shape": "circle", "colour": "red", "motion": motion, "speed": "none" if motion == "static" else "fast",
        "size_px": 6.0, "start_xy": [16.0, 24.0], "velocity_px_s": list(v), "rgb": list(td.COLOURS["red"]),
        "texture_angle": 0.5, "texture_period_px": 5.0, "position": "middle left",
    }]


def test_layout_and_index_match_the_shared_layout(tiny):
    out, summary = tiny
    assert summary["clips_total"] == 6 and summary["clips_written"] == 6 and summary["clips_skipped"] == 0
    assert summary["frames_per_clip"] == 10 and (summary["height"], summary["width"]) == (48, 64)
    questions = json.loads((out / "questions.json").read_text())
    assert all(set(q) == {"question", "count"} for q in questions) and len(questions) == len(td.QUESTIONS)
    counts = [q["count"] for q in questions]
    assert counts == sorted(counts, reverse=True)
    assert cd.load_questions(out) == [q["question"] for q in questions]
    assert cd.load_questions(out / "questions.json", max_questions=3) == td.question_texts()[:3]
    for split in cd.SPLITS:
        records = cd.load_index(out, split)
        assert len(records) == 2 == summary["splits"][split]["clips"]
        for rec in records:
            seq, clip = rec["sequence"], rec["clip"]
            assert re.fullmatch(r"seq_\d{3}", seq) and re.fullmatch(r"\d{6}", clip)
            assert rec["id"] == f"{seq}/{clip}"
            assert rec["event_npy"] == f"event_npy/{seq}/{clip}.npy"
            assert rec["video"] == f"mp4/{seq}/{clip}.mp4"
            assert rec["event_image_prefix"] == f"event_image/{seq}/{clip}"
            assert (rec["height"], rec["width"], rec["duration_s"], rec["t0_us"]) == (48, 64, 1.0, 0)
            paths = cd.clip_paths(out, split, rec)
            assert paths["event_npy"].is_absolute() and paths["event_npy"].is_file()
            assert paths["video"].is_file()
            assert paths["event_images"][0] == paths["split_dir"] / f"event_image/{seq}/{clip}_0.png"
            meta = rec["meta"]
            assert meta["count"] == len(meta["objects"]) and 1 <= meta["count"] <= 3
            assert meta["shape"] in td.SHAPES and meta["colour"] in td.COLOURS and meta["motion"] in td.MOTIONS
            assert meta["place"] in td.PLACES
        # One sequence keeps one place across its clips.
        assert len({r["meta"]["place"] for r in records}) == 1


def test_splits_are_disjoint_by_sequence(tiny):
    out, _ = tiny
    seqs = {s: {r["sequence"] for r in cd.load_index(out, s)} for s in cd.SPLITS}
    assert seqs["train"].isdisjoint(seqs["val"]) and seqs["train"].isdisjoint(seqs["test"])
    assert seqs["val"].isdisjoint(seqs["test"])
    plan = td._sequence_plan((6, 2, 2))
    names = [name for s in cd.SPLITS for _, name in plan[s]]
    assert len(names) == len(set(names)) == 10


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = td.write_toy_dataset(tmp_path / "b", seed=0, **TINY)
    assert again["clips_written"] == 6
    a, b = _files(out), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 1 + 1 + 3 + 6 + 6  # questions, manifest, 3 indexes, npy, mp4
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    td.write_toy_dataset(tmp_path / "c", seed=1, **TINY)
    c = _files(tmp_path / "c")
    assert c["questions.json"] == a["questions.json"]
    assert c["train/index.json"] != a["train/index.json"]
    data = [k for k in a if k.endswith((".npy", ".mp4"))]
    assert sum(a[k] != c.get(k) for k in data) == len(data)


def test_rerun_skips_finished_clips_and_repairs_missing_ones(tiny, tmp_path):
    out, _ = tiny
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    before = _files(work)
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    summary = td.write_toy_dataset(work, seed=0, **TINY)
    assert summary["clips_written"] == 0 and summary["clips_skipped"] == 6
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == mtimes
    victim = next(iter(sorted(work.rglob("*.mp4"))))
    victim.unlink()
    summary = td.write_toy_dataset(work, seed=0, **TINY)
    assert summary["clips_written"] == 1 and summary["clips_skipped"] == 5
    assert _files(work) == before
    assert not list(work.rglob("*.tmp"))


def test_reusing_a_folder_with_other_settings_is_refused(tiny):
    out, _ = tiny
    with pytest.raises(UserError, match="already holds a toy data set"):
        td.write_toy_dataset(out, seed=5, **TINY)


def test_mp4_decodes_to_the_rendered_frames(tiny):
    out, _ = tiny
    rec = cd.load_index(out, "val")[0]
    with av.open(str(cd.clip_paths(out, "val", rec)["video"])) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (10, 48, 64, 3)
    # Re-render the same clip from its seeds: video and meta describe the same scene.
    g = int(rec["sequence"].split("_")[1])
    background = td.make_background(td._seed(0, g, 1), rec["meta"]["place"], 48, 64)
    for k in (0, 9):
        expected = td.render_frame(background, rec["meta"]["objects"], k / 10).astype(np.float32)
        assert np.abs(frames[k].astype(np.float32) - expected).mean() < 6.0


def test_event_files_have_eventgpt_format(tiny):
    out, _ = tiny
    for split in cd.SPLITS:
        for rec in cd.load_index(out, split):
            raw = np.load(cd.clip_paths(out, split, rec)["event_npy"], allow_pickle=True).item()
            assert set(raw) == {"x", "y", "t", "p"}
            x, y, t, p = raw["x"], raw["y"], raw["t"], raw["p"]
            assert x.dtype == np.int16 and y.dtype == np.int16 and t.dtype == np.int64 and p.dtype == np.int8
            assert len(x) == len(y) == len(t) == len(p) == rec["num_events"] > 0
            assert x.min() >= 0 and x.max() < 64 and y.min() >= 0 and y.max() < 48
            assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 1_000_000
            assert set(np.unique(p).tolist()) <= {0, 1}


def test_events_follow_the_moving_object_and_static_scenes_are_quiet():
    background = td.make_background(np.random.default_rng(0), "street", 48, 64)
    moving = _moving_scene("right")
    frames, ev = td.render_clip(background, moving, fps=10, duration_s=1.0, substeps=4,
                                rng=np.random.default_rng(1))
    assert frames.shape == (10, 48, 64, 3)
    assert len(ev["t"]) > 500 and set(np.unique(ev["p"]).tolist()) == {0, 1}
    # The swept band: x from 16 - r to 46 + r, y within r of 24 (r = size + margin).
    r = 6.0 + 2.0
    inside = (ev["x"] >= 16 - r) & (ev["x"] <= 46 + r) & (np.abs(ev["y"] - 24) <= r)
    assert inside.mean() > 0.9
    # Events track the object over time: the mean x of early events is left of late ones.
    early, late = ev["t"] < 300_000, ev["t"] > 700_000
    assert ev["x"][inside & early].mean() + 10 < ev["x"][inside & late].mean()
    _, still = td.render_clip(background, _moving_scene("static"), fps=10, duration_s=1.0, substeps=4,
                              rng=np.random.default_rng(1))
    assert len(still["t"]) < 0.1 * len(ev["t"])
    _, silent = td.render_clip(background, _moving_scene("static"), fps=10, duration_s=1.0, substeps=4,
                               rng=np.random.default_rng(1), noise_rate_hz=0.0)
    assert len(silent["t"]) == 0


def test_events_from_frames_counts_threshold_crossings():
    # One pixel brightens by exp(0.5) in log space: 2 ON events at threshold 0.2, none elsewhere.
    frames = np.full((2, 4, 4, 3), 90, dtype=np.uint8)
    lum0 = 90.0 + td.LOG_EPS
    target = round(float(np.exp(np.log(lum0) + 0.5)) - td.LOG_EPS)
    frames[1, 2, 3] = target
    ev = td.events_from_frames(frames, np.array([0, 1000]), np.random.default_rng(0), threshold=0.2,
                               threshold_sigma=0.0, noise_rate_hz=0.0)
    assert ev["x"].tolist() == [3, 3] and ev["y"].tolist() == [2, 2] and ev["p"].tolist() == [1, 1]
    assert 0 < ev["t"][0] < ev["t"][1] < 1000  # crossings at ~0.2/0.5 and ~0.4/0.5 of the interval


def _obj(shape: str, colour: str, motion: str, speed: str, position: str) -> dict:
    return {"shape": shape, "colour": colour, "motion": motion, "speed": speed, "position": position}


# Hand-made scenes and the answers written out by hand from the toy world's answer rules (not by
# calling scene_answer), one row per question of questions.json: a focused first sentence, then every
# object with its place and motion, then the place (shorter detail forms where the budget needs them).
ONE_MOVER = {"place": "park", "objects": [_obj("circle", "red", "left", "fast", "middle left")]}
_ONE = ("The red circle sits in the middle left of the view and moves quickly to the left. "
        "The scene is in a green park and the camera does not move.")
ONE_MOVER_ANSWERS = {
    "What is moving in the scene?": "A red circle is moving to the left. " + _ONE,
    "Describe the scene.": "A red circle moves left quickly in a green park. " + _ONE,
    "Which direction is the object moving?": "The red circle is moving quickly to the left. " + _ONE,
    "What color is the object?": "The circle is red in color. " + _ONE,
    "How many objects are there?": "There is one object: a red circle. " + _ONE,
    "What shape is the object?": "The object is a circle. " + _ONE,
    "Where is the object?": "The red circle is in the middle left of the view. " + _ONE,
    "How fast is the object moving?": "The red circle moves quickly to the left. " + _ONE,
    "Is the camera view static?": "Yes, the camera is static; only the red circle moves. " + _ONE,
    "What is in the background?": "The background is a green park with a faint texture. " + _ONE,
}
TWO_STILL = {"place": "night", "objects": [_obj("square", "orange", "static", "none", "center"),
                                           _obj("square", "blue", "static", "none", "top right")]}
_TWO = "The orange square in the center stays still and the blue square in the top right stays still."
_TWO_FULL = _TWO + " The scene is under a dark sky and the camera does not move."
TWO_STILL_ANSWERS = {
    "What is moving in the scene?": "Nothing is moving; both objects stay still. " + _TWO_FULL,
    "Describe the scene.": "An orange square stays still and a blue square stays still under a dark sky. " + _TWO
                           + " The scene is under a dark sky.",
    "Which direction is the object moving?": "The orange square is not moving; it stays in place. " + _TWO_FULL,
    "What color is the object?": "The objects are orange and blue. " + _TWO_FULL,
    "How many objects are there?": "There are two objects: an orange square and a blue square. " + _TWO_FULL,
    "What shape is the object?": "Both of the objects are squares. " + _TWO_FULL,
    "Where is the object?": "The orange square is in the center of the view. " + _TWO_FULL,
    "How fast is the object moving?": "The orange square does not move at all. " + _TWO_FULL,
    "Is the camera view static?": "Yes, the camera is static and nothing in the scene moves. " + _TWO_FULL,
    "What is in the background?": "The background is a dark sky with a faint texture. " + _TWO_FULL,
}
THREE_MIXED = {"place": "beach", "objects": [_obj("triangle", "green", "up", "slow", "bottom center"),
                                             _obj("diamond", "yellow", "down", "fast", "top left"),
                                             _obj("circle", "purple", "static", "none", "center")]}
_THREE = ("The green triangle moves up slowly, the yellow diamond moves down quickly and the purple circle "
          "stays still. The scene is on a sandy beach")
_THREE_FULL = _THREE + " and the camera does not move."
THREE_MIXED_ANSWERS = {
    "What is moving in the scene?": "A green triangle moves up and a yellow diamond moves down. " + _THREE_FULL,
    "Describe the scene.": "A green triangle moves up, a yellow diamond moves down and a purple circle stays still "
                           "on a sandy beach. The green triangle moves up, the yellow diamond moves down and the "
                           "purple circle stays still.",
    "Which direction is the object moving?": "The green triangle is moving slowly up. " + _THREE_FULL,
    "What color is the object?": "The triangle is green, the diamond is yellow and the circle is purple. "
                                 + _THREE + ".",
    "How many objects are there?": "There are three objects: a green triangle, a yellow diamond and a purple "
                                   "circle. " + _THREE + ".",
    "What shape is the object?": "The objects are a triangle, a diamond and a circle. " + _THREE_FULL,
    "Where is the object?": "The green triangle is in the bottom center of the view. " + _THREE_FULL,
    "How fast is the object moving?": "The green triangle moves slowly up. The green triangle in the bottom center "
                                      "moves slowly up, the yellow diamond in the top left moves quickly down and "
                                      "the purple circle in the center stays still. The scene is on a sandy beach.",
    "Is the camera view static?": "Yes, the camera is static; only the objects move. " + _THREE_FULL,
    "What is in the background?": "The background is a sandy beach with a faint texture. " + _THREE_FULL,
}


@pytest.mark.parametrize("scene, answers", [(ONE_MOVER, ONE_MOVER_ANSWERS), (TWO_STILL, TWO_STILL_ANSWERS),
                                            (THREE_MIXED, THREE_MIXED_ANSWERS)], ids=["one", "two", "three"])
def test_scene_answer_matches_hand_written_answers(scene: dict, answers: dict) -> None:
    assert set(answers) == set(td.question_texts())
    meta = td._meta_from_objects(scene["objects"], scene["place"])
    for question, expected in answers.items():
        assert td.scene_answer(meta, question) == expected, question
    # 30-50 tokens as the toy tokenizer counts them (about one per word and punctuation mark)
    assert all(30 <= td._length(a) <= td.ANSWER_BUDGET for a in answers.values())


def test_scene_answer_routes_paraphrases_by_keyword() -> None:
    meta = td._meta_from_objects(ONE_MOVER["objects"], "park")
    assert td.scene_answer(meta, "What colour is it?") == "The circle is red in color. " + _ONE
    assert td.scene_answer(meta, "Count the objects.") == "There is one object: a red circle. " + _ONE
    assert td.scene_answer(meta, "which way does it go") == "The red circle is moving quickly to the left. " + _ONE
    assert td.scene_answer(meta, "Tell me a story.") == "A red circle moves left quickly in a green park. " + _ONE
    # A meta written by hand with only the main object's facts at the top level.
    flat = {"place": "room", "shape": "square", "colour": "blue", "motion": "down", "speed": "slow",
            "position": "top left"}
    assert td.scene_answer(flat, "Where is the object?") == (
        "The blue square is in the top left of the view. The blue square sits in the top left of the view and "
        "moves slowly down. The scene is in a beige room and the camera does not move.")


def test_text_corpus_covers_every_answer_word():
    corpus = td.toy_text_corpus(num_scenes=20)
    vocab = {w for text in corpus for w in re.findall(r"[a-z]+", text.lower())}
    rng = np.random.default_rng(123)
    for k in range(400):
        meta = td._meta_from_objects(td.sample_objects(rng, 96, 128, 1.0), list(td.PLACES)[k % len(td.PLACES)])
        for text in [td.scene_description(meta)] + [td.scene_answer(meta, q) for q in td.question_texts()]:
            assert set(re.findall(r"[a-z]+", text.lower())) <= vocab, text
    assert set(td.question_texts()) <= set(corpus)


def test_readers_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "train" / "index.json"))):
        cd.load_index(tmp_path, "train")
    with pytest.raises(UserError, match="unknown split"):
        cd.load_index(tmp_path, "dev")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        cd.load_index(tmp_path, "val")
    (tmp_path / "val" / "index.json").write_text('[{"id": "a"}]')
    with pytest.raises(UserError, match="record 0 lacks"):
        cd.load_index(tmp_path, "val")
    with pytest.raises(UserError, match="questions file not found"):
        cd.load_questions(tmp_path)
    (tmp_path / "questions.json").write_text('[{"count": 3}]')
    with pytest.raises(UserError, match=r"questions\.json: entry 0"):
        cd.load_questions(tmp_path)
    (tmp_path / "questions.json").write_text('[{"question": "b?", "count": 1}, {"question": "a?", "count": 9}]')
    assert cd.load_questions(tmp_path) == ["a?", "b?"]


def test_cli_writes_a_tiny_data_set(tmp_path):
    cmd = [sys.executable, "toy_dataset.py", "--output_dir", str(tmp_path / "toy"), "--num_sequences", "1", "0",
           "1", "--clips_per_sequence", "1", "--height", "32", "--width", "32", "--fps", "4", "--no_progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(cd.load_index(tmp_path / "toy", "train")) == 1
    assert cd.load_index(tmp_path / "toy", "val") == []
    bad = subprocess.run([*cmd, "--height", "33"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "even" in bad.stderr
