"""From DSEC's native layout to a live benchmark, on the quick toy world: `make_toy_world.py --layout dsec`,
`prepare_dsec_index.py --dsec_root`, then every stage on the folder it wrote, each output checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import benchmark_e2e_wallclock as bench
import extract_hidden_states as ehs
import extract_vl_lm_head
import make_toy_world
import prepare_dsec_index as prep
import preprocess_event_images as pei
import train_hidden_adapter as tha
from adapter_checkpoint import load_adapter
from clip_data import check_data_folder, load_index, load_questions
from hidden_data import load_manifest
from toy_dataset import question_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_native_layout_runs_to_a_live_benchmark(quick_world: Path, tmp_path: Path) -> None:
    world = tmp_path / "toy_dsec"
    shutil.copytree(quick_world, world)  # its models are up to date: only the native layout is written
    make_toy_world.main(make_toy_world.parse_args(["--output_dir", str(world), "--quick", "--threads", "2",
                                                   "--layout", "dsec"]))
    assert sorted(p.name for p in (world / "dsec").iterdir()) == ["test_events", "test_images", "train_events",
                                                                  "train_images"]
    data = world / "dataset"  # the done-when commands: the cut clips replace the toy world's own index
    stale = data / "train" / "event_image" / "seq_000" / "000000_0.png"
    assert stale.is_file()  # rendered from the toy clips; cutting again must not leave it to be reused
    assert prep.main(prep.parse_args(["--dsec_root", str(world / "dsec"), "--output_dir", str(data)])) == 0
    sizes = {s: len(load_index(data, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 3, "test": 3}  # two train recordings: one becomes val
    assert load_questions(data) == question_texts()  # an existing questions.json is kept (no --questions)
    assert all("event_h5" in r for r in load_index(data, "test")) and not stale.exists()

    # events are read from the h5 by each record's range: no pickled .npy, so no --allow_pickle
    assert pei.main(pei.parse_args(["--dataset_dir", str(data), "--num_workers", "0"])) == 0
    assert check_data_folder(data, ["train", "val", "test"], num_event_images=5)["questions"] == 10

    models = world / "models"
    hidden = tmp_path / "hidden"
    for split in ("train", "val", "test"):
        assert ehs.main(ehs.parse_args([
            "--split", split, "--chunked", "--chunk_size", "4", "--batch_size", "4", "--teacher_forced",
            "--dataset_dir", str(data), "--output_dir", str(hidden / split),
            "--egpt_model", str(models / "eventgpt"), "--vl_model", str(models / "video_llava"),
            "--max_questions", "2", "--max_new_tokens", "6", "--device", "cpu", "--dtype", "fp32"])) == 0
        manifest = load_manifest(hidden / split)
        assert manifest["num_samples"] == 2 * sizes[split]
    extract_vl_lm_head.main(extract_vl_lm_head.parse_args(
        ["--vl_model", str(models / "video_llava"), "--output", str(hidden / "head.pt"), "--device", "cpu"]))

    result = tha.main(tha.parse_args([
        "--train_data", str(hidden / "train"), "--val_data", str(hidden / "val"), "--adapter_level", "B1",
        "--pairs", "teacher_forced", "--lm_head", str(hidden / "head.pt"), "--output_dir", str(tmp_path / "tasks"),
        "--num_epochs", "1", "--batch_size", "8", "--device", "cpu", "--no_progress"]))
    ckpt = Path(result["run_dir"]) / "best_model.pt"
    adapter, extra = load_adapter(ckpt)
    assert adapter.config.name == "B1" and extra["pairs"] == "teacher_forced"

    out = tmp_path / "e2e"
    assert bench.main(bench.parse_args([
        "--dataset_dir", str(data), "--egpt_model", str(models / "eventgpt"), "--vl_model", str(models / "video_llava"),
        "--configs", "target,decode", "--decode_adapter", str(ckpt), "--max_samples", "2", "--max_new_tokens", "6",
        "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output_dir", str(out)])) == 0
    e2e = json.loads((out / "e2e_wallclock.json").read_text())
    assert e2e["lossless_checked"] and {"target", "decode[B1]"} <= set(e2e["configs"])
    for name, res in e2e["configs"].items():
        assert res["tokens_per_s"] > 0, name
