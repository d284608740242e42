"""Paired hidden-state extraction on the quick toy world: correctness against direct forwards,
batching, resuming after a kill, sharding, failures, and the LM head file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import extract_hidden_states as ehs
import extract_vl_lm_head
import hidden_data
from clip_data import load_index, load_questions
from common import UserError
from hidden_data import chunk_name, iter_chunks, load_chunk, load_manifest
from model_builders import load_eventgpt, load_video_llava
from tests.conftest import ROOT

T = 8  # max_new_tokens in these tests


def args_for(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--split", "train", "--dataset_dir", str(world / "dataset"), "--output_dir", str(out),
            "--egpt_model", str(world / "models" / "eventgpt"), "--vl_model", str(world / "models" / "video_llava"),
            "--max_questions", "2", "--max_new_tokens", str(T), "--device", "cpu", "--dtype", "fp32", *extra]


def extract(world: Path, out: Path, *extra: str) -> int:
    return ehs.main(ehs.parse_args(args_for(world, out, *extra)))


def merged(out: Path, teacher_forced: bool = False) -> dict[str, object]:
    """All chunks of a folder concatenated, rows sorted by sample id."""
    chunks = list(iter_chunks(out, teacher_forced))
    ids = [i for c in chunks for i in c["sample_ids"]]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    result: dict[str, object] = {"sample_ids": [ids[i] for i in order]}
    for key, value in chunks[0].items():
        if isinstance(value, torch.Tensor):
            result[key] = torch.cat([c[key] for c in chunks])[order]
    return result


def assert_same_data(a: dict[str, object], b: dict[str, object], tol: float = 2e-2) -> None:
    """Every key of two merged folders agrees: ids, tokens, masks and counts exactly, every hidden state
    (drafter, target, teacher-forced) within fp16 tolerance (other processes may round differently)."""
    assert a.keys() == b.keys()
    assert a["sample_ids"] == b["sample_ids"]
    for key in a:
        if key == "sample_ids":
            continue
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key].float(), b[key].float(), atol=tol, rtol=tol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def runners(quick_world):
    models = quick_world / "models"
    return (load_eventgpt(models / "eventgpt", device="cpu", dtype="fp32"),
            load_video_llava(models / "video_llava", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def batched(quick_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("batched")
    assert extract(quick_world, out, "--chunked", "--chunk_size", "4", "--batch_size", "3", "--teacher_forced") == 0
    return out


def test_manifest_describes_the_data(batched, quick_world):
    manifest = load_manifest(batched)
    clips = load_index(quick_world / "dataset", "train")
    assert manifest["complete"] and manifest["num_samples"] == len(clips) * 2
    assert manifest["questions"] == load_questions(quick_world / "dataset", 2)
    assert manifest["dtypes"]["vl_hidden"] == "float16" and manifest["teacher_forced"]
    assert manifest["models"]["target"]["hidden_size"] == manifest["widths"]["target"]
    assert len(manifest["chunks"]) == -(-manifest["num_samples"] // 4)
    chunk = load_chunk(batched / manifest["chunks"][0]["file"], expect_teacher_forced=True)
    assert chunk["vl_hidden"].dtype == torch.float16 and chunk["vl_hidden"].shape[1] == T


def test_stored_states_equal_a_direct_forward(batched, quick_world, runners):
    """The state stored for token t equals the state of one forward pass over prompt + answer."""
    egpt, vl = runners
    data = merged(batched, teacher_forced=True)
    clips = {c["id"]: c for c in load_index(quick_world / "dataset", "train")}
    questions = load_questions(quick_world / "dataset", 2)
    split_dir = quick_world / "dataset" / "train"
    for row in range(len(data["sample_ids"])):
        clip_id, q = data["sample_ids"][row].split("#q")
        for key, runner in (("egpt", egpt), ("vl", vl)):
            inputs = runner.build_inputs([runner.clip_features(split_dir, clips[clip_id])], [questions[int(q)]])
            tokens, mask = data[f"{key}_tokens"][row].long(), data[f"{key}_mask"][row]
            n = int(mask.sum())
            full = torch.cat([inputs.inputs_embeds, runner.embed_ids(tokens[None, : n - 1])], dim=1)
            direct = runner.prefill(type(inputs)(full, torch.ones(1, full.shape[1], dtype=torch.long))).hidden[0]
            plen = inputs.inputs_embeds.shape[1]
            torch.testing.assert_close(data[f"{key}_hidden"][row, :n].float(), direct[plen - 1 : plen - 1 + n],
                                       atol=2e-2, rtol=2e-2)
            assert torch.all(data[f"{key}_hidden"][row, n:] == 0)
        # Teacher-forced drafter states: EventGPT reading the target's answer.
        inputs = egpt.build_inputs([egpt.clip_features(split_dir, clips[clip_id])], [questions[int(q)]])
        n = int(data["vl_mask"][row].sum())
        vt = data["vl_tokens"][row, : n - 1].long()
        full = torch.cat([inputs.inputs_embeds, egpt.embed_ids(vt[None])], dim=1)
        direct = egpt.prefill(type(inputs)(full, torch.ones(1, full.shape[1], dtype=torch.long))).hidden[0]
        plen = inputs.inputs_embeds.shape[1]
        torch.testing.assert_close(data["egpt_hidden_tf"][row, :n].float(), direct[plen - 1 : plen - 1 + n],
                                   atol=2e-2, rtol=2e-2)


def test_lm_head_reproduces_stored_tokens(batched, quick_world, tmp_path):
    head_path = tmp_path / "head.pt"
    head = extract_vl_lm_head.main(extract_vl_lm_head.parse_args(
        ["--vl_model", str(quick_world / "models" / "video_llava"), "--output", str(head_path)]))
    assert head_path.is_file() and head["weight"].dtype == torch.float16
    loaded = hidden_data.load_lm_head(head_path, hidden_dim=head["hidden_dim"])
    data = merged(batched)
    logits = data["vl_hidden"].float() @ loaded["weight"].float().T
    mask = data["vl_mask"]
    assert mask.any()
    agree = (logits.argmax(-1) == data["vl_tokens"].long())[mask]
    assert agree.float().mean() == 1.0
    with pytest.raises(UserError, match="width"):
        hidden_data.load_lm_head(head_path, hidden_dim=head["hidden_dim"] + 1)


def test_lm_head_file_equals_the_loaded_model_head(quick_world, runners, tmp_path):
    head = extract_vl_lm_head.extract(str(quick_world / "models" / "video_llava"))
    torch.testing.assert_close(head["weight"].float(), runners[1].lm_head_weight().half().float())
    assert head["vocab_size"] == runners[1].vocab_size


def test_batched_equals_one_by_one(batched, quick_world, tmp_path):
    single = tmp_path / "single"
    assert extract(quick_world, single, "--chunked", "--chunk_size", "4", "--batch_size", "1", "--teacher_forced") == 0
    assert_same_data(merged(batched, True), merged(single, True))


def test_killed_run_resumes_to_the_same_chunks(quick_world, tmp_path):
    """SIGKILL mid-run, rerun: finished chunks are kept untouched and the result equals a clean run."""
    flags = ("--chunked", "--chunk_size", "1", "--batch_size", "1", "--teacher_forced", "--max_new_tokens", "40")
    out = tmp_path / "killed"
    cmd = [sys.executable, "extract_hidden_states.py", *args_for(quick_world, out, *flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "shard_000-of-001.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.is_file() and len(json.loads(shard.read_text())["chunks"]) >= 2:
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {c["file"] for c in json.loads(shard.read_text())["chunks"]}
    assert killed and 2 <= len(done_before) < 6, "the run finished before it could be killed"
    with pytest.raises(UserError):
        load_manifest(out)  # no manifest yet, or one that says unfinished
    mtimes = {f: (out / f).stat().st_mtime_ns for f in done_before}
    assert extract(quick_world, out, *flags) == 0
    assert all((out / f).stat().st_mtime_ns == m for f, m in mtimes.items()), "finished chunks were redone"
    clean = tmp_path / "clean"
    assert extract(quick_world, clean, *flags) == 0
    assert_same_data(merged(out, True), merged(clean, True))
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == sorted(
        p.name for p in clean.iterdir() if p.suffix == ".pt")


def test_truncated_chunk_is_a_clear_error(batched, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(batched, copy)
    first = copy / chunk_name(0, 0)
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    with pytest.raises(UserError, match=r"chunk_s000_00000\.pt has \d+ bytes, the manifest says"):
        load_manifest(copy)
    with pytest.raises(UserError, match=r"cannot read hidden-state chunk .*chunk_s000_00000\.pt"):
        load_chunk(first)


def test_shards_together_equal_one_run(quick_world, batched, tmp_path):
    out = tmp_path / "sharded"
    for i in range(2):
        assert extract(quick_world, out, "--chunked", "--chunk_size", "4", "--batch_size", "3", "--teacher_forced",
                       "--num_shards", "2", "--shard_index", str(i)) == 0
    manifest = load_manifest(out)
    assert manifest["complete"] and set(manifest["shards"]) == {"shard_000-of-002", "shard_001-of-002"}
    assert_same_data(merged(out, True), merged(batched, True))


def test_bad_clip_is_named_counted_and_skipped(quick_world, tmp_path, capsys):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(quick_world / "dataset", world / "dataset")
    (world / "models").symlink_to(quick_world / "models")
    clips = load_index(world / "dataset", "train")
    bad_video = world / "dataset" / "train" / clips[1]["video"]
    good_bytes = bad_video.read_bytes()
    bad_video.write_bytes(b"not an mp4")
    out = tmp_path / "out"
    assert extract(world, out, "--chunked", "--chunk_size", "4", "--batch_size", "2") == 0
    manifest = load_manifest(out)
    assert [f["clip"] for f in manifest["failed_clips"]] == [clips[1]["id"]]
    assert manifest["num_samples"] == (len(clips) - 1) * 2
    assert clips[1]["id"] in capsys.readouterr().out
    strict = tmp_path / "strict"
    assert extract(world, strict, "--max_failures", "0") == 1
    # Fixing the file and rerunning retries the clip: both folders become whole.
    bad_video.write_bytes(good_bytes)
    assert extract(world, strict, "--max_failures", "0") == 0
    assert extract(world, out, "--chunked", "--chunk_size", "4", "--batch_size", "2") == 0
    for folder in (strict, out):
        manifest = load_manifest(folder)
        assert manifest["num_samples"] == len(clips) * 2 and not manifest["failed_clips"]


def test_rerun_with_other_settings_is_refused(batched, quick_world):
    with pytest.raises(UserError, match="different max_new_tokens"):
        ehs.main(ehs.parse_args([*args_for(quick_world, batched, "--chunked", "--chunk_size", "4",
                                           "--teacher_forced"), "--max_new_tokens", "9"]))


def test_cli_reports_missing_dataset(tmp_path):
    proc = subprocess.run([sys.executable, "extract_hidden_states.py", "--dataset_dir", str(tmp_path / "nope"),
                           "--egpt_model", "x", "--vl_model", "y", "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def test_accelerate_launch_shards_over_processes(quick_world, batched, tmp_path):
    """`accelerate launch` with two CPU processes: each takes its clips, the manifest joins them.

    The launcher that starts several processes is accelerate's multi-GPU one (`--cpu` alone starts
    one process without MPI), so the GPUs are hidden from it and its children: on a machine with one
    GPU, two processes would otherwise both claim it. The same run must give the same data as one
    process, key by key."""
    out = tmp_path / "accel"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "extract_hidden_states.py",
           *args_for(quick_world, out, "--chunked", "--chunk_size", "4", "--batch_size", "3", "--teacher_forced")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **CPU_ONLY_ENV})
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = load_manifest(out)
    assert set(manifest["shards"]) == {"shard_000-of-002", "shard_001-of-002"}
    assert all(m["device"].startswith("cpu") for m in manifest["models"].values())
    assert_same_data(merged(out, True), merged(batched, True))


def test_shard_without_clips_keeps_the_models_in_the_manifest(quick_world, tmp_path):
    out = tmp_path / "many"
    clips = load_index(quick_world / "dataset", "train")
    shards = len(clips) + 1  # the last shard gets no clip at all
    for i in range(shards):
        assert extract(quick_world, out, "--num_shards", str(shards), "--shard_index", str(i)) == 0
    manifest = load_manifest(out)
    assert manifest["complete"] and manifest["num_samples"] == len(clips) * 2
    assert manifest["models"]["target"]["name"] == "video_llava" and manifest["widths"]["drafter"] > 0


def test_rerun_of_a_killed_run_with_other_settings_is_refused(quick_world, tmp_path):
    """A run killed before it wrote its manifest still pins its settings in the shard file."""
    out = tmp_path / "killed"
    assert extract(quick_world, out, "--chunked", "--chunk_size", "2") == 0
    (out / "manifest.json").unlink()  # as if killed after the first chunks, before the final merge
    (out / chunk_name(0, 2)).unlink()
    with pytest.raises(UserError, match="different chunk_size"):
        extract(quick_world, out, "--chunked", "--chunk_size", "4")
    with pytest.raises(UserError, match="different num_shards"):
        extract(quick_world, out, "--chunked", "--chunk_size", "2", "--num_shards", "2", "--shard_index", "0")
    with pytest.raises(UserError, match="different egpt_dtype"):  # refused before the models load
        extract(quick_world, out, "--chunked", "--chunk_size", "2", "--dtype", "bf16")


def test_unrendered_event_frames_fail_and_name_the_render_command(quick_world, tmp_path, capsys):
    """A data set whose event frames were never rendered is refused before any model loads, with the
    command that renders them; with one clip rendered the others are counted as failed clips."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(quick_world / "dataset", world / "dataset", ignore=shutil.ignore_patterns("event_image"))
    (world / "models").symlink_to(quick_world / "models")
    out = tmp_path / "out"
    # Checked before any model loads: one line naming a missing frame and the render command, no folder.
    with pytest.raises(UserError, match=rf"_0\.png is missing.*preprocess_event_images\.py --dataset_dir "
                       rf"{re.escape(str(world / 'dataset'))}"):
        extract(world, out, "--chunked", "--chunk_size", "4")
    assert not out.exists()
    # One clip rendered: the check passes, the others are counted as failed clips.
    shutil.copytree(quick_world / "dataset" / "train" / "event_image" / "seq_000",
                    world / "dataset" / "train" / "event_image" / "seq_000",
                    ignore=lambda d, names: [n for n in names if not n.startswith("000000_")])
    assert extract(world, out, "--chunked", "--chunk_size", "4") == 0
    printed = capsys.readouterr().out
    assert f"preprocess_event_images.py --dataset_dir {world / 'dataset'}" in printed
    assert "2 clips failed" in printed and load_manifest(out)["num_samples"] > 0


