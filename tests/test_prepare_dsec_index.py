"""prepare_dsec_index.py: pairs event files with videos, counts what it skips, carves a val split."""

from __future__ import annotations

from pathlib import Path

import pytest

import prepare_dsec_index as prep
from clip_data import clip_paths, load_index, load_questions
from common import UserError


def layout(root: Path, clips: dict[str, list[str]], missing_video: set[str] = frozenset()) -> None:
    for seq, names in clips.items():
        for clip in names:
            npy = root / "train" / "event_npy" / seq / f"{clip}.npy"
            npy.parent.mkdir(parents=True, exist_ok=True)
            npy.write_bytes(b"x")
            if f"{seq}/{clip}" not in missing_video:
                mp4 = root / "train" / "mp4" / seq / f"{clip}.mp4"
                mp4.parent.mkdir(parents=True, exist_ok=True)
                mp4.write_bytes(b"v")


def run(*argv: str) -> int:
    return prep.main(prep.parse_args(list(argv)))


def test_index_pairs_files_and_counts_skips(tmp_path, capsys):
    layout(tmp_path, {"zurich_00": ["000000", "000001"], "zurich_01": ["000000"]}, missing_video={"zurich_01/000000"})
    (tmp_path / "q.json").write_text('[{"question": "What is moving?", "count": 3}]')
    assert run("--dataset_dir", str(tmp_path), "--split", "train", "--questions_file", str(tmp_path / "q.json")) == 0
    records = load_index(tmp_path, "train")
    assert [r["id"] for r in records] == ["zurich_00/000000", "zurich_00/000001"]
    paths = clip_paths(tmp_path, "train", records[1])
    assert paths["event_npy"].is_file() and paths["video"].is_file()
    assert records[0]["height"] == 480 and records[0]["width"] == 640
    assert load_questions(tmp_path) == ["What is moving?"]
    out = capsys.readouterr().out
    assert "indexed 2 clips, skipped 1" in out and "zurich_01/000000.npy: no video" in out


def test_validation_split_takes_whole_sequences(tmp_path):
    layout(tmp_path, {f"seq_{i}": ["000000", "000001"] for i in range(4)})
    out = tmp_path / "index"
    assert run("--dataset_dir", str(tmp_path), "--split", "train", "--val_sequences", "1",
               "--output_dir", str(out)) == 0
    train, val = load_index(out, "train"), load_index(out, "val")
    assert len(train) == 6 and len(val) == 2
    assert {r["sequence"] for r in train}.isdisjoint({r["sequence"] for r in val})
    for split, recs in (("train", train), ("val", val)):  # paths resolve to the original files
        for r in recs:
            paths = clip_paths(out, split, r)
            expected = tmp_path / "train" / "event_npy" / r["sequence"] / f"{r['clip']}.npy"
            assert paths["event_npy"].resolve() == expected.resolve()
            assert paths["video"].is_file()


def test_nothing_to_index_is_one_clear_error(tmp_path):
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match="no clip with both an event file"):
        run("--dataset_dir", str(tmp_path), "--split", "test")
    with pytest.raises(SystemExit):
        prep.parse_args(["--dataset_dir", str(tmp_path), "--split", "test", "--val_sequences", "2"])


def test_a_bad_questions_file_is_refused_before_anything_is_written(tmp_path):
    """The questions file is checked before the first write: a refused run leaves no index behind."""
    layout(tmp_path, {"zurich_00": ["000000"]})
    (tmp_path / "q.json").write_text('[{"question": 3}]')
    with pytest.raises(UserError, match="no string 'question'"):
        run("--dataset_dir", str(tmp_path), "--split", "train", "--questions", str(tmp_path / "q.json"),
            "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "train" / "index.json").exists()


def test_old_flag_spellings_still_work(tmp_path):
    args = prep.parse_args(["--dataset_dir", str(tmp_path), "--split", "test", "--output", str(tmp_path / "o"),
                            "--duration_s", "2", "--questions_file", str(Path(prep.DEFAULT_QUESTIONS))])
    assert args.output_dir == tmp_path / "o" and args.clip_s == 2.0 and args.questions == prep.DEFAULT_QUESTIONS
    with pytest.raises(SystemExit):  # --dsec_root without --output_dir
        prep.parse_args(["--dsec_root", str(tmp_path)])


def test_windows_start_at_the_first_frame_after_t_offset():
    """ms_to_idx[m] is the first event at or after m ms past t_offset: a frame before t_offset (negative time) may
    not start a window, which would index ms_to_idx at a negative millisecond (from its end)."""
    import numpy as np

    ms_to_idx = np.arange(0, 3001) * 10  # 10 events per millisecond over 3 s
    frames = np.arange(-400_000, 3_000_000, 50_000)  # 20 fps from 0.4 s before t_offset
    assert prep.frames_before_events(frames) == 8
    windows = prep.cut_windows(ms_to_idx, frames, 1_000_000)
    assert [w["t0_us"] for w in windows] == [0, 1_000_000, 2_000_000]
    assert [w["event_range"] for w in windows] == [[0, 10_000], [10_000, 20_000], [20_000, 30_000]]
    assert windows[0]["frames"][0] == 8 and all(frames[i] >= 0 for w in windows for i in w["frames"])
    assert prep.cut_windows(ms_to_idx, np.array([-2_000, -1_000]), 1_000_000) == []
