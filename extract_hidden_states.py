"""Extract paired last-layer hidden states of EventGPT (drafter) and Video-LLaVA (target).

For every (clip, question) both models answer greedily; for each generated position t we keep the
post-norm last-layer state that produced token t, both models' tokens and their valid masks (up to
and including EOS). With `--teacher_forced` EventGPT is also run on Video-LLaVA's answer, so that
drafter and target states at t share the same text prefix, as in live speculative decoding.
With `--target_layers` (default `auto`: EAGLE-3's low, middle and high layer for the target's depth) the
target's states at those layers are stored too, from the same generation (`vl_layers`), for the heads that
fuse them (E3, E3E); `--target_layers none` leaves them out.

    # toy world, CPU (minutes)
    python extract_hidden_states.py --split train --chunked --quant none \\
        --dataset_dir data/toy/dataset --egpt_model data/toy/models/eventgpt \\
        --vl_model data/toy/models/video_llava --output_dir data/toy/hidden/train \\
        --teacher_forced --batch_size 16 --chunk_size 64
    # real models on one 24 GB GPU
    python extract_hidden_states.py --split train --chunked --quant 4bit --dataset_dir DSEC_DIR \\
        --egpt_model EventGPT-7b --vl_model LanguageBind/Video-LLaVA-7B-hf --output_dir data/chunked_train_1s_4bit
    # several GPUs: one shard per process, chunks tied together by the manifest
    accelerate launch --num_processes 4 extract_hidden_states.py --split train --chunked ...

Both models see their released inputs by default: the event frames as preprocess_event_images.py
renders them (its manifest, recorded here), Video-LLaVA's frames picked as LanguageBind does
(`--frame_pick floor`), EventGPT in bf16 and Video-LLaVA in fp16 on CUDA (`--egpt_dtype`, `--vl_dtype`).

Reruns resume: finished chunks (recorded in the shard file) are skipped and only unfinished ones are
redone. A skipped chunk must have its recorded size, and its recorded SHA-256 when it is at most 1 GiB
(every chunk, plus a header read of its sample count, with `--verify`); a damaged one is redone and
counted. `python hidden_data.py --verify DIR` checks a whole folder without the models. Every run
appends what it printed, after its command line, to OUT/log.txt (OUT/log_s{shard}.txt per shard).
Writes are atomic. A missing or corrupt video or event frame is named, counted and skipped;
the run stops with exit code 1 once more than `--max_failures` clips failed, and also exits 1 when a
shard had clips to do but wrote no sample at all (e.g. event frames never rendered). Target tokens
the drafter's vocabulary lacks are fed to it as id 0 in the teacher-forced pass and counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cli import RunLog, add_config_flag, add_dry_run_flag, alias_help, dry_run_report, parse_with_config, run_cli
from common import UserError, atomic_write_json, read_json, set_seed
from hidden_data import (
    CHUNK_KEYS,
    FORMAT_VERSION,
    HASH_ON_SKIP_BYTES,
    LAYERS_KEY,
    TEACHER_FORCED_KEY,
    chunk_name,
    chunk_problem,
    differing_models,
    merge_manifest,
    shard_name,
    write_chunk,
)
from model_builders import add_model_args, check_model_args, load_runners, resolve_compute
from preflight import preflight
from vlm_runners import LAYER_IDS_MEANING, eagle3_layer_ids, model_description, to_drafter_vocab

log = logging.getLogger("xmodal_sd.extract")

# Per sample (int32 [N], with --teacher_forced): valid target positions whose token id the drafter's
# vocabulary lacks; the teacher-forced pass fed them to the drafter as id 0.
FOREIGN_KEY = "vl_tokens_foreign"

# Facts that must match between a rerun and the data already in --output_dir.
RUN_IDENTITY = (
    "split",
    "dataset_dir",
    "questions",
    "max_new_tokens",
    "teacher_forced",
    "chunk_size",
    "num_shards",
    "max_samples",
    "quant",
    "num_event_frames",
    "num_frames",
    "frame_pick",
    "event_frames",
    "egpt_dtype",
    "vl_dtype",
    "vision_tower",
    "target_layers_flag",
)
# Identity facts recorded since fidelity to the released preprocessing (issue 19): a record without
# them was made before, when the defaults were other ones, so resuming it is refused too.
RECORDED_SINCE_V19 = ("frame_pick", "event_frames")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split of the data set")
    p.add_argument("--dataset_dir", required=True, help="data set root holding {split}/index.json and questions.json")
    p.add_argument("--output_dir", default=None, help="where chunks and manifest go (default data/hidden/{split})")
    p.add_argument("--questions", "--questions_file", dest="questions_file", default=None,
                   help=alias_help("questions JSON (default DATASET_DIR/questions.json)", "--questions_file"))
    p.add_argument("--max_questions", type=int, default=10, help="use the first N (most frequent) questions per clip")
    p.add_argument("--max_samples", type=int, default=None, help="stop after this many (clip, question) samples")
    p.add_argument("--max_new_tokens", type=int, default=50, help="generated positions per answer (T)")
    p.add_argument(
        "--chunked",
        action="store_true",
        help="write chunk files of --chunk_size samples (without it: one chunk holding every sample)",
    )
    p.add_argument("--chunk_size", type=int, default=1000, help="samples per chunk file")
    p.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="samples generated together (left padding); a clip's vision features are shared",
    )
    add_model_args(p, required=True, random_shape=False, device_note=" (ignored under accelerate launch)")
    p.add_argument("--num_video_frames", "--num_frames", dest="num_frames", type=int, default=8,
                   help=alias_help("video frames sampled uniformly for Video-LLaVA", "--num_frames"))
    p.add_argument(
        "--teacher_forced",
        action="store_true",
        help="also store EventGPT states on Video-LLaVA's tokens (key egpt_hidden_tf)",
    )
    p.add_argument(
        "--num_shards",
        type=int,
        default=None,
        help="split clips over this many processes (default: accelerate's process count, else 1)",
    )
    p.add_argument("--shard_index", type=int, default=None, help="this process's shard (default: accelerate rank)")
    p.add_argument("--target_layers", default="auto",
                   help="also store the target's states at these hidden-state indices (key vl_layers; 0 = the "
                        "embeddings, i = the input of decoder layer i, L = the last layer after the final norm): "
                        "auto = EAGLE-3's low, middle and high layer for the target's depth (2, 16, 29 of 32 layers), "
                        "a comma list such as 2,16,29, or none")
    p.add_argument("--max_failures", type=int, default=10, help="stop (exit 1) once more clips than this failed")
    p.add_argument("--seed", type=int, default=0, help="random seed (generation is greedy; affects nothing else)")
    p.add_argument("--verify", action="store_true",
                   help="before skipping finished chunks, hash every one (not only those up to 1 GiB) and read its "
                   "sample count; damaged ones are redone")
    add_config_flag(p)
    add_dry_run_flag(p)
    args = parse_with_config(p, argv)
    for name in ("max_questions", "max_new_tokens", "chunk_size", "batch_size", "num_frames"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    if (args.num_shards is None) != (args.shard_index is None):
        p.error("--num_shards and --shard_index go together")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        p.error("--shard_index must be in [0, --num_shards)")
    try:
        args.target_layers = target_layers_flag(args.target_layers)
    except ValueError as err:
        p.error(str(err))
    args.output_dir = Path(args.output_dir or f"data/hidden/{args.split}")
    args.dataset_dir = Path(args.dataset_dir)
    check_model_args(p, args)
    return args


# ----------------------------------------------------------------------------- the target's layer states


def target_layers_flag(value: str) -> str:
    """--target_layers normalised: "auto", "none" or a comma list of distinct indices >= 0 ("2,16,29")."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"--target_layers takes auto, none or a comma list of distinct layer indices >= 0, "
                         f"got {value!r}")
    return ",".join(str(i) for i in ids)