def test_rerun_of_a_finished_folder_is_success(batched, quick_world, capsys):
    """Nothing new written because everything is already done is not the failure above."""
    assert extract(quick_world, batched, "--chunked", "--chunk_size", "4", "--batch_size", "3",
                   "--teacher_forced") == 0
    printed = capsys.readouterr().out
    assert "wrote 0 samples" in printed and "0 target tokens outside the drafter's vocabulary" in printed


def test_foreign_target_tokens_are_counted(runners, quick_world, monkeypatch):
    """Target ids the drafter's vocabulary lacks are fed as 0 and counted per sample, over valid
    positions only. The toy pair shares one vocabulary, so the drafter's is shrunk to create some."""
    egpt, vl = runners
    clips = load_index(quick_world / "dataset", "train")
    questions = load_questions(quick_world / "dataset", 2)
    split_dir = quick_world / "dataset" / "train"
    batch = [(0, 0), (0, 1), (1, 0)]
    feats = {k: v for c in (0, 1) for k, v in ehs.pair_features(egpt, vl, split_dir, clips[c], c).items()}
    plain = ehs.run_models(egpt, vl, batch, questions, feats, True, T)
    assert plain[ehs.FOREIGN_KEY].tolist() == [0, 0, 0]
    tokens, mask = plain["vl_tokens"].long(), plain["vl_mask"]
    limit = int(tokens[mask].median())  # about half of the valid target tokens fall outside
    expected = ((tokens >= limit) & mask).sum(1).tolist()
    assert sum(expected) > 0
    monkeypatch.setattr(egpt, "vocab_size", limit)
    out = ehs.run_models(egpt, vl, batch, questions, feats, True, T)
    assert out[ehs.FOREIGN_KEY].tolist() == expected
    # The teacher-forced states are those of the target's answer with the foreign ids replaced by 0.
    inputs = egpt.build_inputs([feats[("egpt", c)] for c, _ in batch], [questions[q] for _, q in batch])
    zeroed = torch.where(tokens >= limit, 0, tokens)
    want = egpt.teacher_forced_hidden(inputs, zeroed, mask).half()
    torch.testing.assert_close(out["egpt_hidden_tf"].float(), want.float(), atol=2e-2, rtol=2e-2)


