"""Tests for preprocess_event_images.py: splitting, rendering, every input format, bad input, reruns."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip_data as cd
import event_frames as ef
import preprocess_event_images as pe
import timing
from common import UserError
from tests.test_benchmark_adapter_latency import FakeClock

ROOT = Path(__file__).resolve().parents[1]
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)
H, W = 12, 16


def structured(x, y, t, p, t_dtype=np.int64) -> np.ndarray:
    arr = np.zeros(len(t), dtype=[("x", np.uint16), ("y", np.uint16), ("t", t_dtype), ("p", np.int8)])
    arr["x"], arr["y"], arr["t"], arr["p"] = x, y, t, p
    return arr


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def non_white(frame: np.ndarray) -> int:
    return int((frame != 255).any(axis=-1).sum())


def run_main(argv: list[str]) -> int:
    return pe.main(pe.parse_args([*argv, "--num_workers", "0"]))


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------- splitting


def test_split_time_equal_windows():
    t = np.arange(10, dtype=np.int64)  # span 9 over 5 windows of 1.8 us
    assert ef.split_indices(t, 5, "time") == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    # one late event: equal time puts the first four in window 0, equal count does not
    t = np.array([0, 1, 2, 3, 100])
    assert ef.split_indices(t, 2, "time") == [(0, 4), (4, 5)]
    assert ef.split_indices(t, 2, "count") == [(0, 2), (2, 5)]
    # an event exactly on a window edge starts the next window; the last window is closed
    assert ef.split_indices(np.array([0, 50, 100]), 2, "time") == [(0, 1), (1, 3)]


def test_split_count_and_edge_cases():
    # EventGPT's get_event_images_list: N // n per slice, the remainder goes to the last slice.
    assert ef.split_indices(np.arange(7), 3, "count") == [(0, 2), (2, 4), (4, 7)]
    assert ef.split_indices(np.arange(12), 5, "count") == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 12)]
    assert ef.split_indices(np.arange(2), 4, "count") == [(0, 0), (0, 0), (0, 0), (0, 2)]
    assert ef.split_indices(np.zeros(0, np.int64), 3, "time") == [(0, 0)] * 3
    assert ef.split_indices(np.zeros(0, np.int64), 3, "count") == [(0, 0)] * 3
    assert ef.split_indices(np.full(4, 7), 3, "time") == [(0, 4), (4, 4), (4, 4)]
    assert ef.split_indices(np.array([0.0, 0.5, 1.0]), 2, "time") == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="split_mode"):
        ef.split_indices(np.arange(3), 2, "bogus")


# --------------------------------------------------------------------------- rendering


def test_pixel_colour_in_its_frame_only():
    # positive at (x=3, y=2) early, negative at (x=5, y=4) late; two time windows split at t=50
    frames = ef.render_event_frames([3, 5], [2, 4], [0, 100], [1, 0], num_frames=2, height=H, width=W,
                                    split_mode="time", canvas="sensor")
    assert len(frames) == 2 and all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)
    assert tuple(frames[0][2, 3]) == RED and tuple(frames[0][4, 5]) == WHITE
    assert tuple(frames[1][4, 5]) == BLUE and tuple(frames[1][2, 3]) == WHITE
    assert non_white(frames[0]) == 1 and non_white(frames[1]) == 1
    # -1 is negative too
    frames = ef.render_event_frames([1], [1], [0], [-1], num_frames=1, height=H, width=W)
    assert tuple(frames[0][1, 1]) == BLUE


def test_latest_event_on_top():
    n = 20_001  # many repeats of one pixel, alternating polarity, ending positive
    p = (np.arange(n) % 2 == 0).astype(np.int8)
    frames = ef.render_event_frames(np.full(n, 7), np.full(n, 9), np.arange(n), p, 1, H, W)
    assert tuple(frames[0][9, 7]) == RED
    frames = ef.render_event_frames(np.full(n, 7), np.full(n, 9), np.arange(n), 1 - p, 1, H, W)
    assert tuple(frames[0][9, 7]) == BLUE


def test_sensor_canvas_is_sensor_size_even_for_a_corner():
    frames = ef.render_event_frames([0, 1], [0, 1], [0, 10], [1, 1], num_frames=5, split_mode="time",
                                    canvas="sensor")
    assert [f.shape for f in frames] == [(480, 640, 3)] * 5
    assert non_white(frames[0]) == 1 and non_white(frames[-1]) == 1
    blank = ef.render_event_frames([], [], [], [], num_frames=3, height=H, width=W)
    assert [f.shape for f in blank] == [(H, W, 3)] * 3 and all((f == 255).all() for f in blank)
    with pytest.raises(ValueError, match="outside"):
        ef.render_event_frames([W], [0], [0], [1], num_frames=1, height=H, width=W)
    with pytest.raises(ValueError, match="canvas"):
        ef.render_event_frames([1], [0], [0], [1], num_frames=1, height=H, width=W, canvas="bbox")


# --------------------------------------------------------------------------- reading and validation


def test_structured_flat_npz_and_pickled_inputs(tmp_path):
    ev = structured([1, 2], [3, 4], [10, 20], [1, 0])
    np.save(tmp_path / "s.npy", ev)
    out = cd.load_events(tmp_path / "s.npy", height=H, width=W)
    assert out["x"].tolist() == [1, 2] and out["t"].dtype == np.int64 and out["p"].tolist() == [1, 0]

    flat = np.array([[10, 1, 3, 1], [20, 2, 4, -1]], dtype=np.float64)  # t, x, y, p
    np.save(tmp_path / "f.npy", flat)
    out = cd.load_events(tmp_path / "f.npy", columns=("t", "x", "y", "p"))
    assert out["x"].tolist() == [1, 2] and out["t"].tolist() == [10, 20] and out["p"].tolist() == [1, 0]
    with pytest.raises(cd.EventFileError, match="--columns"):
        cd.load_events(tmp_path / "f.npy")

    np.savez(tmp_path / "z.npz", x=[1], y=[2], t=[3], p=[1])
    assert cd.load_events(tmp_path / "z.npz")["y"].tolist() == [2]

    np.save(tmp_path / "d.npy", {"x": np.array([1]), "y": np.array([2]), "t": np.array([3]), "p": np.array([0])})
    with pytest.raises(cd.EventFileError, match="--allow_pickle") as err:
        cd.load_events(tmp_path / "d.npy")
    assert str(tmp_path / "d.npy") in str(err.value)
    assert cd.load_events(tmp_path / "d.npy", allow_pickle=True)["p"].tolist() == [0]


GOOD = {"x": [1, 2, 3], "y": [1, 2, 3], "t": [0, 5, 9], "p": [1, 0, 1]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"t": [0.0, np.nan, 9.0]}, "NaN"),
        ({"t": [-5, 0, 9]}, "negative timestamp"),
        ({"t": [0, 9, 5]}, "not sorted"),
        ({"x": [1, 2, W]}, "outside the sensor"),
        ({"y": [-1, 2, 3]}, "outside the sensor"),
        ({"p": None}, "missing keys"),
        ({"x": [1.5, 2.0, 3.0]}, "non-integer"),
        ({"t": [0.0, 5.5, 9.0]}, "integer microseconds"),
        ({"x": ["a", "b", "c"]}, "dtype"),
        ({"t": [0, 5]}, "different lengths"),
        ({"p": [1, 2, 0]}, "polarity"),
        ({"x": [[1, 2, 3]]}, "1-D"),
    ],
)
def test_validate_rejects_bad_events(change, expected):
    events = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(cd.EventFileError, match=expected) as err:
        cd.validate_events(events, height=H, width=W, source="clip.npy")
    assert str(err.value).startswith("clip.npy: ") and "\n" not in str(err.value)


def test_validate_accepts_empty_and_whole_floats():
    empty = cd.validate_events({k: np.zeros(0) for k in "xytp"}, height=H, width=W)
    assert all(len(v) == 0 for v in empty.values())
    out = cd.validate_events({**GOOD, "x": [1.0, 2.0, 3.0], "p": [True, False, True]}, H, W)
    assert out["x"].dtype == np.int32 and out["p"].tolist() == [1, 0, 1]


# --------------------------------------------------------------------------- whole runs


def write_bad_and_good_files(seq: Path) -> dict[str, Path]:
    seq.mkdir(parents=True)
    files = {}

    def save(name, arr):
        files[name] = seq / f"{name}.npy"
        np.save(files[name], arr)

    save("good", structured([3], [2], [0], [1]))
    save("empty", structured([], [], [], []))
    save("nan_t", structured([1, 2], [1, 2], [0.0, np.nan], [1, 0], t_dtype=np.float64))
    save("neg_t", structured([1, 2], [1, 2], [-3, 0], [1, 0]))
    save("unsorted", structured([1, 2], [1, 2], [9, 3], [1, 0]))
    save("outside", structured([1, 900], [1, 2], [0, 1], [1, 0]))
    save("no_p", np.zeros(2, dtype=[("x", np.int64), ("y", np.int64), ("t", np.int64)]))
    float_xy = np.zeros(2, dtype=[("x", np.float32), ("y", np.float32), ("t", np.int64), ("p", np.int8)])
    float_xy["x"] = [1.5, 2.0]
    save("float_xy", float_xy)
    files["float_xy_frac"] = seq / "float_xy_frac.npz"
    np.savez(files["float_xy_frac"], x=[1.25], y=[1.0], t=[0], p=[1])
    strings = np.zeros(1, dtype=[("x", "U3"), ("y", np.int64), ("t", np.int64), ("p", np.int8)])
    save("strings", strings)
    save("not_events", np.array(["1", "2", "3", "4"]))
    save("pickled", {"x": [1], "y": [1], "t": [0], "p": [1]})
    files["mismatch"] = seq / "mismatch.npz"
    np.savez(files["mismatch"], x=[1, 2, 3], y=[1, 2], t=[0, 1], p=[1, 0])
    files["truncated"] = seq / "truncated.npy"
    files["truncated"].write_bytes(files["good"].read_bytes()[:-6])
    files["not_numpy"] = seq / "not_numpy.npy"
    files["not_numpy"].write_text("x,y,t,p\n1,2,3,1\n")
    files["zero_bytes"] = seq / "zero_bytes.npy"
    files["zero_bytes"].write_bytes(b"")
    return files


def test_bad_files_fail_alone_and_exit_1(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    files = write_bad_and_good_files(tmp_path / "in" / "seq_a")
    out = tmp_path / "out"
    rc = run_main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--num_frames", "2"])
    assert rc == 1
    # one event, two equal-count slices: N // 2 = 0 in the first (white sensor canvas), the event in the last
    assert tuple(read_png(out / "seq_a" / "good_1.png")[2, 3]) == RED
    assert (read_png(out / "seq_a" / "empty_1.png") == 255).all()
    errors = failure_lines(caplog)
    bad = {k: v for k, v in files.items() if k not in ("good", "empty")}
    for name, path in bad.items():
        mine = [line for line in errors if str(path) in line]
        assert len(mine) == 1, (name, errors)
        assert not (out / "seq_a" / f"{path.stem}_0.png").exists()
    assert "--allow_pickle" in next(line for line in errors if "pickled.npy" in line)
    assert "--columns" not in " ".join(errors)  # nothing here is a plain [N, 4] array
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"] == {"written": 1, "blank": 1, "skipped": 0, "failed": len(bad)}


def test_rerun_skips_and_blank_is_counted(tmp_path):
    seq = tmp_path / "in" / "seq_a"
    seq.mkdir(parents=True)
    np.save(seq / "a.npy", structured([1, 2], [1, 2], [0, 10], [1, 0]))
    np.save(seq / "blank.npy", structured([], [], [], []))
    out = tmp_path / "out"
    argv = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--height", str(H), "--width", str(W)]
    assert run_main(argv) == 0
    last_run = json.loads((out / "manifest.json").read_text())["last_run"]
    assert last_run == {"written": 1, "blank": 1, "skipped": 0, "failed": 0}
    assert read_png(out / "seq_a" / "a_0.png").shape == (H, W, 3)
    assert sorted(p.name for p in (out / "seq_a").iterdir()) == [f"{c}_{i}.png" for c in ("a", "blank")
                                                                   for i in range(5)]
    stamp = (out / "seq_a" / "a_0.png").stat().st_mtime_ns
    assert run_main(argv) == 0
    last_run = json.loads((out / "manifest.json").read_text())["last_run"]
    assert last_run == {"written": 0, "blank": 0, "skipped": 2, "failed": 0}
    assert (out / "seq_a" / "a_0.png").stat().st_mtime_ns == stamp
    # a missing frame makes the clip render again
    (out / "seq_a" / "a_4.png").unlink()
    assert run_main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["last_run"]["written"] == 1
    # other settings into the same folder are refused unless --overwrite
    with pytest.raises(UserError, match="--overwrite"):
        run_main([*argv, "--split_mode", "time"])
    with pytest.raises(UserError, match="--overwrite"):
        run_main([*argv, "--canvas", "sensor"])
    assert run_main([*argv, "--split_mode", "time", "--overwrite"]) == 0
    other_sensor = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--height", str(H + 2),
                    "--width", str(W), "--split_mode", "time"]
    with pytest.raises(UserError, match="--overwrite"):
        run_main(other_sensor)


def write_dsec_h5(path: Path, t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> None:
    import h5py
    import hdf5plugin

    path.parent.mkdir(parents=True)
    ms_to_idx = np.searchsorted(t, np.arange(int(t[-1]) // 1000 + 1) * 1000, side="left")
    with h5py.File(path, "w") as f:
        for name, data in (("x", x), ("y", y), ("t", t), ("p", p)):
            f.create_dataset(f"events/{name}", data=data, **hdf5plugin.Blosc(cname="zstd"))
        f.create_dataset("ms_to_idx", data=ms_to_idx.astype(np.uint64), **hdf5plugin.Blosc())
        f.create_dataset("t_offset", data=np.int64(1_500_000_000))


def test_dsec_h5_cut_into_clips(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # 2.6 s of events: two complete 1 s clips, the last 0.6 s is dropped
    t = np.arange(0, 2_600_000, 1000, dtype=np.uint32)
    x = (np.arange(len(t)) % W).astype(np.uint16)
    y = np.zeros(len(t), np.uint16)
    p = np.zeros(len(t), np.uint8)
    special = int(np.searchsorted(t, 1_000_000))  # first event of clip 1: make it positive at (x=0, y=5)
    x[special], y[special], p[special] = 0, 5, 1
    write_dsec_h5(tmp_path / "in" / "zurich_00" / "events" / "left" / "events.h5", t, x, y, p)
    broken = tmp_path / "in" / "zurich_01" / "events" / "left" / "events.h5"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not hdf5")
    out = tmp_path / "out"
    rc = run_main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--height", str(H),
                   "--width", str(W), "--clip_duration_ms", "1000", "--num_frames", "2"])
    assert rc == 1  # the broken recording fails, the good one is still written
    names = sorted(p.name for p in (out / "zurich_00").iterdir())
    assert names == ["000000_0.png", "000000_1.png", "000001_0.png", "000001_1.png"]
    assert tuple(read_png(out / "zurich_00" / "000001_0.png")[5, 0]) == RED
    first = read_png(out / "zurich_00" / "000000_0.png")
    assert first.shape == (1, W, 3)  # the release's canvas: clip 0 has events on row 0 only
    assert tuple(first[0, 3]) == BLUE
    errors = failure_lines(caplog)
    assert len(errors) == 1 and str(broken) in errors[0]
    assert cd.list_h5_clips(tmp_path / "in" / "zurich_00" / "events" / "left" / "events.h5", 500) == [
        (i * 500, (i + 1) * 500) for i in range(5)
    ]


def make_dataset(root: Path, clips: dict[str, dict]) -> None:
    split_dir = root / "train"
    records = []
    for clip, events in clips.items():
        npy = split_dir / "event_npy" / "seq_000" / f"{clip}.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, events)  # EventGPT's format: a pickled dict
        records.append({"id": f"seq_000/{clip}", "sequence": "seq_000", "clip": clip,
                        "event_npy": f"event_npy/seq_000/{clip}.npy",
                        "event_image_prefix": f"event_image/seq_000/{clip}", "height": H, "width": W})
    (split_dir / "index.json").write_text(json.dumps(records))


def test_dataset_mode_with_workers(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    good = {"x": np.array([4, 6]), "y": np.array([3, 3]), "t": np.array([0, 1000]), "p": np.array([0, 1])}
    make_dataset(tmp_path / "ds", {"000000": good, "000001": {**good, "x": np.array([4, 99])}})
    argv = ["--dataset_dir", str(tmp_path / "ds"), "--num_frames", "2"]
    assert pe.main(pe.parse_args([*argv, "--num_workers", "0"])) == 1  # pickled, no flag: every clip fails
    assert sum("--allow_pickle" in line for line in failure_lines(caplog)) == 2
    caplog.clear()
    assert pe.main(pe.parse_args([*argv, "--allow_pickle", "--num_workers", "2"])) == 1
    frames = tmp_path / "ds" / "train" / "event_image" / "seq_000"
    first = read_png(frames / "000000_0.png")
    assert first.shape == (4, 5, 3)  # the release's canvas: up to the slice's last event
    assert tuple(first[3, 4]) == BLUE and tuple(read_png(frames / "000000_1.png")[3, 6]) == RED
    assert not (frames / "000001_0.png").exists()
    errors = failure_lines(caplog)
    assert len(errors) == 1 and "000001.npy" in errors[0] and "outside the sensor" in errors[0]
    # flags override the record's sensor size, which is the canvas with --canvas sensor
    assert pe.main(pe.parse_args([*argv, "--allow_pickle", "--num_workers", "0", "--width", "128",
                                  "--canvas", "sensor", "--overwrite"])) == 0
    assert read_png(frames / "000001_0.png").shape == (H, 128, 3)
    assert read_png(frames / "000000_0.png").shape == (H, 128, 3)


def test_dataset_mode_counts_a_bad_record(tmp_path, caplog):
    good = {"x": np.array([4]), "y": np.array([3]), "t": np.array([0]), "p": np.array([1])}
    make_dataset(tmp_path / "ds", {"000000": good})
    index = tmp_path / "ds" / "train" / "index.json"
    records = json.loads(index.read_text())
    index.write_text(json.dumps([*records, {"id": "seq_000/x", "event_image_prefix": "event_image/seq_000/x"}]))
    assert run_main(["--dataset_dir", str(tmp_path / "ds"), "--allow_pickle"]) == 1
    assert failure_lines(caplog) == [f"failed: {index}: record 1 lacks event_npy (or event_h5)"]
    assert (tmp_path / "ds" / "train" / "event_image" / "seq_000" / "000000_4.png").is_file()


def test_parse_args_validation(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        pe.parse_args([])
    with pytest.raises(UserError, match="--output_dir"):
        pe.parse_args(["--input_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--columns"):
        pe.parse_args(["--input_dir", str(tmp_path), "--output_dir", str(tmp_path), "--columns", "x,y,t"])
    with pytest.raises(UserError, match="num_frames"):
        pe.parse_args(["--benchmark", "--num_frames", "0"])
    with pytest.raises(UserError, match=r"index\.json"):
        pe.main(pe.parse_args(["--dataset_dir", str(tmp_path)]))
    with pytest.raises(UserError, match=re.escape("no {seq}")):
        pe.main(pe.parse_args(["--input_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]))


def test_benchmark_reports_what_was_timed(monkeypatch):
    """Each step's seconds are set by hand, so every figure of the JSON is known: millions of events per
    second of rendering (median, min, max over repeats), of validation, and PNG milliseconds per clip."""
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)  # the benchmark times through timing.Stopwatch
    # Seconds per call: one warm-up, then 3 timed repeats. PNG encoding is called once per frame
    # (2 frames a clip), so its clips take 2, 4 and 3 ms.
    durations = {
        "validate": [9.0, 0.5, 0.5, 0.5],
        "render": [9.0, 0.5, 0.25, 1.0],
        "png": [9.0, 9.0, 0.001, 0.001, 0.002, 0.002, 0.0015, 0.0015],
    }
    calls = {k: iter(v) for k, v in durations.items()}
    frames_seen = []

    def taking_time(name, fn):
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            if name == "png":
                frames_seen.append(args[0].shape)
            clock.now += next(calls[name])
            return out
        return timed

    for name, attr in (("validate", "validate_events"), ("render", "render_event_frames"), ("png", "encode_png")):
        monkeypatch.setattr(pe, attr, taking_time(name, getattr(pe, attr)))
    n = 2_000
    result = pe.benchmark_rendering(num_events=n, num_frames=2, height=H, width=W, repeats=3)
    assert result["render_meps_median"] == pytest.approx(n / 0.5 / 1e6)
    assert result["render_meps_min"] == pytest.approx(n / 1.0 / 1e6)
    assert result["render_meps_max"] == pytest.approx(n / 0.25 / 1e6)
    assert result["validate_meps_median"] == pytest.approx(n / 0.5 / 1e6)
    assert result["png_encode_ms_per_clip_median"] == pytest.approx(3.0)
    assert frames_seen == [(H, W, 3)] * 8  # warm-up + 3 repeats, 2 frames each, at the asked size
    assert all(next(it, None) is None for it in calls.values())  # every step ran exactly as often as said
    assert (result["num_events"], result["num_frames"], result["repeats"]) == (n, 2, 3)


def test_dataset_without_clips_is_an_error(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "index.json").write_text("[]")
    with pytest.raises(UserError, match="no clips to render"):
        run_main(["--dataset_dir", str(tmp_path / "ds"), "--allow_pickle"])
    assert not (tmp_path / "ds" / "train" / "event_image").exists()


def test_cli_subprocess(tmp_path):
    good = {"x": np.array([1]), "y": np.array([2]), "t": np.array([0]), "p": np.array([1])}
    make_dataset(tmp_path / "ds", {"000000": good})
    cmd = [sys.executable, str(ROOT / "preprocess_event_images.py"), "--dataset_dir", str(tmp_path / "ds")]
    proc = subprocess.run([*cmd, "--allow_pickle"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = tmp_path / "ds" / "train" / "event_image" / "seq_000"
    assert (read_png(frames / "000000_0.png") == 255).all()  # 1 event // 5 slices: the first four are empty
    assert tuple(read_png(frames / "000000_4.png")[2, 1]) == RED
    assert "1 written" in proc.stderr
    proc = subprocess.run([*cmd, "--split", "val"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")


# --------------------------------------------------------------------------- as a script: one counted line per bad file


def run_script(*argv: str) -> subprocess.CompletedProcess:
    """The stage run as users run it: `__main__`, so its error classes are the ones clip_data raises only if
    no second copy of a module is loaded (the bug this guards against doubled or escaped them)."""
    cmd = [sys.executable, str(ROOT / "preprocess_event_images.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def the_failure_line(proc: subprocess.CompletedProcess, bad: Path) -> str:
    """The run's one error line; it names `bad` once, and nothing else went wrong (exit code 1: clips failed)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert "failed: " in line and line.count(str(bad)) == 1, line  # named, and the message not doubled
    assert "EventFileError" not in line, line  # caught as the stage's own error, not as an unexpected one
    assert re.search(r"\b1 failed\b", proc.stderr), proc.stderr  # counted in the summary
    return line