def resolve_target_layers(flag: str, num_layers: int) -> tuple[int, ...]:
    """The hidden-state indices --target_layers names for a target of `num_layers` decoder layers (() for
    none); an index past the last layer is one UserError line."""
    if flag == "none":
        return ()
    ids = eagle3_layer_ids(num_layers) if flag == "auto" else tuple(int(x) for x in flag.split(","))
    if max(ids) > num_layers:
        raise UserError(f"--target_layers {flag}: the target has {num_layers} decoder layers, so indices go up to "
                        f"{num_layers} (= its last layer after the final norm)")
    return ids


def layer_record(flag: str, ids: tuple[int, ...], num_layers: int) -> dict[str, Any] | None:
    """What the manifest records about the stored layer states (hidden_data.manifest_layer_ids reads it)."""
    if not ids:
        return None
    rule = "EAGLE-3's low, middle and high layer (vlm_runners.eagle3_layer_ids)" if flag == "auto" else "given"
    return {"ids": list(ids), "num_layers": num_layers, "rule": rule, "meaning": LAYER_IDS_MEANING}


def check_layers_recorded(out_dir: Path, flag: str) -> None:
    """Refuse to add chunks with layer states to a folder whose earlier chunks were written without any record
    of them (an extraction from before --target_layers): its finished chunks lack the key."""
    if flag == "none":
        return
    for path in [out_dir / "manifest.json", *sorted(out_dir.glob("shard_*-of-*.json"))]:
        if path.is_file():
            old = read_json(path, "extraction record", "delete the folder")
            if "target_layers_flag" not in old.get("settings", old):
                raise UserError(f"{out_dir} holds data extracted without the target's layer states (see {path.name}); "
                                "use a new --output_dir or delete that folder, or pass --target_layers none")


