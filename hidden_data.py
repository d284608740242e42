"""Paired hidden-state data between stages: chunk files plus a manifest.

A data folder written by `extract_hidden_states.py` looks like

    OUT/manifest.json                    merged view of every shard (what readers use)
    OUT/shard_000-of-002.json            one shard's progress: finished chunks, failures, done flag
    OUT/chunk_s000_00000.pt              chunk 0 of shard 0: a dict of tensors, see CHUNK_KEYS

Chunks and shard files are written atomically; the manifest is rebuilt from the shard files, so
it can always be regenerated (`merge_manifest`). Keys, shapes and dtypes: docs/DATA_FORMAT.md.

Readers: `select_pairs` applies the pairing rule (free or teacher-forced drafter states, and the
mask that goes with each); `ChunkStream` streams a folder larger than RAM in batches (one chunk at a
time, memory mapped, reshuffled per epoch from the seed, next chunk read in the background, split
across DDP ranks) and `to_device` moves a batch to the compute device (docs/TRAINING.md).

Checking whole folders (manifest; every chunk's presence, size, SHA-256, keys and sample count),
without the models; exit code 1 and one line per problem when any is damaged:

    python hidden_data.py --verify data/toy/hidden/train data/toy/hidden/val data/toy/hidden/test
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from common import UserError, atomic_torch_save, atomic_write_json, first_line, read_json, safe_torch_load

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
# The target's states at the layers the manifest's `target_layers` names (EAGLE-3's low, middle, high), from the
# same generation as vl_hidden, [N, T, K, D_target] fp16 (extract_hidden_states.py --target_layers).
LAYERS_KEY = "vl_layers"

FIX_RERUN = ("rerun extract_hidden_states.py with the same flags plus --verify: it redoes unfinished and damaged "
             "chunks")
# Chunks up to this size are hashed whenever a rerun skips them (about a second of SHA-256); larger ones
# get the size check only, unless the rerun passes --verify.
HASH_ON_SKIP_BYTES = 1 << 30


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


def load_chunk(path: str | Path, expect_teacher_forced: bool = False, *, mmap: bool = False,
               expect_samples: int | None = None, expect_layers: bool = False) -> dict[str, Any]:
    """Load and validate a chunk; a truncated, foreign or inconsistent file raises one UserError line.

    mmap=True maps the file instead of reading it: tensors are read from disk when first touched, so
    a caller that needs some keys only reads those bytes (checks here look at shapes and dtypes only).
    `expect_samples`: the manifest's count for this chunk; a chunk holding another count is refused.
    `expect_layers`: the chunk must hold the target's layer states (LAYERS_KEY).
    """
    path = Path(path)
    chunk = _mmap_load(path) if mmap else safe_torch_load(path, "hidden-state chunk", FIX_RERUN)
    if not isinstance(chunk, dict) or chunk.get("format") != CHUNK_FORMAT:
        raise UserError(f"{path} is not a hidden-state chunk (no '{CHUNK_FORMAT}' tag); {FIX_RERUN}")
    if chunk.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has chunk format {chunk.get('format_version')}, expected {FORMAT_VERSION}; re-extract")
    keys = dict(CHUNK_KEYS)
    if expect_teacher_forced:
        keys[TEACHER_FORCED_KEY] = (torch.float16, "[N, T, D_drafter]")
    if expect_layers:
        keys[LAYERS_KEY] = (torch.float16, "[N, T, K, D_target]")
    n = len(chunk.get("sample_ids", []))
    if expect_samples is not None and n != expect_samples:
        raise UserError(f"{path} holds {n} samples but the manifest says {expect_samples}; {FIX_RERUN}")
    for key, (dtype, _) in keys.items():
        value = chunk.get(key)
        if not isinstance(value, Tensor):
            fix = ("extract with --teacher_forced" if key == TEACHER_FORCED_KEY
                   else "extract with --target_layers" if key == LAYERS_KEY else FIX_RERUN)
            raise UserError(f"{path} lacks '{key}' ({fix})")
        if value.dtype != dtype or value.shape[0] != n:
            raise UserError(f"{path}: '{key}' is {value.dtype} with {value.shape[0]} rows, expected {dtype} with {n}")
    return chunk


def _mmap_load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"hidden-state chunk not found: {path} ({FIX_RERUN})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, foreign file, old non-zip format: all one line
        raise UserError(f"cannot read hidden-state chunk {path}: {first_line(err)} ({FIX_RERUN})") from err


def merge_manifest(out_dir: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Rebuild manifest.json from every shard file present; `base` holds the run-wide facts."""
    shards = {}
    for f in sorted(out_dir.glob("shard_*-of-*.json")):
        shards[f.stem] = read_json(f, "shard progress file", FIX_RERUN)
    chunks = [c for s in shards.values() for c in s["chunks"]]
    described = [s for s in shards.values() if s.get("models")]
    if described:  # a shard that had nothing to do never loaded the models
        base = {**base, "models": described[0]["models"], "widths": described[0].get("widths"),
                "target_layers": described[0].get("target_layers")}
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


