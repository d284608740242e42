"""clip_data.py and the DSEC native path: clips cut from recordings hold exactly the toy world's clips,
both DSEC folder layouts are found, rectification maps coordinates, drops are counted, and the check
before loading names what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

import prepare_dsec_index as prep
from clip_data import (
    DEFAULT_QUESTIONS,
    check_data_folder,
    load_index,
    load_questions,
    plan_samples,
    read_clip_events,
    read_index,
    record_problem,
    rectify_events,
    sample_video_frames,
)
from common import UserError
from toy_dataset import write_dsec_layout, write_toy_dataset

SEQS = (2, 1, 1)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy data set, the same scenes as DSEC recordings, and the clips cut from them."""
    root = tmp_path_factory.mktemp("native")
    write_toy_dataset(root / "dataset", num_sequences=SEQS, clips_per_sequence=2, height=48, width=64, fps=10,
                      progress=False)
    write_dsec_layout(root / "dataset", root / "dsec", progress=False)
    assert prep.main(prep.parse_args(["--dsec_root", str(root / "dsec"), "--output_dir", str(root / "cut"),
                                      "--rectify_events", "--val_sequences", "1"])) == 0
    return root


def toy_records(root: Path) -> dict[str, tuple[str, dict]]:
    return {r["id"]: (s, r) for s in ("train", "val", "test") for r in load_index(root / "dataset", s)}


def test_native_clips_hold_the_toy_worlds_events_and_frames(native: Path) -> None:
    toy = toy_records(native)
    cut = {r["id"]: (s, r) for s in ("train", "val", "test") for r in load_index(native / "cut", s)}
    assert set(cut) == set(toy)  # every window became a clip, named as the toy clip of the same window
    for clip_id, (split, rec) in cut.items():
        toy_split, toy_rec = toy[clip_id]
        assert split == toy_split or (toy_split, split) in {("val", "train"), ("train", "val")}
        assert rec["event_h5"].endswith("events/left/events.h5") and rec["rectify_map"]
        ours = read_clip_events(native / "cut" / split, rec)
        theirs = read_clip_events(native / "dataset" / toy_split, toy_rec, allow_pickle=True)
        assert len(theirs["t"]) > 0 and ours["dropped"] == 0
        for key in ("x", "y", "t", "p"):
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{clip_id} {key}")
        assert rec["num_video_frames"] == toy_rec["num_video_frames"] == 10
        ours_rgb = sample_video_frames(native / "cut" / split / rec["video"], 8).astype(np.int16)
        theirs_rgb = sample_video_frames(native / "dataset" / toy_split / toy_rec["video"], 8).astype(np.int16)
        # two H.264 encodes of the same frames: equal on an idle machine, once a few levels apart under load
        # (seen in a full suite on 2 busy cores); another frame or window would differ by tens of levels
        assert ours_rgb.shape == theirs_rgb.shape
        assert np.abs(ours_rgb - theirs_rgb).mean() < 2.0, clip_id
    summary = json.loads((native / "cut" / "clip_index.json").read_text())
    assert summary["counts"]["windows"] == 8 and summary["counts"]["dropped_few_frames"] == 0
    val = {r["sequence"] for r in load_index(native / "cut", "val")}
    assert len(val) == 1 and val.isdisjoint({r["sequence"] for r in load_index(native / "cut", "train")})
    assert load_questions(native / "cut") == load_questions(DEFAULT_QUESTIONS)


def test_a_rerun_keeps_videos_and_a_new_clip_length_redoes_them(native: Path, tmp_path: Path) -> None:
    out = tmp_path / "cut"
    argv = ["--dsec_root", str(native / "dsec"), "--output_dir", str(out)]
    for extra, written in (([], 8), ([], 0), (["--clip_s", "0.5", "--min_frames", "4"], 16)):
        assert prep.main(prep.parse_args([*argv, *extra])) == 0
        assert json.loads((out / "clip_index.json").read_text())["counts"]["videos_written"] == written
    assert all(r["num_video_frames"] == 5 for r in load_index(out, "test"))


def test_split_tree_layout_and_counted_drops(native: Path, tmp_path: Path) -> None:
    """The {train,test}/{seq}/ tree with images/timestamps.txt; a window with too few frames is counted."""
    tree = tmp_path / "tree"
    for seq_dir in (native / "dsec" / "train_events").iterdir():
        shutil.copytree(seq_dir, tree / "train" / seq_dir.name)
        images = native / "dsec" / "train_images" / seq_dir.name
        shutil.copytree(images / "images", tree / "train" / seq_dir.name / "images")
        stamps = (images / f"{seq_dir.name}_image_timestamps.txt").read_text().split()
        pngs = sorted((tree / "train" / seq_dir.name / "images" / "left" / "rectified").glob("*.png"))
        for png in pngs[13:]:  # the second window keeps 3 of its 10 frames
            png.unlink()
        (tree / "train" / seq_dir.name / "images" / "timestamps.txt").write_text("\n".join(stamps[:13]) + "\n")
    out = tmp_path / "out"
    assert prep.main(prep.parse_args(["--dsec_root", str(tree), "--output_dir", str(out), "--val_sequences", "0"])) == 0
    train = load_index(out, "train")
    # the toy's train and val sequences are DSEC train recordings: three, one full window each
    assert [r["id"] for r in train] == [f"seq_{g:03d}/000000" for g in range(3)] and train[0]["rectify_map"] is None
    counts = json.loads((out / "clip_index.json").read_text())["counts"]
    assert counts["windows"] == 6 and counts["dropped_few_frames"] == 3 and counts["dropped_few_events"] == 0
    assert load_index(out, "val") == [] and load_index(out, "test") == []