def shard_samples(plan: list[tuple[int, int]], num_shards: int, shard: int) -> list[tuple[int, int]]:
    """Shard by clip, so a clip's vision features are computed by one process only."""
    return [s for s in plan if s[0] % num_shards == shard]


def resolve_shard(args: argparse.Namespace) -> tuple[int, int, Any]:
    """(num_shards, shard_index, accelerate state or None). Under `accelerate launch` the process
    rank and count decide; explicit flags win (e.g. several machines without a launcher)."""
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by `accelerate launch` (or torchrun)
        from accelerate import PartialState

        # Without a GPU the processes are CPU workers talking over gloo.
        state = PartialState(cpu=not torch.cuda.is_available())
    if args.num_shards is not None:
        return args.num_shards, args.shard_index, state
    if state is not None:
        return state.num_processes, state.process_index, state
    return 1, 0, None


def check_same_run(out_dir: Path, base: dict[str, Any], keys: tuple[str, ...],
                   required: tuple[str, ...] = RECORDED_SINCE_V19) -> None:
    """Refuse to mix data from different settings in one folder: the manifest and every shard
    progress file (written from the first chunk on, so a killed run is covered) must agree. A record
    lacking one of `required` predates it and is refused as well."""
    fix = "use a new --output_dir or delete that folder"
    records = [(out_dir / "manifest.json", "hidden-state manifest")]
    records += [(f, "shard progress file") for f in sorted(out_dir.glob("shard_*-of-*.json"))]
    for path, what in records:
        if not path.is_file():
            continue
        old = read_json(path, what, fix)
        old = old.get("settings", old)  # shard files keep the settings under "settings"
        for key in keys:
            if key in base and key in required and key not in old:
                raise UserError(f"{out_dir} holds data extracted before {key} was recorded (see {path.name}), "
                                f"probably with other event frames or video frames; {fix}")
            if key in base and key in old and old[key] != base[key]:
                raise UserError(f"{out_dir} holds data extracted with a different {key} ({old[key]!r} vs "
                                f"{base[key]!r}, see {path.name}); {fix}")