def load_manifest(data_dir: str | Path, require_complete: bool = True, check_files: bool = True) -> dict[str, Any]:
    """Read DIR/manifest.json and (check_files) check every listed chunk exists with the recorded size."""
    data_dir = Path(data_dir)
    fix = "point to a folder written by extract_hidden_states.py"
    manifest = read_json(data_dir / "manifest.json", "hidden-state manifest", fix)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{data_dir / 'manifest.json'} is not a hidden-state manifest; {fix}")
    if require_complete and not manifest.get("complete"):
        raise UserError(f"{data_dir} is not finished (some shards are still running or were killed); {FIX_RERUN}")
    if not isinstance(manifest.get("chunks"), list):
        raise UserError(f"{data_dir / 'manifest.json'} lists no chunks; {fix}")
    for c in manifest["chunks"] if check_files else ():
        f = data_dir / c["file"]
        if not f.is_file():
            raise UserError(f"{f} is listed in the manifest but missing; {FIX_RERUN}")
        if f.stat().st_size != c["bytes"]:
            raise UserError(
                f"{f} has {f.stat().st_size} bytes, the manifest says {c['bytes']} (truncated?); {FIX_RERUN}"
            )
    return manifest


def iter_chunks(data_dir: str | Path, expect_teacher_forced: bool = False, expect_layers: bool = False
                ) -> Iterator[dict[str, Any]]:
    """Yield validated chunks of a finished data folder in manifest order."""
    data_dir = Path(data_dir)
    for c in load_manifest(data_dir)["chunks"]:
        yield load_chunk(data_dir / c["file"], expect_teacher_forced, expect_samples=int(c["num_samples"]),
                         expect_layers=expect_layers)


def chunk_problem(data_dir: Path, entry: dict[str, Any], hash_it: bool, load: bool = False,
                  teacher_forced: bool = False, layers: bool = False) -> str | None:
    """Why the chunk a manifest or shard entry describes is not as recorded (None when it is): missing,
    another size, (with `hash_it`) no recorded SHA-256 or another one, (with `load`) unreadable or another
    sample count. Every entry `write_chunk` makes has a SHA-256: one without cannot be checked, so it counts."""
    f = Path(data_dir) / entry["file"]
    if not f.is_file():
        return "missing"
    if f.stat().st_size != entry["bytes"]:
        return f"{f.stat().st_size} bytes, {entry['bytes']} recorded (truncated?)"
    if hash_it and not entry.get("sha256"):
        return "no SHA-256 recorded, so its contents cannot be checked (a damaged or hand-edited entry)"
    if hash_it and file_sha256(f) != entry["sha256"]:
        return "SHA-256 differs from the recorded one (damaged)"
    if load:
        try:
            load_chunk(f, teacher_forced, mmap=True, expect_samples=int(entry["num_samples"]), expect_layers=layers)
        except UserError as err:
            return first_line(err, 400).removeprefix(str(f)).removeprefix(":").strip()
    return None


