"""Paired hidden-state data between stages: chunk files plus a manifest.

A data folder written by `extract_hidden_states.py` looks like

    OUT/manifest.json                    merged view of every shard (what readers use)
    OUT/shard_000-of-002.json            one shard's progress: finished chunks, failures, done flag
    OUT/chunk_s000_00000.pt              chunk 0 of shard 0: a dict of tensors, see CHUNK_KEYS

Chunks and shard files are written atomically; the manifest is rebuilt from the shard files, so
it can always be regenerated (`merge_manifest`). Keys, shapes and dtypes: docs/DATA_FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common import UserError, atomic_torch_save, atomic_write_json, read_json, safe_torch_load

CHUNK_FORMAT = "xmodal_sd.hidden_chunk"
MANIFEST_FORMAT = "xmodal_sd.hidden_manifest"
FORMAT_VERSION = 1

# key -> (dtype, shape in words). Hidden states are fp16 to halve the reference's fp32 bytes.
CHUNK_KEYS: dict[str, tuple[torch.dtype, str]] = {
    "egpt_hidden": (torch.float16, "[N, T, D_drafter]"),
    "vl_hidden": (torch.float16, "[N, T, D_target]"),
    "egpt_tokens": (torch.int32, "[N, T]"),
    "vl_tokens": (torch.int32, "[N, T]"),
    "egpt_mask": (torch.bool, "[N, T]"),
    "vl_mask": (torch.bool, "[N, T]"),
    "question_idx": (torch.int32, "[N]"),
}
TEACHER_FORCED_KEY = "egpt_hidden_tf"  # drafter states on the target's tokens, [N, T, D_drafter] fp16

FIX_RERUN = "rerun extract_hidden_states.py with the same flags: it redoes unfinished chunks"


def chunk_name(shard: int, index: int) -> str:
    return f"chunk_s{shard:03d}_{index:05d}.pt"


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard_{shard:03d}-of-{num_shards:03d}.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_chunk(path: Path, tensors: dict[str, Tensor], sample_ids: list[str], clip_ids: list[str]) -> dict[str, Any]:
    """Write one chunk atomically; returns its manifest entry (file, count, bytes, sha256)."""
    n = len(sample_ids)
    for key, value in tensors.items():
        if value.shape[0] != n:
            raise ValueError(f"{key} has {value.shape[0]} rows for {n} samples")
    payload = {
        "format": CHUNK_FORMAT,
        "format_version": FORMAT_VERSION,
        "sample_ids": list(sample_ids),
        "clip_ids": list(clip_ids),
        **{k: v.contiguous() for k, v in tensors.items()},
    }
    atomic_torch_save(payload, path)
    return {"file": path.name, "num_samples": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def load_chunk(path: str | Path, expect_teacher_forced: bool = False) -> dict[str, Any]:
    """Load and validate a chunk; a truncated, foreign or inconsistent file raises one UserError line."""
    path = Path(path)
    chunk = safe_torch_load(path, "hidden-state chunk", FIX_RERUN)
    if not isinstance(chunk, dict) or chunk.get("format") != CHUNK_FORMAT:
        raise UserError(f"{path} is not a hidden-state chunk (no '{CHUNK_FORMAT}' tag); {FIX_RERUN}")
    if chunk.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has chunk format {chunk.get('format_version')}, expected {FORMAT_VERSION}; re-extract")
    keys = dict(CHUNK_KEYS)
    if expect_teacher_forced:
        keys[TEACHER_FORCED_KEY] = (torch.float16, "[N, T, D_drafter]")
    n = len(chunk.get("sample_ids", []))
    for key, (dtype, _) in keys.items():
        value = chunk.get(key)
        if not isinstance(value, Tensor):
            fix = "extract with --teacher_forced" if key == TEACHER_FORCED_KEY else FIX_RERUN
            raise UserError(f"{path} lacks '{key}' ({fix})")
        if value.dtype != dtype or value.shape[0] != n:
            raise UserError(f"{path}: '{key}' is {value.dtype} with {value.shape[0]} rows, expected {dtype} with {n}")
    return chunk


def merge_manifest(out_dir: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Rebuild manifest.json from every shard file present; `base` holds the run-wide facts."""
    shards = {}
    for f in sorted(out_dir.glob("shard_*-of-*.json")):
        shards[f.stem] = read_json(f, "shard progress file", FIX_RERUN)
    chunks = [c for s in shards.values() for c in s["chunks"]]
    described = [s for s in shards.values() if s.get("models")]
    if described:  # a shard that had nothing to do never loaded the models
        base = {**base, "models": described[0]["models"], "widths": described[0]["widths"]}
    failed = [x for s in shards.values() for x in s["failed"]]
    manifest = {
        **base,
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "shards": {
            k: {"done": s["done"], "num_chunks": len(s["chunks"]), "num_failed_clips": len(s["failed"])}
            for k, s in shards.items()
        },
        "complete": bool(shards) and len(shards) == base["num_shards"] and all(s["done"] for s in shards.values()),
        "chunks": chunks,
        "num_samples": sum(c["num_samples"] for c in chunks),
        "failed_clips": failed,
    }
    atomic_write_json(manifest, out_dir / "manifest.json")
    return manifest


def load_manifest(data_dir: str | Path, require_complete: bool = True) -> dict[str, Any]:
    """Read DIR/manifest.json and check every listed chunk exists with the recorded size."""
    data_dir = Path(data_dir)
    fix = "point to a folder written by extract_hidden_states.py"
    manifest = read_json(data_dir / "manifest.json", "hidden-state manifest", fix)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{data_dir / 'manifest.json'} is not a hidden-state manifest; {fix}")
    if require_complete and not manifest.get("complete"):
        raise UserError(f"{data_dir} is not finished (some shards are still running or were killed); {FIX_RERUN}")
    for c in manifest["chunks"]:
        f = data_dir / c["file"]
        if not f.is_file():
            raise UserError(f"{f} is listed in the manifest but missing; {FIX_RERUN}")
        if f.stat().st_size != c["bytes"]:
            raise UserError(
                f"{f} has {f.stat().st_size} bytes, the manifest says {c['bytes']} (truncated?); {FIX_RERUN}"
            )
    return manifest


def iter_chunks(data_dir: str | Path, expect_teacher_forced: bool = False) -> Iterator[dict[str, Any]]:
    """Yield validated chunks of a finished data folder in manifest order."""
    data_dir = Path(data_dir)
    for c in load_manifest(data_dir)["chunks"]:
        yield load_chunk(data_dir / c["file"], expect_teacher_forced)


def describe(manifest: dict[str, Any]) -> str:
    """One-line summary for logs."""
    return json.dumps({k: manifest[k] for k in ("split", "num_samples", "complete") if k in manifest})