def run_models(
    egpt: Any,
    vl: Any,
    batch: list[tuple[int, int]],
    questions: list[str],
    feats: dict[tuple[str, int], torch.Tensor],
    teacher_forced: bool,
    max_new_tokens: int,
) -> dict[str, torch.Tensor]:
    """Generate one batch with both models from cached clip features; returns CPU tensors keyed like a chunk."""
    out: dict[str, torch.Tensor] = {}
    qs = [questions[q] for _, q in batch]
    egpt_inputs = None
    for key, runner in (("egpt", egpt), ("vl", vl)):
        inputs = runner.build_inputs([feats[(key, c)] for c, _ in batch], qs)
        gen = runner.generate(inputs, max_new_tokens)
        if key == "egpt":
            egpt_inputs = inputs
        # generate returns all max_new_tokens columns (pad id, zero state, mask False after EOS).
        out[f"{key}_hidden"] = gen.hidden.half().cpu()
        out[f"{key}_tokens"] = gen.tokens.int().cpu()
        out[f"{key}_mask"] = gen.mask.cpu()
        if key == "vl" and gen.layers is not None:  # vl.capture_layers: the same generation's layer states
            out[LAYERS_KEY] = gen.layers.half().cpu()
    if teacher_forced:
        mask = out["vl_mask"]
        tokens, _ = to_drafter_vocab(out["vl_tokens"].long(), egpt.vocab_size)
        hidden = egpt.teacher_forced_hidden(egpt_inputs, tokens.to(egpt.device), mask.to(egpt.device))
        out[TEACHER_FORCED_KEY] = hidden.half().cpu()
        # Counted per sample (the same rule as to_drafter_vocab, row by row) so that training can see them.
        out[FOREIGN_KEY] = torch.tensor([to_drafter_vocab(t, egpt.vocab_size, m)[1]
                                         for t, m in zip(out["vl_tokens"], mask, strict=True)], dtype=torch.int32)
    return out


def pair_features(egpt: Any, vl: Any, split_dir: Path, clip: dict, c: int) -> dict[tuple[str, int], torch.Tensor]:
    """Both models' visual embeddings of clip number `c`, keyed `("egpt"|"vl", c)` as `run_models` reads
    them. Raises `ClipReadError` naming the file when the clip's event frame or video is unreadable."""
    return {(key, c): runner.clip_features(split_dir, clip) for key, runner in (("egpt", egpt), ("vl", vl))}


def iter_batches(egpt: Any, vl: Any, samples: list[tuple[int, int]], clips: list[dict], split_dir: Path,
                 questions: list[str], batch_size: int, teacher_forced: bool, max_new_tokens: int,
                 on_clip_error: Callable[[str, Exception], None] | None = None,
                 ) -> Iterator[tuple[list[tuple[int, int]], dict[str, torch.Tensor] | None]]:
    """Generate `samples` (clip-major (clip, question) pairs) `batch_size` at a time.

    Each clip's vision features are computed once and dropped when its last sample is done. A clip
    whose files cannot be read is reported to `on_clip_error(clip_id, error)` (re-raised without
    one) and its samples are left out. Yields (samples of the batch that were generated, outputs);
    outputs is None when every sample of a batch was left out.
    """
    from clip_data import ClipReadError

    feats: dict[tuple[str, int], torch.Tensor] = {}
    failed: set[int] = set()
    for b in range(0, len(samples), batch_size):
        batch = [s for s in samples[b : b + batch_size] if s[0] not in failed]
        for c in dict.fromkeys(c for c, _ in batch):  # each clip once, in order
            try:
                if ("vl", c) not in feats:
                    feats.update(pair_features(egpt, vl, split_dir, clips[c], c))
            except ClipReadError as err:
                if on_clip_error is None:
                    raise
                on_clip_error(clips[c]["id"], err)
                failed.add(c)
        dropped = [s for s in batch if s[0] in failed]
        batch = [s for s in batch if s[0] not in failed]
        if dropped:
            yield dropped, None
        if not batch:
            continue
        out = run_models(egpt, vl, batch, questions, feats, teacher_forced, max_new_tokens)
        last = batch[-1][0]
        feats = {k: v for k, v in feats.items() if k[1] == last}
        yield batch, out