def verify_folder(data_dir: str | Path) -> list[str]:
    """Every problem of a data folder, one line each (empty when sound): the manifest, and each chunk's
    presence, size, SHA-256, readability, keys and sample count against it."""
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir, require_complete=False, check_files=False)
    except UserError as err:
        return [str(err)]
    problems = [] if manifest.get("complete") else [f"{data_dir}: not finished (some shards did not complete)"]
    if not manifest.get("widths"):
        problems.append(f"{data_dir / 'manifest.json'}: records no state widths (re-extract with this release)")
    chunks = manifest.get("chunks")
    if not isinstance(chunks, list):
        return [*problems, f"{data_dir / 'manifest.json'}: has no list of chunks (re-extract into a new folder)"]
    sound = []
    for i, entry in enumerate(tqdm(chunks, desc=f"verify {data_dir.name}", unit="chunk", disable=None, leave=False)):
        lacking = [k for k in ("file", "bytes", "num_samples") if not isinstance(entry, dict) or k not in entry]
        if lacking:
            problems.append(f"{data_dir / 'manifest.json'}: chunk entry {i} lacks {', '.join(lacking)} (damaged "
                            "manifest: rerun extract_hidden_states.py with the same flags to rebuild it)")
            continue
        sound.append(entry)
        why = chunk_problem(data_dir, entry, hash_it=True, load=True,
                            teacher_forced=bool(manifest.get("teacher_forced")),
                            layers=manifest_layer_ids(manifest) is not None)
        if why:
            problems.append(f"{data_dir / entry['file']}: {why}")
    counted = sum(int(c["num_samples"]) for c in sound)
    if manifest.get("num_samples") != counted:
        problems.append(f"{data_dir / 'manifest.json'}: num_samples {manifest.get('num_samples')} but its chunks "
                        f"list {counted}")
    return problems


def describe(manifest: dict[str, Any]) -> str:
    """One-line summary for logs."""
    return json.dumps({k: manifest[k] for k in ("split", "num_samples", "complete") if k in manifest})


# ----------------------------------------------------------------------------- the models behind the states
# The one "same models" rule: extraction refuses to add to a folder of other models' states, training refuses
# train and validation data of different models, evaluation refuses a checkpoint trained on other models' states
# and an LM head of another target. Each record names its models by config hash (vlm_runners.model_description).

MODEL_ROLES = ("drafter", "target")


def _model_records(described: Any) -> dict[str, dict[str, Any]]:
    """{role: {"config_hash": str, "dtype": str | None}} from a manifest, its `models`, a checkpoint's
    `extra["data"]` (which may hold the models' descriptions, their hashes, or a `models` entry)."""
    if not isinstance(described, dict):
        return {}
    if isinstance(described.get("models"), dict):
        described = described["models"]
    out: dict[str, dict[str, Any]] = {}
    for role in MODEL_ROLES:
        value = described.get(role) or described.get(f"{role}_config_hash")
        record = value if isinstance(value, dict) else {"config_hash": value}
        if isinstance(record.get("config_hash"), str):
            out[role] = {"config_hash": record["config_hash"], "dtype": record.get("dtype")}
    return out


def model_hashes(described: Any) -> dict[str, str]:
    """{"drafter": hash, "target": hash} of whatever a record holds (see `_model_records`)."""
    return {role: r["config_hash"] for role, r in _model_records(described).items()}


def differing_models(a: Any, b: Any, dtype: bool = False, strict: bool = False) -> list[str]:
    """The roles whose models differ between two records: another config hash, or with `dtype` another
    compute dtype where both record one. A role that either record lacks does not count, unless `strict`
    (extraction: a folder whose record lacks a model is not known to hold these models' states)."""
    ra, rb = _model_records(a), _model_records(b)
    out = []
    for role in MODEL_ROLES:
        x, y = ra.get(role), rb.get(role)
        if x is None or y is None:
            if strict and (x is None) != (y is None):
                out.append(role)
            continue
        if x["config_hash"] != y["config_hash"] or (dtype and x["dtype"] and y["dtype"] and x["dtype"] != y["dtype"]):
            out.append(role)
    return out