def test_foreign_count_reaches_chunks_and_manifest(batched):
    manifest = load_manifest(batched)
    assert manifest["dtypes"][ehs.FOREIGN_KEY] == "int32"
    for entry in manifest["chunks"]:
        chunk = load_chunk(batched / entry["file"], expect_teacher_forced=True)
        drafter_vocab = manifest["models"]["drafter"]["vocab_size"]
        by_hand = ((chunk["vl_tokens"] >= drafter_vocab) & chunk["vl_mask"]).sum(1)
        assert chunk[ehs.FOREIGN_KEY].tolist() == by_hand.tolist()
        assert entry[ehs.FOREIGN_KEY] == int(by_hand.sum())


# ---------------------------------------------------------------- issue 19: inputs as the released code


FAST = ("--max_samples", "2", "--max_new_tokens", "2", "--batch_size", "2")


def test_manifest_records_frames_frame_pick_and_both_dtypes(quick_world, tmp_path):
    """The data says how its inputs were made: event-frame split and canvas (from the frames' own
    manifest), Video-LLaVA's frame picking, each model's dtype, and what was quantised."""
    out = tmp_path / "out"
    assert extract(quick_world, out, *FAST, "--egpt_dtype", "fp32", "--vl_dtype", "bf16") == 0
    manifest = load_manifest(out)
    assert manifest["event_frames"] == {"num_frames": 5, "split_mode": "count", "canvas": "slice",
                                        "height": None, "width": None}
    assert manifest["frame_pick"] == "floor"
    assert (manifest["egpt_dtype"], manifest["vl_dtype"]) == ("float32", "bfloat16")
    drafter, target = manifest["models"]["drafter"], manifest["models"]["target"]
    assert (drafter["dtype"], target["dtype"]) == ("float32", "bfloat16")
    assert (drafter["quant_scope"], target["quant_scope"], target["frame_pick"]) == ("none", "none", "floor")
    shard = json.loads((out / "shard_000-of-001.json").read_text())["settings"]
    assert shard["event_frames"]["split_mode"] == "count" and shard["vl_dtype"] == "bfloat16"