@dataclass
class ShardWork:
    """What one process extracts: its chunks of (clip, question) samples and where they go."""

    shard: int
    num_shards: int
    clips: list[dict]
    questions: list[str]
    split_dir: Path
    out_dir: Path
    chunks: list[list[tuple[int, int]]]  # this shard's samples, chunk by chunk

    @property
    def shard_file(self) -> Path:
        return self.out_dir / shard_name(self.shard, self.num_shards)


@dataclass
class ChunkLoopResult:
    written: int = 0  # samples written by this run
    foreign_tokens: int = 0  # target tokens outside the drafter's vocabulary (teacher-forced pass)
    failed_clips: set[str] = field(default_factory=set)
    stopped: bool = False  # more than --max_failures clips failed


def event_frame_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """How the split's event frames were rendered (their manifest), None when no manifest says so."""
    from event_frames import read_frame_settings

    root = args.dataset_dir / args.split / "event_image"
    settings = read_frame_settings(root)
    if settings is None:
        log.warning("no %s: how the event frames were rendered is not known, and not recorded", root / "manifest.json")
    elif args.num_event_frames > settings["num_frames"]:
        raise UserError(f"--num_event_frames {args.num_event_frames} but {root} holds {settings['num_frames']} frames "
                        "per clip; pass fewer, or re-render with preprocess_event_images.py --event_frames_per_clip")
    return settings


def run_settings(args: argparse.Namespace, work: ShardWork, num_planned: int, chunk_size: int,
                 dtypes: dict[str, torch.dtype] | None = None) -> dict[str, Any]:
    """The run-wide facts every shard file and the manifest record (RUN_IDENTITY pins a rerun to them).

    `dtypes`: each model's resolved compute dtype (by runner name); recorded as egpt_dtype/vl_dtype.
    """
    dtypes = dtypes or {}
    base = {
        "split": args.split,
        "dataset_dir": str(args.dataset_dir.resolve()),
        "questions": work.questions,
        "max_new_tokens": args.max_new_tokens,
        "teacher_forced": args.teacher_forced,
        "chunk_size": chunk_size,
        "num_shards": work.num_shards,
        "max_samples": args.max_samples,
        "quant": args.quant,
        "num_event_frames": args.num_event_frames,
        "num_frames": args.num_frames,
        "frame_pick": args.frame_pick,
        # split mode, canvas and frame count of the event PNGs EventGPT reads (preprocess_event_images.py)
        "event_frames": event_frame_settings(args),
        "egpt_dtype": str(dtypes.get("eventgpt", args.egpt_dtype)).removeprefix("torch."),
        "vl_dtype": str(dtypes.get("video_llava", args.vl_dtype)).removeprefix("torch."),
        "vision_tower": getattr(args, "vision_tower", None),  # EventGPT's CLIP tower override (None: its config's)
        "target_layers_flag": args.target_layers,  # the ids it resolved to: manifest["target_layers"]
        "num_clips": len(work.clips),
        "num_planned_samples": num_planned,
        "dtypes": {k: str(d).removeprefix("torch.") for k, (d, _) in CHUNK_KEYS.items()},
        "shapes": {k: s for k, (_, s) in CHUNK_KEYS.items()},
        "hidden_is": "last decoder layer after the final norm; logits = hidden @ lm_head.T",
    }
    if args.teacher_forced:
        base["dtypes"].update({TEACHER_FORCED_KEY: "float16", FOREIGN_KEY: "int32"})
        base["shapes"].update({TEACHER_FORCED_KEY: "[N, T, D_drafter]", FOREIGN_KEY: "[N]"})
    if args.target_layers != "none":
        base["dtypes"][LAYERS_KEY] = "float16"
        base["shapes"][LAYERS_KEY] = "[N, T, K, D_target]"
    return base