# ----------------------------------------------------------------------------- the LM head file
# Written by extract_vl_lm_head.py; read by training (the token input's embedding table, token metrics) and
# evaluation (token-level acceptance).

LM_HEAD_FORMAT = "xmodal_sd.lm_head"


def load_lm_head(path: str | Path, hidden_dim: int | None = None, need_embeddings: bool = False,
                 data: dict[str, Any] | None = None, data_name: str = "the data") -> dict[str, Any]:
    """Read an LM head file (extract_vl_lm_head.py): {"weight": [V, D] fp16, "embed_weight": [V, D] fp16 (the
    target's input embeddings, which token-input adapters look tokens up in), "vocab_size", "hidden_dim",
    "model", "config_hash"}. Checks the tag, (optionally) the width, with `need_embeddings` that it holds
    the input-embedding table (files from before it was stored do not), and with `data` (a manifest, or
    anything `model_hashes` reads) that it is the head of the target model that produced those states."""
    fix = "write it with extract_vl_lm_head.py --vl_model ... --output ..."
    return check_lm_head(safe_torch_load(path, "LM head", fix), path, hidden_dim, need_embeddings, data, data_name)


def check_lm_head(head: Any, path: str | Path, hidden_dim: int | None = None, need_embeddings: bool = False,
                  data: dict[str, Any] | None = None, data_name: str = "the data") -> dict[str, Any]:
    """`load_lm_head`'s checks of an LM head dict that came from `path` (a file, or a model folder read by
    model_builders.read_lm_head); returns it."""
    fix = "write it with extract_vl_lm_head.py --vl_model ... --output ..."
    if not isinstance(head, dict) or head.get("format") != LM_HEAD_FORMAT:
        raise UserError(f"{path} is not an LM head file; {fix}")
    weight = head.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UserError(f"{path} holds no [vocab, width] LM head weight; {fix}")
    if (head.get("vocab_size"), head.get("hidden_dim")) != tuple(weight.shape):
        raise UserError(f"{path} records vocab {head.get('vocab_size')} x width {head.get('hidden_dim')} but its "
                        f"weight is {list(weight.shape)} (a damaged or hand-edited file); {fix} --overwrite")
    embed = head.get("embed_weight")
    if isinstance(embed, torch.Tensor) and tuple(embed.shape) != tuple(weight.shape):
        raise UserError(f"{path}: input embeddings {list(embed.shape)} and LM head {list(weight.shape)} differ in "
                        f"shape; {fix} --overwrite")
    if need_embeddings and not isinstance(head.get("embed_weight"), torch.Tensor):
        raise UserError(f"{path} holds no input-embedding table (written by an older release), which adapters "
                        "with a token input read; rewrite it with extract_vl_lm_head.py --overwrite")
    if hidden_dim is not None and head["hidden_dim"] != hidden_dim:
        raise UserError(
            f"{path} has width {head['hidden_dim']} but the hidden states have width {hidden_dim}; "
            "extract the LM head of the model that produced the states"
        )
    want = model_hashes(data).get("target") if data is not None else None
    if want and head.get("config_hash") not in (None, want):
        raise UserError(f"{path} is the LM head of another target model than {data_name}'s (config hashes differ); "
                        "extract the head of the model that produced the states")
    return head


# ----------------------------------------------------------------------------- pairs and streaming


# ----------------------------------------------------------------------------- the target's layer states
# What a data folder records about the extra layers (EAGLE-3 features): manifest["target_layers"] =
# {"ids": [...], "num_layers": L, "rule": ..., "meaning": ...}; absent when extracted without them.


