"""Data-path benchmark at a tiny size: synthetic chunks in the real format, every pass reported."""

from __future__ import annotations

import json

import benchmark_training as bt
from hidden_data import ChunkStream, load_manifest


def test_tiny_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = bt.main(bt.parse_args(["--data_dir", str(tmp_path / "data"), "--size_gb", "0.003", "--hidden_dim", "32",
                                    "--chunk_size", "40", "--batch_size", "16", "--max_steps", "3",
                                    "--repeats", "2", "--device", "cpu", "--output", str(out)]))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    manifest = load_manifest(tmp_path / "data" / "train")  # the real format: the loader reads it
    assert manifest["num_samples"] == result["num_samples"] == int(0.003e9 / bt.bytes_per_sample(32))
    assert result["num_chunks"] == -(-result["num_samples"] // 40)
    stream = ChunkStream(tmp_path / "data" / "train", pairs="teacher_forced", batch_size=16)
    assert sum(b["mask"].shape[0] for b in stream.batches(0)) == result["num_samples"]
    for key in ("plain_read_gb_per_s", "loader_file_gb_per_s", "loader_samples_per_s", "loader_vs_plain_read"):
        assert 0 < result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    first_three = sum(b["mask"].shape[0] for b in ChunkStream(tmp_path / "data" / "train", pairs="teacher_forced",
                                                               batch_size=16, seed=0).batches(0, max_batches=3))
    for way in ("prefetch", "no_prefetch"):
        t = result["training"][way]
        assert t["steps"] == 3 and t["train_samples"] == first_three and len(t["runs"]) == 2
        assert 0 <= t["data_wait_share"]["min"] <= t["data_wait_share"]["max"] <= 1


def test_existing_chunks_are_reused(tmp_path):
    first = bt.write_synthetic(tmp_path / "train", 10, 4, 16, seed=0)
    stamp = (tmp_path / "train" / first["chunks"][0]["file"]).stat().st_mtime_ns
    again = bt.write_synthetic(tmp_path / "train", 10, 4, 16, seed=0)
    assert again == first and (tmp_path / "train" / first["chunks"][0]["file"]).stat().st_mtime_ns == stamp