def plan_work(args: argparse.Namespace, num_shards: int, shard: int) -> tuple[ShardWork, int, int]:
    """(this shard's work, samples planned over all shards, chunk size) from the data set and flags."""
    from clip_data import load_index, load_questions, plan_samples

    clips = load_index(args.dataset_dir, args.split)
    questions = load_questions(args.questions_file or args.dataset_dir, args.max_questions)
    plan = plan_samples(len(clips), len(questions), args.max_samples)
    if not plan:
        raise UserError(f"{args.dataset_dir / args.split / 'index.json'} lists no clips: nothing to extract "
                        "(choose another --split or data set)")
    chunk_size = args.chunk_size if args.chunked else len(plan)
    mine = shard_samples(plan, num_shards, shard)
    chunks = [mine[i : i + chunk_size] for i in range(0, len(mine), chunk_size)]
    work = ShardWork(shard, num_shards, clips, questions, args.dataset_dir / args.split, args.output_dir, chunks)
    return work, len(plan), chunk_size


def load_progress(work: ShardWork, base: dict[str, Any], verify: bool = False
                  ) -> tuple[dict[str, Any], dict[str, dict], list[str]]:
    """(this shard's progress record, its finished chunks by file name, damaged chunks with why).

    A chunk counts as finished when it lost no clip and its file is on disk as recorded: the size
    always, the SHA-256 when the file is at most HASH_ON_SKIP_BYTES or with `verify` (which also reads
    its sample count). Clips that failed before are retried (the data may have been fixed), and only
    this run's failures count against --max_failures.
    """
    progress = (
        read_json(work.shard_file, "shard progress file", "delete it to restart this shard")
        if work.shard_file.is_file()
        else {"chunks": [], "done": False}
    )
    progress["settings"] = {k: base[k] for k in RUN_IDENTITY}
    progress["failed"] = []
    finished, damaged = {}, []
    for c in progress["chunks"]:
        if c.get("failed_clips"):
            continue
        hash_it = verify or c["bytes"] <= HASH_ON_SKIP_BYTES
        why = chunk_problem(work.out_dir, c, hash_it, load=verify, teacher_forced=bool(base.get("teacher_forced")),
                            layers=base.get("target_layers_flag", "none") != "none")
        if why is None:
            finished[c["file"]] = c
        elif why != "missing":  # a missing one was never finished (or was deleted to redo it)
            log.warning("%s: %s; redoing it", work.out_dir / c["file"], why)
            damaged.append(f"{c['file']}: {why}")
    return progress, finished, damaged


def load_models(args: argparse.Namespace, device: torch.device, dtypes: dict[str, torch.dtype], out_dir: Path
                ) -> tuple[Any, Any, dict[str, Any]]:
    """(EventGPT, Video-LLaVA, their descriptions); refuses a folder holding other models' states."""
    egpt, vl = load_runners(args, [], (device, dtypes))
    models = {"drafter": model_description(egpt), "target": model_description(vl)}
    recorded = [out_dir / "manifest.json", *sorted(out_dir.glob("shard_*-of-*.json"))]
    for path in (p for p in recorded if p.is_file()):
        recorded_models = read_json(path, "extraction record", "delete the folder").get("models")
        if recorded_models and differing_models(recorded_models, models, dtype=True, strict=True):
            raise UserError(f"{out_dir} holds states of other models or another dtype (see {path.name}); "
                            "use a new --output_dir")
    return egpt, vl, models