def manifest_layer_ids(manifest: dict[str, Any]) -> tuple[int, ...] | None:
    """The hidden-state indices of the target's layer states a data folder holds (LAYERS_KEY), None when
    it holds none."""
    record = manifest.get("target_layers")
    if not isinstance(record, dict) or not record.get("ids"):
        return None
    return tuple(int(i) for i in record["ids"])


def check_layer_ids(manifest: dict[str, Any], want: tuple[int, ...] | list[int], data_dir: str | Path,
                    fix: str) -> None:
    """Refuse (one UserError line) a data folder without the target's layer states, or with other layers than
    `want` (an adapter that fuses layers is trained, evaluated and drafted on one set)."""
    have = manifest_layer_ids(manifest)
    if have is None:
        raise UserError(f"{data_dir} holds no target layer states ('{LAYERS_KEY}'); re-extract with "
                        f"extract_hidden_states.py --target_layers auto, or {fix}")
    if tuple(have) != tuple(want):
        raise UserError(f"{data_dir} holds the target's layers {list(have)} but the adapter fuses layers {list(want)}; "
                        f"{fix}")


PAIRS = ("free", "teacher_forced")


def select_pairs(chunk: dict[str, Any], pairs: str) -> tuple[Tensor, Tensor]:
    """(drafter states [N, T, D], valid mask [N, T]) of one chunk for a pairing (docs/DATA_FORMAT.md):
    free = egpt_hidden where both models' masks hold; teacher_forced = egpt_hidden_tf where vl_mask holds."""
    if pairs == "free":
        return chunk["egpt_hidden"], chunk["egpt_mask"] & chunk["vl_mask"]
    if pairs == "teacher_forced":
        return chunk[TEACHER_FORCED_KEY], chunk["vl_mask"].clone()
    raise ValueError(f"unknown pairs {pairs!r}; valid: {', '.join(PAIRS)}")


def pair_keys(pairs: str, need_drafter: bool = True, need_layers: bool = False) -> tuple[str, ...]:
    """The chunk keys a pairing reads (drafter states left out when the adapter reads target states only; the
    target's layer states only for an adapter that fuses them)."""
    drafter = ("egpt_hidden",) if pairs == "free" else (TEACHER_FORCED_KEY,)
    masks = ("egpt_mask", "vl_mask") if pairs == "free" else ("vl_mask",)
    return (*(drafter if need_drafter else ()), "vl_hidden", *((LAYERS_KEY,) if need_layers else ()), "vl_tokens",
            *masks)


