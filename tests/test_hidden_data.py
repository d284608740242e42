"""Pairing rule, streaming loader (orders, ranks, keys read, widths), chunk errors; plus `make_split`,
the hand-made data folder the training tests share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import UserError, atomic_torch_save, atomic_write_json
from hidden_data import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    ChunkStream,
    chunk_name,
    pair_keys,
    select_pairs,
    to_device,
    write_chunk,
)

D, T, V = 16, 6, 20


def make_split(out: Path, num_samples: int, chunk_size: int, *, seed: int = 0, dim: int = D, t: int = T,
               pad_value: float = 0.0, target_hash: str = "bbbb", layers: bool = True) -> Path:
    """A finished data folder in the extraction format: target states are a fixed nonlinear map of the
    drafter states (learnable), tokens are the argmax of the `write_head` LM head, answers of varied length.
    With `layers` also the target's states at three layers (ids 0, 1, 2 of a 2-layer target: the drafter-like
    input, a middle map, and the last state itself), as extraction's --target_layers stores them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)) / dim**0.5
    head = torch.randn(V, dim, generator=torch.Generator().manual_seed(98))
    out.mkdir(parents=True, exist_ok=True)
    entries, done = [], 0
    while done < num_samples:
        n = min(chunk_size, num_samples - done)
        egpt = torch.randn(n, t, dim, generator=g)
        vl = torch.tanh(egpt @ mix) + egpt.roll(1, dims=1) * 0.3  # needs the previous position too
        tf = egpt + 0.05 * torch.randn(n, t, dim, generator=g)
        vl_len = torch.randint(1, t + 1, (n,), generator=g)
        eg_len = torch.randint(1, t + 1, (n,), generator=g)
        pos = torch.arange(t)[None]
        vl_mask, eg_mask = pos < vl_len[:, None], pos < eg_len[:, None]
        tensors = {
            "egpt_hidden": egpt.masked_fill(~eg_mask[..., None], pad_value).half(),
            "vl_hidden": vl.masked_fill(~vl_mask[..., None], pad_value).half(),
            "egpt_hidden_tf": tf.masked_fill(~vl_mask[..., None], pad_value).half(),
            "egpt_tokens": torch.randint(0, V, (n, t), generator=g, dtype=torch.int32),
            "vl_tokens": (vl.float() @ head.T).argmax(-1).int(),
            "egpt_mask": eg_mask, "vl_mask": vl_mask,
            "question_idx": torch.zeros(n, dtype=torch.int32),
        }
        if layers:
            stack = torch.stack([egpt, torch.tanh(egpt @ mix), vl], dim=2)  # [n, t, 3, dim]
            tensors["vl_layers"] = stack.masked_fill(~vl_mask[..., None, None], pad_value).half()
        ids = [f"seq/{done + i}#q0" for i in range(n)]
        entries.append(write_chunk(out / chunk_name(0, len(entries)), tensors, ids, [i.split("#")[0] for i in ids]))
        done += n
    atomic_write_json({
        "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "split": out.name, "complete": True,
        "teacher_forced": True, "max_new_tokens": t, "chunks": entries, "num_samples": num_samples,
        "widths": {"drafter": dim, "target": dim},
        "models": {"drafter": {"config_hash": "aaaa", "hidden_size": dim},
                   "target": {"config_hash": target_hash, "hidden_size": dim}},
        **({"target_layers": {"ids": [0, 1, 2], "num_layers": 2}} if layers else {}),
    }, out / "manifest.json")
    return out


def write_head(path: Path, dim: int = D) -> Path:
    head = torch.randn(V, dim, generator=torch.Generator().manual_seed(98))
    embed = torch.randn(V, dim, generator=torch.Generator().manual_seed(97)) * 0.1  # the input embeddings
    atomic_torch_save({"format": "xmodal_sd.lm_head", "weight": head.half(), "embed_weight": embed.half(),
                       "vocab_size": V, "hidden_dim": dim, "model": "hand-made", "config_hash": "bbbb"}, path)
    return path


def ids_of(stream: ChunkStream, epoch: int) -> list[tuple[float, ...]]:
    """Sample identities in reading order: each sample's first target state (random, so unique)."""
    return [tuple(row.tolist()) for b in stream.batches(epoch) for row in b["target"][:, 0]]


# ----------------------------------------------------------------------------- pairing rule


def test_pairing_masks_by_hand():
    chunk = {
        "egpt_hidden": torch.zeros(1, 4, 2), "egpt_hidden_tf": torch.ones(1, 4, 2),
        "egpt_mask": torch.tensor([[True, True, False, False]]),
        "vl_mask": torch.tensor([[True, True, True, False]]),
    }
    x, m = select_pairs(chunk, "free")
    assert x.sum() == 0 and m.tolist() == [[True, True, False, False]]
    x, m = select_pairs(chunk, "teacher_forced")
    assert x.sum() == 8 and m.tolist() == [[True, True, True, False]]
    with pytest.raises(ValueError, match="free, teacher_forced"):
        select_pairs(chunk, "other")
    assert pair_keys("free", need_drafter=False) == ("vl_hidden", "vl_tokens", "egpt_mask", "vl_mask")


# ----------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("data") / "train", 23, 5)