def extract_chunks(egpt: Any, vl: Any, args: argparse.Namespace, work: ShardWork, todo: list[int],
                   progress: dict[str, Any]) -> ChunkLoopResult:
    """Generate and write the chunks numbered `todo`; the shard file is updated after each chunk."""
    result = ChunkLoopResult()

    def on_clip_error(clip_id: str, err: Exception) -> None:
        log.error("skipping clip %s: %s", clip_id, err)
        progress["failed"].append({"clip": clip_id, "error": str(err)})
        result.failed_clips.add(clip_id)

    bar = tqdm(total=sum(len(work.chunks[j]) for j in todo), unit="sample",
               desc=f"extract {args.split} s{work.shard}", dynamic_ncols=True, disable=None)
    try:
        _extract_loop(egpt, vl, args, work, todo, progress, result, on_clip_error, bar)
    finally:  # closed before any error line is printed, so the line does not land inside the bar
        bar.close()
    return result


def _extract_loop(egpt: Any, vl: Any, args: argparse.Namespace, work: ShardWork, todo: list[int],
                  progress: dict[str, Any], result: ChunkLoopResult, on_clip_error: Callable[[str, Exception], None],
                  bar: Any) -> None:
    clips = work.clips
    for j in todo:
        rows: dict[str, list[torch.Tensor]] = {}
        ids, clip_ids, q_idx = [], [], []
        samples = [s for s in work.chunks[j] if clips[s[0]]["id"] not in result.failed_clips]
        bar.update(len(work.chunks[j]) - len(samples))
        for batch, out in iter_batches(egpt, vl, samples, clips, work.split_dir, work.questions, args.batch_size,
                                       args.teacher_forced, args.max_new_tokens, on_clip_error):
            bar.update(len(batch))
            if len(result.failed_clips) > args.max_failures:
                result.stopped = True
                break
            if out is None:
                continue
            for k, v in out.items():
                rows.setdefault(k, []).append(v)
            ids += [f"{clips[c]['id']}#q{q}" for c, q in batch]
            clip_ids += [clips[c]["id"] for c, _ in batch]
            q_idx += [q for _, q in batch]
            bar.set_postfix(failed=len(result.failed_clips))
        if result.stopped:
            break
        if not ids:  # every clip of this chunk failed: nothing to write, a rerun retries them
            continue
        tensors = {k: torch.cat(v) for k, v in rows.items()}
        tensors["question_idx"] = torch.tensor(q_idx, dtype=torch.int32)
        entry = write_chunk(work.out_dir / chunk_name(work.shard, j), tensors, ids, clip_ids)
        lost = sorted({clips[c]["id"] for c, _ in work.chunks[j]} & result.failed_clips)
        entry.update({"shard": work.shard, "index": j, "failed_clips": lost})
        if FOREIGN_KEY in tensors:
            entry[FOREIGN_KEY] = int(tensors[FOREIGN_KEY].sum())
            result.foreign_tokens += entry[FOREIGN_KEY]
        progress["chunks"] = [c for c in progress["chunks"] if c["file"] != entry["file"]] + [entry]
        atomic_write_json(progress, work.shard_file)
        result.written += len(ids)


def exit_status(args: argparse.Namespace, work: ShardWork, result: ChunkLoopResult, already_done: int
                ) -> tuple[int, str]:
    """(0, "") or (1, why): the run stopped on failures, or this shard had work and produced nothing."""
    if result.stopped:
        return 1, (f"more than --max_failures={args.max_failures} clips failed; fix the data and rerun "
                   "(finished chunks are kept)")
    if result.written == 0 and already_done == 0 and any(work.chunks):
        num_clips = len({c for chunk in work.chunks for c, _ in chunk})
        return 1, (f"shard {work.shard} wrote no samples: all {num_clips} of its clips failed (see above), so "
                   f"{work.out_dir} holds nothing usable; fix the data and rerun")
    return 0, ""