def test_rectification_maps_and_drops_off_sensor_events() -> None:
    height, width = 4, 6
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rmap = np.stack([width - 1 - xx + 0.2, yy + 0.4], axis=-1)  # a mirror, with sub-pixel offsets
    rmap[0, 0] = (-3.0, 0.0)  # this raw pixel lands off the sensor
    events = {"x": np.array([0, 1, 5]), "y": np.array([0, 2, 3]), "t": np.array([1, 2, 3]), "p": np.array([1, 0, 1])}
    out, dropped = rectify_events(events, rmap)
    assert dropped == 1
    assert out["x"].tolist() == [4, 0] and out["y"].tolist() == [2, 3] and out["t"].tolist() == [2, 3]


def test_check_before_loading_names_missing_files(native: Path, tmp_path: Path) -> None:
    summary = check_data_folder(native / "cut", ["train", "val", "test"])
    assert summary["splits"] == {"train": 4, "val": 2, "test": 2} and summary["questions"] == 20
    with pytest.raises(UserError, match=r"event frame .* is missing.*preprocess_event_images"):
        check_data_folder(native / "cut", ["test"], num_event_images=5)
    broken = native / "cut_without_videos"  # beside cut/: its relative paths into dsec/ still resolve
    shutil.copytree(native / "cut", broken, ignore=shutil.ignore_patterns("*.mp4"))
    with pytest.raises(UserError, match=r"8 missing files: .*video"):
        check_data_folder(broken, ["train", "val", "test"])
    (broken / "questions.json").write_text("{}")
    with pytest.raises(UserError, match=r"questions file .* non-empty JSON list"):
        check_data_folder(broken, ["train"])


def test_h5_is_dsec_shaped(native: Path) -> None:
    h5 = native / "dsec" / "train_events" / "seq_000" / "events" / "left" / "events.h5"
    with h5py.File(h5, "r") as f:
        assert f["events/t"].dtype == np.uint32 and f["events/x"].dtype == np.uint16
        assert "32001" in f["events/t"]._filters  # Blosc's registered HDF5 filter id
        t, ms_to_idx = f["events/t"][:], f["ms_to_idx"][:]
        assert int(f["t_offset"][()]) > 0
    for m in (0, 500, 1000, len(ms_to_idx) - 1):
        assert ms_to_idx[m] == np.searchsorted(t, m * 1000)


def test_one_record_rule_for_every_reader(tmp_path: Path) -> None:
    full = {"id": "s/c", "sequence": "s", "clip": "c", "video": "v.mp4", "event_image_prefix": "event_image/s/c",
            "height": 4, "width": 6, "event_npy": "e.npy"}
    assert record_problem(full) is None
    assert record_problem([1]) == "is a list, not an object"
    assert record_problem({k: v for k, v in full.items() if k != "video"}) == "lacks video"
    h5 = {**{k: v for k, v in full.items() if k != "event_npy"}, "event_h5": "events.h5"}
    assert record_problem(h5) == "lacks event_range"
    assert record_problem({**h5, "event_range": [0, 3]}) is None
    # a stage that needs less (rendering: the events and where the frames go) asks for less
    assert record_problem({"event_npy": "e.npy", "event_image_prefix": "p"}, ("event_image_prefix",)) is None
    assert record_problem({"event_image_prefix": "p"}, ("event_image_prefix",)) == "lacks event_npy (or event_h5)"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text(json.dumps([full, {"id": "x"}]))
    assert read_index(tmp_path, "train")[1] == {"id": "x"}  # read, not checked
    with pytest.raises(UserError, match=r"index.json: record 1 lacks sequence, clip"):
        load_index(tmp_path, "train")
    (tmp_path / "train" / "index.json").write_text("{}")
    with pytest.raises(UserError, match="must hold a JSON list"):
        read_index(tmp_path, "train")


def test_plan_samples_is_clip_major_and_capped() -> None:
    assert plan_samples(2, 3, None) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert plan_samples(2, 3, 4) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert plan_samples(2, 3, 0) == plan_samples(2, 3, None)
    assert plan_samples(0, 3, 5) == []