@pytest.mark.parametrize("broken", ["not_hdf5", "no_ms_to_idx", "bad_polarity"])
def test_script_input_dir_counts_a_malformed_events_h5(tmp_path, broken):
    import h5py

    t = np.arange(0, 1_200_000, 1000, dtype=np.uint32)  # one complete 1 s clip
    x, y, p = (t // 1000 % W).astype(np.uint16), np.zeros(len(t), np.uint16), np.ones(len(t), np.uint8)
    write_dsec_h5(tmp_path / "in" / "good_seq" / "events" / "left" / "events.h5", t, x, y, p)
    bad = tmp_path / "in" / "bad_seq" / "events" / "left" / "events.h5"
    if broken == "not_hdf5":
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not hdf5 at all")
    elif broken == "no_ms_to_idx":
        bad.parent.mkdir(parents=True)
        with h5py.File(bad, "w") as f:
            for name in ("x", "y", "t", "p"):
                f.create_dataset(f"events/{name}", data=np.zeros(3, np.int64))
    else:  # readable, but its one clip holds a polarity of 5
        write_dsec_h5(bad, t, x, y, np.full(len(t), 5, np.uint8))
    out = tmp_path / "out"
    proc = run_script("--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--height", str(H),
                      "--width", str(W), "--num_frames", "2", "--num_workers", "0")
    line = the_failure_line(proc, bad)
    expected = {"not_hdf5": "cannot open as HDF5", "no_ms_to_idx": "missing datasets",
                "bad_polarity": "polarity must be 1"}[broken]
    assert expected in line
    assert sorted(q.name for q in (out / "good_seq").iterdir()) == ["000000_0.png", "000000_1.png"]
    assert not (out / "bad_seq").exists()
    assert json.loads((out / "manifest.json").read_text())["last_run"]["failed"] == 1


@pytest.mark.parametrize("workers", ["0", "2"])
def test_script_dataset_dir_counts_a_malformed_npy(tmp_path, workers):
    import clip_data
    import toy_dataset

    root = tmp_path / "toy"
    toy_dataset.write_toy_dataset(root, num_sequences=(1, 1, 0), clips_per_sequence=2, height=48, width=64,
                                  fps=10, progress=False)
    records = clip_data.load_index(root, "train")
    bad = clip_data.clip_paths(root, "train", records[0])["events"]
    bad.write_bytes(bad.read_bytes()[:-20])  # truncated
    proc = run_script("--dataset_dir", str(root), "--allow_pickle", "--num_workers", workers)
    assert "probably truncated" in the_failure_line(proc, bad)
    written, blank = map(int, re.search(r"(\d+) written, (\d+) blank", proc.stderr).groups())
    assert written + blank == 3, proc.stderr  # the other train clip and both val clips
    for split in ("train", "val"):
        for rec in clip_data.load_index(root, split):
            frames = clip_data.clip_paths(root, split, rec)["event_images"]
            assert all(f.is_file() for f in frames) == ((split, rec["id"]) != ("train", records[0]["id"])), rec["id"]