def report(args: argparse.Namespace, work: ShardWork, result: ChunkLoopResult, already_done: int,
           manifest: dict[str, Any], progress: dict[str, Any], seconds: float) -> None:
    """The one-screen summary: samples written, skipped and failed, foreign tokens, manifest state."""
    rate = result.written / seconds if seconds > 0 and result.written else 0.0
    print(
        f"extract {args.split} shard {work.shard}/{work.num_shards}: wrote {result.written} samples in {seconds:.1f}s "
        f"({rate:.2f} samples/s), {already_done} already done, {len(result.failed_clips)} clips failed; "
        f"manifest: {manifest['num_samples']} samples, complete={manifest['complete']} -> {work.out_dir}"
    )
    if args.teacher_forced:
        total = sum(c.get(FOREIGN_KEY, 0) for c in manifest["chunks"])
        print(f"  teacher-forced pass: {result.foreign_tokens} target tokens outside the drafter's vocabulary were "
              f"fed as id 0 in this run ({total} in the whole folder; per sample in '{FOREIGN_KEY}')")
    for f in progress["failed"]:
        print(f"  failed clip {f['clip']}: {f['error']}")


def log_path(out_dir: Path, shard: int, num_shards: int) -> Path:
    """The run log: log.txt, or one per shard (log_s000.txt, ...) when several processes write."""
    return out_dir / ("log.txt" if num_shards == 1 else f"log_s{shard:03d}.txt")


def main(args: argparse.Namespace) -> int:
    checks = preflight(args)  # seconds, before minutes of model loading
    if args.dry_run:
        return dry_run_report("extract_hidden_states.py", checks, [
            f"extract split {args.split} of {args.dataset_dir} with {args.egpt_model} + {args.vl_model} "
            f"into {args.output_dir}"])
    set_seed(args.seed)
    num_shards, shard, state = resolve_shard(args)
    with RunLog(log_path(args.output_dir, shard, num_shards)):
        return extract(args, num_shards, shard, state)


def extract(args: argparse.Namespace, num_shards: int, shard: int, state: Any) -> int:
    """The run once the shard is known (main wraps it in the run log)."""
    work, num_planned, chunk_size = plan_work(args, num_shards, shard)
    # Every refusal (device, dtype, other settings in the folder) comes before the folder is created.
    device, dtypes = resolve_compute(args, str(state.device) if state is not None else None)
    base = run_settings(args, work, num_planned, chunk_size, dtypes)
    check_same_run(work.out_dir, base, RUN_IDENTITY)
    check_layers_recorded(work.out_dir, args.target_layers)
    work.out_dir.mkdir(parents=True, exist_ok=True)

    progress, finished, damaged = load_progress(work, base, args.verify)
    todo = [j for j in range(len(work.chunks)) if chunk_name(shard, j) not in finished]
    already_done = sum(c["num_samples"] for c in finished.values())
    if already_done:
        log.info("resuming: %d of %d chunks of shard %d already finished", len(work.chunks) - len(todo),
                 len(work.chunks), shard)
    egpt = vl = None
    if todo:
        egpt, vl, base["models"] = load_models(args, device, dtypes, work.out_dir)
        base["widths"] = {"drafter": egpt.hidden_size, "target": vl.hidden_size}
        ids = resolve_target_layers(args.target_layers, vl.num_layers)
        vl.capture_layers(ids)  # the same generation returns them (no second forward)
        base["target_layers"] = layer_record(args.target_layers, ids, vl.num_layers)
        # Recorded per shard, so the merged manifest names the models even if a shard had no work.
        progress["models"], progress["widths"] = base["models"], base["widths"]
        progress["target_layers"] = base["target_layers"]

    start = time.perf_counter()
    result = extract_chunks(egpt, vl, args, work, todo, progress)
    status, why = exit_status(args, work, result, already_done)
    progress["done"] = status == 0
    atomic_write_json(progress, work.shard_file)
    if state is not None:
        state.wait_for_everyone()
    manifest = merge_manifest(work.out_dir, {**base, "format_version": FORMAT_VERSION})
    report(args, work, result, already_done, manifest, progress, time.perf_counter() - start)
    if damaged:
        print(f"  {len(damaged)} finished chunk(s) were damaged and redone: " + "; ".join(damaged))
    if why:
        print(f"error: {why}")  # last, after the failed clips it refers to
    return status


if __name__ == "__main__":
    run_cli(main, parse_args)