def test_every_sample_once_per_epoch_in_a_new_order(split):
    stream = ChunkStream(split, pairs="teacher_forced", batch_size=2, seed=3)
    e0, e1 = ids_of(stream, 0), ids_of(stream, 1)
    assert len(e0) == 23 and sorted(e0) == sorted(e1) and e0 != e1
    again = ChunkStream(split, pairs="teacher_forced", batch_size=2, seed=3, prefetch=False)
    assert ids_of(again, 1) == e1  # same seed, same epoch: same order, with or without prefetch
    assert ids_of(ChunkStream(split, pairs="teacher_forced", batch_size=2, seed=4), 1) != e1
    plain = ChunkStream(split, pairs="teacher_forced", batch_size=2, shuffle=False)
    assert ids_of(plain, 0) == ids_of(plain, 5)
    assert stream.num_batches(0) == sum(-(-n // 2) for n in (5, 5, 5, 5, 3))


def test_ranks_split_chunks_and_agree_on_step_counts(split):
    streams = [ChunkStream(split, pairs="free", batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    parts = [ids_of(s, 2) for s in streams]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 23
    assert streams[0].even_num_batches(2) == streams[1].even_num_batches(2) == min(
        s.num_batches(2) for s in streams)
    with pytest.raises(UserError, match="5 chunk"):
        ChunkStream(split, pairs="free", batch_size=2, world_size=6)


def test_batches_hold_the_pairing_and_only_needed_keys(split):
    stream = ChunkStream(split, pairs="free", batch_size=4, shuffle=False, need_drafter=False)
    batch = next(stream.batches(0))
    assert set(batch) == {"target", "mask", "tokens"} and batch["target"].dtype == torch.float16
    chunk = torch.load(split / chunk_name(0, 0), weights_only=True)
    assert torch.equal(batch["mask"], (chunk["egpt_mask"] & chunk["vl_mask"])[:4])
    tf = next(ChunkStream(split, pairs="teacher_forced", batch_size=4, shuffle=False).batches(0))
    assert torch.equal(tf["x"], chunk["egpt_hidden_tf"][:4]) and torch.equal(tf["mask"], chunk["vl_mask"][:4])


def test_to_device_zeroes_padding_even_nan(tmp_path):
    nan_split = make_split(tmp_path / "nan", 4, 4, pad_value=float("nan"))
    batch = to_device(next(ChunkStream(nan_split, pairs="free", batch_size=4).batches(0)), torch.device("cpu"))
    assert torch.isfinite(batch["x"]).all() and torch.isfinite(batch["target"]).all()
    assert batch["x"].dtype == torch.float32 and batch["tokens"].dtype == torch.int64


# ----------------------------------------------------------------------------- errors name the file


def test_chunk_of_another_width_names_the_file(tmp_path):
    data = make_split(tmp_path / "d", 6, 3)
    wide = make_split(tmp_path / "w", 3, 3, dim=D + 8)
    (wide / chunk_name(0, 0)).replace(data / chunk_name(0, 1))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["chunks"][1]["bytes"] = (data / chunk_name(0, 1)).stat().st_size
    (data / "manifest.json").write_text(json.dumps(manifest))
    stream = ChunkStream(data, pairs="free", batch_size=4, shuffle=False, drafter_dim=D, target_dim=D)
    with pytest.raises(UserError, match=rf"{chunk_name(0, 1)}: drafter states are {D + 8} wide, expected {D}"):
        list(stream.batches(0))


def test_truncated_missing_and_unfinished_folders(tmp_path):
    data = make_split(tmp_path / "d", 6, 3)
    path = data / chunk_name(0, 1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=rf"{chunk_name(0, 1)} has 200 bytes.*truncated"):
        ChunkStream(data, pairs="free", batch_size=2)
    path.unlink()
    with pytest.raises(UserError, match=rf"{chunk_name(0, 1)} is listed in the manifest but missing"):
        ChunkStream(data, pairs="free", batch_size=2)
    other = make_split(tmp_path / "u", 3, 3)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError, match=r"u is not finished"):
        ChunkStream(other, pairs="free", batch_size=2)


def test_teacher_forced_pairs_need_teacher_forced_data(tmp_path):
    data = make_split(tmp_path / "d", 3, 3)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "teacher_forced": False}))
    with pytest.raises(UserError, match="--pairs free"):
        ChunkStream(data, pairs="teacher_forced", batch_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batches_reach_the_gpu_unchanged(split):
    pinned = ChunkStream(split, pairs="teacher_forced", batch_size=4, seed=2, pin_memory=True)
    plain = ChunkStream(split, pairs="teacher_forced", batch_size=4, seed=2)
    for a, b in zip(pinned.batches(0), plain.batches(0), strict=True):
        assert a["x"].is_pinned()
        on_gpu = to_device(a, torch.device("cuda"))
        assert torch.equal(on_gpu["x"].cpu(), to_device(b, torch.device("cpu"))["x"])


# ----------------------------------------------------------------------------- verify command (issue 18)


def test_verify_command_names_every_damaged_chunk(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    folder = make_split(tmp_path / "train", 12, 4)
    cmd = [sys.executable, str(ROOT / "hidden_data.py"), "--verify", str(folder)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ok (3 chunks" in ok.stdout, ok.stderr
    same_size = folder / chunk_name(0, 1)
    raw = bytearray(same_size.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    same_size.write_bytes(bytes(raw))
    (folder / chunk_name(0, 2)).unlink()
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = [line.strip() for line in bad.stdout.splitlines()]
    assert any(chunk_name(0, 1) in line and "SHA-256" in line for line in lines)
    assert any(chunk_name(0, 2) in line and "missing" in line for line in lines)
    assert "2 problem(s)" in lines[-1] and "--verify" in lines[-1]


def test_verify_reports_a_damaged_manifest_entry_as_one_line(tmp_path):
    from hidden_data import verify_folder

    folder = make_split(tmp_path / "train", 8, 4)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["chunks"][1]["bytes"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_folder(folder)
    assert any("chunk entry 1 lacks bytes" in p for p in problems)
