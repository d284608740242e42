"""What a new user gets for a bad input: one `error: ...` line naming the file or flag and the fix, a non-zero
exit, no traceback and no usage block; or, where a stage promises it, the bad item counted and skipped. Each
case runs the script as a user would (a subprocess), on the quick toy world of tests/conftest.py."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.test_cli_conventions import SCRIPTS

pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused run (log lines aside); fails on a traceback or a usage block."""
    out = done.stdout + done.stderr
    assert done.returncode != 0, f"exit 0:\n{out}"
    assert "Traceback" not in out, out
    assert "usage:" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.fixture(scope="module")
def world(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the quick world's data set (so files can be removed) beside its models."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(quick_world / "dataset", root / "dataset")
    (root / "models").symlink_to(quick_world / "models")
    return root


def models(world: Path) -> list[str]:
    return ["--egpt_model", str(world / "models" / "eventgpt"), "--vl_model", str(world / "models" / "video_llava")]


# ----------------------------------------------------------------------------- a missing video


def test_a_missing_video_is_counted_and_skipped_by_extraction_as_dry_run_says(world, tmp_path):
    index = json.loads((world / "dataset" / "train" / "index.json").read_text())
    gone = world / "dataset" / "train" / index[0]["video"]
    gone.unlink()
    common = ["--split", "train", "--dataset_dir", world / "dataset", *models(world), "--output_dir",
              tmp_path / "hidden", "--max_questions", "1", "--max_new_tokens", "4", "--device", "cpu",
              "--dtype", "fp32", "--chunked"]
    dry = run(ROOT / "extract_hidden_states.py", *common, "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert "1 of them missing files (extraction counts and skips them" in dry.stdout
    done = run(ROOT / "extract_hidden_states.py", *common)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out
    assert f"wrote {len(index) - 1} samples" in out and "1 clips failed" in out
    assert f"failed clip {index[0]['id']}: video not found: {gone}" in out
    manifest = json.loads((tmp_path / "hidden" / "manifest.json").read_text())
    assert manifest["num_samples"] == len(index) - 1 and manifest["complete"]


def test_a_missing_video_stops_the_live_benchmark_in_one_line(world, tmp_path):
    index = json.loads((world / "dataset" / "test" / "index.json").read_text())
    gone = world / "dataset" / "test" / index[0]["video"]
    gone.unlink()
    done = run(ROOT / "benchmark_e2e_wallclock.py", "--dataset_dir", world / "dataset", *models(world),
               "--configs", "target", "--max_samples", "1", "--max_new_tokens", "4", "--repeats", "1", "--warmup",
               "0", "--device", "cpu", "--output_dir", tmp_path / "e2e")
    line = one_error_line(done)
    assert str(gone) in line and "restore it, or drop its clip" in line


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_a_damaged_best_model_is_one_clear_line(world, tmp_path, damage):
    from adapter_checkpoint import save_adapter
    from hidden_adapter import create_adapter

    good = tmp_path / "good.pt"
    save_adapter(good, create_adapter("B1", 64))
    data = good.read_bytes()
    bad = tmp_path / "best_model.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "random bytes": os.urandom(4096), "empty": b""}[damage])
    done = run(ROOT / "benchmark_e2e_wallclock.py", "--dataset_dir", world / "dataset", *models(world),
               "--decode_adapter", bad, "--configs", "decode", "--device", "cpu", "--dry_run")
    line = one_error_line(done)
    assert f"cannot read adapter checkpoint {bad}: " in line
    assert {"truncated": "the file is truncated", "random bytes": "not a torch file",
            "empty": "the file is empty"}[damage] in line
    assert "weights_only" not in line and "train_hidden_adapter.py" in line  # torch's advice is never passed on


# ----------------------------------------------------------------------------- bad flags


def test_a_bad_number_is_one_line_not_a_usage_block(world):
    done = run(ROOT / "benchmark_e2e_wallclock.py", "--dataset_dir", world / "dataset", "--gamma_decode", "-1")
    assert one_error_line(done) == ("error: --gamma_decode must be >= 1 (python benchmark_e2e_wallclock.py --help "
                                    "lists the flags)")
    assert done.returncode == 2
    done = run(ROOT / "benchmark_e2e_wallclock.py", "--dataset_dir", world / "dataset", "--num_event_frames", "0")
    assert one_error_line(done).startswith("error: --num_event_frames must be >= 1")
    done = run(ROOT / "benchmark_e2e_wallclock.py", "--dataset_dir", world / "dataset", "--repeats", "two")
    assert "argument --repeats: invalid int value: 'two'" in one_error_line(done)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_stage_answers_a_bad_flag_in_one_line(path, monkeypatch):
    """run_cli's parser errors, for every script: an unknown flag is `error: ...` plus a pointer to --help on one
    line, exit 2 (in this process: the same code path a subprocess takes, one import of each script)."""
    module = importlib.import_module(path.stem)
    before = argparse.ArgumentParser.error
    monkeypatch.setattr(sys, "argv", [path.name, "--no_such_flag_here"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        from cli import run_cli

        run_cli(module.main, lambda: module.parse_args(None))
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert exit_.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"python {path.name} --help" in lines[0], lines
    assert argparse.ArgumentParser.error is before  # the one-line parser error is for run_cli's parse only


# ----------------------------------------------------------------------------- swapped model folders


@pytest.mark.parametrize(("flag", "given", "found"), [("--vl_model", "eventgpt", "EventChat_llama"),
                                                       ("--egpt_model", "video_llava", "video_llava")])
def test_a_model_folder_of_the_other_model_is_refused_before_loading(world, tmp_path, flag, given, found):
    argv = dict(zip(models(world)[::2], models(world)[1::2], strict=True))
    argv[flag] = str(world / "models" / given)
    done = run(ROOT / "extract_hidden_states.py", "--split", "train", "--dataset_dir", world / "dataset",
               *[x for kv in argv.items() for x in kv], "--output_dir", tmp_path / "out", "--device", "cpu")
    line = one_error_line(done)
    assert f"{flag} {world / 'models' / given}: config.json has model_type {found!r}" in line
    assert "loaded" not in done.stderr  # refused before either model loaded


# ----------------------------------------------------------------------------- DSEC frames before t_offset


def write_recording(root: Path, t_offset: int, frames_before: int) -> None:
    """A minimal DSEC recording: 2.5 s of events after t_offset, 20 fps frames from `frames_before` frames
    before t_offset on (as a camera that starts before the event sensor)."""
    import h5py
    from PIL import Image

    seq = "zurich_city_00_a"
    ev = root / "train_events" / seq / "events" / "left"
    ev.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.sort(rng.integers(0, 2_500_000, 20_000)).astype(np.int64)
    with h5py.File(ev / "events.h5", "w") as f:
        f["events/x"] = rng.integers(0, 640, t.size).astype(np.uint16)
        f["events/y"] = rng.integers(0, 480, t.size).astype(np.uint16)
        f["events/t"] = t.astype(np.uint32)
        f["events/p"] = rng.integers(0, 2, t.size).astype(np.uint8)
        f["ms_to_idx"] = np.searchsorted(t, np.arange(2501) * 1000).astype(np.uint64)
        f["t_offset"] = np.int64(t_offset)
    images = root / "train_images" / seq
    rect = images / "images" / "left" / "rectified"
    rect.mkdir(parents=True)
    stamps = [t_offset + (i - frames_before) * 50_000 for i in range(frames_before + 50)]
    for i in range(len(stamps)):
        Image.fromarray(np.full((24, 32, 3), 4 * i % 256, dtype=np.uint8)).save(rect / f"{i:06d}.png")
    (images / f"{seq}_image_timestamps.txt").write_text("\n".join(map(str, stamps)) + "\n")


def test_dsec_frames_before_t_offset_are_skipped_and_counted(tmp_path):
    """ms_to_idx starts at t_offset: a frame before it used to start a window at a negative millisecond, which
    indexed ms_to_idx from its end (an event range running backwards)."""
    write_recording(tmp_path / "dsec", t_offset=1_000_000, frames_before=10)
    out = tmp_path / "dataset"
    done = run(ROOT / "prepare_dsec_index.py", "--dsec_root", tmp_path / "dsec", "--output_dir", out,
               "--num_workers", "0")
    assert done.returncode == 0, done.stderr
    assert "skipped 10 frames before the first event (t_offset)" in done.stdout
    records = json.loads((out / "train" / "index.json").read_text())
    assert len(records) == 2  # [0, 1) s and [1, 2) s; the events end at 2.5 s
    for rec in records:
        assert rec["t0_us"] >= 0 and 0 <= rec["event_range"][0] < rec["event_range"][1]
        assert all(ft >= rec["t0_us"] for ft in rec["frame_times_us"])
    assert records[0]["t0_us"] == 0 and records[0]["frames"][0].endswith("000010.png")
    assert json.loads((out / "clip_index.json").read_text())["counts"]["frames_before_events"] == 10


# ----------------------------------------------------------------------------- manifests without a hash


def test_verify_reports_a_chunk_entry_without_a_sha256(quick_hidden, tmp_path):
    folder = tmp_path / "test"
    shutil.copytree(quick_hidden / "test", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["chunks"][0]
    del entry["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    done = run(ROOT / "hidden_data.py", "--verify", folder)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{folder / entry['file']}: no SHA-256 recorded, so its contents cannot be checked" in done.stdout
    assert "1 problem(s)" in done.stdout


def test_a_chunk_torch_cannot_read_names_the_problem(quick_hidden, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(quick_hidden / "train", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    chunk = folder / manifest["chunks"][0]["file"]
    chunk.write_bytes(chunk.read_bytes()[:-200])
    done = run(ROOT / "hidden_data.py", "--verify", folder)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{chunk}: " in done.stdout and "recorded (truncated?)" in done.stdout