def test_resume_refuses_other_frames_picking_or_dtypes(quick_world, tmp_path):
    import shutil

    import preprocess_event_images as pe

    world = tmp_path / "world"
    shutil.copytree(quick_world / "dataset", world / "dataset")
    (world / "models").symlink_to(quick_world / "models")
    out = tmp_path / "out"
    assert extract(world, out, *FAST) == 0
    with pytest.raises(UserError, match="different frame_pick"):
        extract(world, out, *FAST, "--frame_pick", "round")
    with pytest.raises(UserError, match="different vl_dtype"):
        extract(world, out, *FAST, "--vl_dtype", "bf16")
    with pytest.raises(UserError, match=r"--num_event_frames 6 but .* holds 5 frames"):
        extract(world, tmp_path / "other", *FAST, "--num_event_frames", "6")
    # A folder written before these facts were recorded is refused too
    saved = {f: f.read_text() for f in (out / "manifest.json", out / "shard_000-of-001.json")}
    for record in saved:
        data = json.loads(record.read_text())
        for holder in (data, data.get("settings", {})):
            holder.pop("frame_pick", None)
        record.write_text(json.dumps(data))
    with pytest.raises(UserError, match="before frame_pick was recorded"):
        extract(world, out, *FAST)
    for record, text in saved.items():
        record.write_text(text)
    # The same clips with event frames cut by equal durations on the sensor canvas
    assert pe.main(pe.parse_args(["--dataset_dir", str(world / "dataset"), "--allow_pickle", "--num_workers", "0",
                                  "--split", "train", "--split_mode", "time", "--canvas", "sensor",
                                  "--overwrite"])) == 0
    with pytest.raises(UserError, match="different event_frames"):
        extract(world, out, *FAST)