class ChunkStream:
    """Batches from a chunk folder larger than RAM, one chunk in memory at a time (plus the next).

    Each epoch has its own chunk order and in-chunk sample order, both derived from (seed, epoch),
    so a resumed run sees exactly the batches an uninterrupted one would. Under several processes
    each rank takes every `world_size`-th chunk of the epoch's order. Chunks are memory mapped and
    only the keys the pairing needs are read; a background thread reads the next chunk while the
    current one is consumed. Batches never span two chunks.

    A batch is a dict: `x` drafter states [B, T, D_drafter] (absent when need_drafter=False), `target`
    target states [B, T, D_target], `mask` [B, T] bool (the pairing's valid positions), `tokens` the
    target's greedy tokens [B, T] int64, with need_layers=True `layers` the target's layer states
    [B, T, K, D_target], all on the CPU as stored (fp16); `to_device` moves them.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        pairs: str,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        need_drafter: bool = True,
        drafter_dim: int | None = None,
        target_dim: int | None = None,
        prefetch: bool = True,
        pin_memory: bool = False,
        need_layers: bool = False,
    ):
        if pairs not in PAIRS:
            raise ValueError(f"unknown pairs {pairs!r}; valid: {', '.join(PAIRS)}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        if pairs == "teacher_forced" and not self.manifest.get("teacher_forced"):
            raise UserError(f"{self.data_dir} has no teacher-forced drafter states; extract it with "
                            "--teacher_forced or train with --pairs free")
        self.files = [self.data_dir / c["file"] for c in self.manifest["chunks"]]
        self.sizes = [int(c["num_samples"]) for c in self.manifest["chunks"]]
        # Cheap (headers only, memory mapped), so a chunk that holds other than the manifest's count stops
        # the run before any output is written instead of hours in.
        if need_layers and manifest_layer_ids(self.manifest) is None:
            raise UserError(f"{self.data_dir} holds no target layer states ('{LAYERS_KEY}'); re-extract it with "
                            "extract_hidden_states.py --target_layers auto")
        for path, n in zip(self.files, self.sizes, strict=True):
            load_chunk(path, pairs == "teacher_forced", mmap=True, expect_samples=n, expect_layers=need_layers)
        if not self.files or sum(self.sizes) == 0:
            raise UserError(f"{self.data_dir} holds no samples; extract this split first")
        if world_size > len(self.files):
            raise UserError(f"{self.data_dir} has {len(self.files)} chunk(s) for {world_size} processes; "
                            "extract with a smaller --chunk_size or launch fewer processes")
        self.pairs, self.batch_size, self.seed, self.shuffle = pairs, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.need_drafter, self.prefetch, self.pin_memory = need_drafter, prefetch, pin_memory
        self.need_layers = need_layers
        self.dims = {"drafter": drafter_dim, "target": target_dim}
        self.keys = pair_keys(pairs, need_drafter, need_layers)
        self.wait_s = 0.0  # time the consumer spent blocked on chunk reads (summed over epochs)

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def chunk_order(self, epoch: int, rank: int | None = None) -> list[int]:
        """Indices of the chunks this rank reads in `epoch`, in reading order."""
        order = list(range(len(self.files)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files)).tolist()
        return order[self.rank if rank is None else rank :: self.world_size]

    def num_batches(self, epoch: int, rank: int | None = None) -> int:
        return sum(-(-self.sizes[i] // self.batch_size) for i in self.chunk_order(epoch, rank))

    def samples_in_batches(self, epoch: int, rank: int, max_batches: int) -> int:
        """Samples in the first `max_batches` batches of `rank` in `epoch` (batches never span chunks)."""
        total = 0
        for i in self.chunk_order(epoch, rank):
            full = -(-self.sizes[i] // self.batch_size)
            take = min(full, max_batches)
            total += min(self.sizes[i], take * self.batch_size)
            max_batches -= take
            if max_batches <= 0:
                break
        return total

    def dropped_samples(self, epoch: int) -> int:
        """Samples that `even_num_batches` leaves unread in `epoch`: the ranks' batches beyond the smallest share."""
        even = self.even_num_batches(epoch)
        return sum(sum(self.sizes[i] for i in self.chunk_order(epoch, r)) - self.samples_in_batches(epoch, r, even)
                   for r in range(self.world_size))

    def even_num_batches(self, epoch: int) -> int:
        """Batches every rank can take in `epoch` (the smallest share): DDP needs equal step counts."""
        return min(self.num_batches(epoch, r) for r in range(self.world_size))

    def _read(self, index: int) -> dict[str, Tensor]:
        path = self.files[index]
        chunk = load_chunk(path, expect_teacher_forced=self.pairs == "teacher_forced", mmap=True,
                           expect_samples=self.sizes[index], expect_layers=self.need_layers)
        drafter, mask = select_pairs(chunk, self.pairs)
        for role, value in (("drafter", drafter), ("target", chunk["vl_hidden"])):
            want = self.dims[role]
            if want is not None and value.shape[-1] != want:
                raise UserError(f"{path}: {role} states are {value.shape[-1]} wide, expected {want} "
                                "(from the training data's manifest / the adapter); do not mix data of other models")
        out = {"target": chunk["vl_hidden"], "mask": mask, "tokens": chunk["vl_tokens"]}
        if self.need_drafter:
            out["x"] = drafter
        if self.need_layers:
            layers = chunk[LAYERS_KEY]
            if layers.dim() != 4 or layers.shape[-1] != chunk["vl_hidden"].shape[-1]:
                raise UserError(f"{path}: '{LAYERS_KEY}' is {list(layers.shape)}, expected [N, T, K, "
                                f"{chunk['vl_hidden'].shape[-1]}]; {FIX_RERUN}")
            out["layers"] = layers
        # reading happens here (the map is touched), in the background thread when prefetching
        return {k: v.clone() for k, v in out.items()}

    def _gather(self, value: Tensor, idx: Tensor) -> Tensor:
        """Rows `idx` of a chunk tensor; into page-locked memory for an asynchronous copy to a GPU
        (indexing a pinned tensor would give an unpinned result; torch caches the pinned blocks)."""
        if not self.pin_memory:
            return value[idx]
        out = torch.empty((len(idx), *value.shape[1:]), dtype=value.dtype, pin_memory=True)
        return torch.index_select(value, 0, idx, out=out)

    def batches(self, epoch: int, max_batches: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Yield this rank's batches of `epoch` (at most max_batches)."""
        from concurrent.futures import ThreadPoolExecutor

        order = self.chunk_order(epoch)
        done = 0
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        try:
            pending = pool.submit(self._read, order[0]) if pool else None
            for pos, index in enumerate(order):
                start = time.perf_counter()
                data = pending.result() if pending else self._read(index)
                self.wait_s += time.perf_counter() - start
                if pool and pos + 1 < len(order):
                    pending = pool.submit(self._read, order[pos + 1])
                n = self.sizes[index]
                perm = (torch.from_numpy(np.random.default_rng([self.seed, epoch, index]).permutation(n))
                        if self.shuffle else torch.arange(n))
                for b in range(0, n, self.batch_size):
                    if max_batches is not None and done >= max_batches:
                        return
                    idx = perm[b : b + self.batch_size]
                    yield {k: self._gather(v, idx) for k, v in data.items()}
                    done += 1
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)