# ----------------------------------------------------------------------------- hardening (issue 18)


def test_damaged_chunk_of_the_same_size_is_found_and_redone(batched, quick_world, tmp_path, capsys):
    """A chunk damaged in place (size kept) fails the verify command, and a rerun redoes it (its SHA-256 is
    checked before it is skipped); afterwards the folder verifies clean and holds the same data."""
    import shutil

    import hidden_data

    copy = tmp_path / "copy"
    shutil.copytree(batched, copy)
    victim = copy / chunk_name(0, 1)
    raw = bytearray(victim.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    victim.write_bytes(bytes(raw))
    runs_before = (copy / "log.txt").read_text().count("$ python ")
    problems = hidden_data.verify_folder(copy)
    assert len(problems) == 1 and chunk_name(0, 1) in problems[0] and "SHA-256" in problems[0]
    assert hidden_data.main(hidden_data.parse_args(["--verify", str(copy)])) == 1
    assert extract(quick_world, copy, "--chunked", "--chunk_size", "4", "--batch_size", "3", "--teacher_forced") == 0
    printed = capsys.readouterr().out
    assert "1 finished chunk(s) were damaged and redone" in printed and chunk_name(0, 1) in printed
    assert "wrote 2 samples" in printed and "4 already done" in printed, printed
    assert hidden_data.verify_folder(copy) == []
    assert_same_data(merged(copy, True), merged(batched, True))
    log_text = (copy / "log.txt").read_text()
    assert "damaged and redone" in log_text and log_text.count("$ python ") == runs_before + 1


def test_verify_flag_hashes_large_chunks_too(batched, quick_world, tmp_path, monkeypatch):
    """Chunks over the hash-on-skip size get the size check only, unless --verify."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(batched, copy)
    victim = copy / chunk_name(0, 0)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    monkeypatch.setattr(ehs, "HASH_ON_SKIP_BYTES", 10)
    flags = ("--chunked", "--chunk_size", "4", "--batch_size", "3", "--teacher_forced")
    before = victim.read_bytes()
    assert extract(quick_world, copy, *flags) == 0
    assert victim.read_bytes() == before  # size only: not noticed
    assert extract(quick_world, copy, *flags, "--verify") == 0
    assert victim.read_bytes() != before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_refused_cuda_device_leaves_no_output_folder(quick_world, tmp_path):
    out = tmp_path / "never"
    argv = args_for(quick_world, out)
    argv[argv.index("--device") + 1] = "cuda"
    with pytest.raises(UserError, match="no CUDA GPU"):
        ehs.main(ehs.parse_args(argv))
    assert not out.exists()


def test_extraction_folder_holds_the_run_log(batched):
    text = (batched / "log.txt").read_text()
    assert "$ python " in text and "extract train shard 0/1: wrote" in text