def to_device(batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Move a ChunkStream batch to the device (fp16 over the bus, then `dtype` there), tokens as
    int64, and zero the states at padded positions so no NaN/inf in padding can reach a kernel."""
    non_blocking = device.type == "cuda"
    out = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    keep = out["mask"].bool()[..., None]
    for key in ("x", "target", "layers"):
        if key in out:
            value = out[key].to(dtype)
            if value is batch[key]:  # .to() was a no-op: do not write into the caller's tensor
                value = value.clone()
            where = ~keep if value.dim() == 3 else ~keep[..., None]  # layers: [B, T, K, D]
            out[key] = value.masked_fill_(where, 0.0)  # in place: 4x cheaper than masked_fill on CPU
    out["mask"] = out["mask"].bool()
    out["tokens"] = out["tokens"].long()
    return out


# ----------------------------------------------------------------------------- verify command


def parse_args(argv: list[str] | None = None) -> Any:
    """`python hidden_data.py --verify DIR [DIR ...]`: check whole data folders."""
    import argparse

    p = argparse.ArgumentParser(description="Check hidden-state data folders: manifest, and every chunk's "
                                "presence, size, SHA-256, keys and sample count.")
    p.add_argument("--verify", nargs="+", required=True, metavar="DIR",
                   help="data folders written by extract_hidden_states.py (e.g. data/hidden/train)")
    return p.parse_args(argv)


def main(args: Any) -> int:
    """Print one line per problem and a verdict per folder; 1 when any folder has a problem."""
    bad = 0
    for folder in args.verify:
        problems = verify_folder(folder)
        for line in problems:
            print(f"  {line}")
        if problems:
            print(f"{folder}: {len(problems)} problem(s); {FIX_RERUN}")
        else:
            print(f"{folder}: ok ({len(load_manifest(folder)['chunks'])} chunks, sizes and SHA-256 as recorded)")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main, parse_args)
