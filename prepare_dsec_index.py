"""Write the clip index every stage reads (`{split}/index.json`, `questions.json`) for real DSEC data.

From DSEC as downloaded (`--dsec_root`): each recording is cut into `--clip_s` windows. A window
becomes a clip when it holds at least `--min_events` events and `--min_frames` rectified frames; every
other window is counted in the summary, never silently left out. Both folder layouts are read:

    ROOT/train_events/{seq}/events/left/{events.h5,rectify_map.h5}      the unpacked download's names
    ROOT/train_images/{seq}/images/left/rectified/000000.png ...        (test_events/, test_images/ alike)
    ROOT/train/{seq}/events/left/events.h5, ROOT/train/{seq}/images/...  or one {train,test}/{seq} tree

with the frame times in `{seq}_image_timestamps.txt` (up to three folders below ROOT) or
`{seq}/images/timestamps.txt`.
Windows start at the first frame's time and are cut on the event clock (t relative to t_offset);
`ms_to_idx` gives each window's event range without reading any event. Events stay in the h5 and are
read lazily by that range (the record's event_h5 + event_range; a per-clip copy would store DSEC's
compressed events again uncompressed, several times their size). `--rectify_events` makes readers map
event coordinates through the recording's rectify_map.h5. The frames of a window are encoded into one
mp4 per clip (PyAV; no ffmpeg needed), which is what Video-LLaVA's loader reads; the record lists the
PNGs it came from. Validation: `--val_sequences` whole train sequences (no scene in both splits).

    # DSEC as downloaded, the reference's question list
    python prepare_dsec_index.py --dsec_root data/dsec_download --output_dir data/dsec \\
        --questions top50_questions.json --val_sequences 4
    # the toy world's recordings (make_toy_world.py --layout dsec), CPU, seconds
    python prepare_dsec_index.py --dsec_root data/toy_dsec/dsec --output_dir data/toy_dsec/dataset

Clip files instead (`--dataset_dir`, the older per-clip layout): pairs DIR/{split}/event_npy/{seq}/{clip}.npy
with DIR/{split}/mp4/{seq}/{clip}.mp4 by name and indexes the pairs.

    python prepare_dsec_index.py --dataset_dir data/dsec --split train --val_sequences 5
    python prepare_dsec_index.py --dataset_dir data/toy/dataset --split test --output_dir /tmp/index_check
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cli import add_config_flag, alias_help, parse_with_config, run_cli
from clip_data import (
    DEFAULT_QUESTIONS,
    SPLITS,
    encode_mp4,
    load_questions,
    pick_codec,
    read_recording_header,
    read_rectify_map,
    read_rgb,
)
from common import UserError, atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger("xmodal_sd.prepare")
INDEX_FORMAT = "xmodal_sd.clip_index"
INDEX_VERSION = 2  # 2: clips cut from DSEC recordings (event_h5 + event_range)
DSEC_SPLITS = ("train", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (pick one)")
    src.add_argument("--dsec_root", type=Path, default=None,
                     help="DSEC as downloaded: {train,test}_events/ + {train,test}_images/, or {train,test}/{seq}/")
    src.add_argument("--dataset_dir", type=Path, default=None,
                     help="per-clip files: a root holding {split}/event_npy and {split}/mp4")
    p.add_argument("--output_dir", "--output", dest="output_dir", type=Path, default=None,
                   help=alias_help("where {split}/index.json, mp4/ and questions.json go (needed with --dsec_root; "
                                  "default with --dataset_dir: that folder)", "--output"))
    p.add_argument("--split", choices=list(SPLITS), default=None,
                   help="with --dataset_dir: which split's files to index (required there)")
    p.add_argument("--clip_s", "--duration_s", dest="clip_s", type=float, default=1.0,
                   help=alias_help("clip length in seconds (the reference used 1 s)", "--duration_s"))
    p.add_argument("--min_frames", type=int, default=8,
                   help="with --dsec_root: a window needs this many frames (Video-LLaVA samples 8)")
    p.add_argument("--min_events", type=int, default=1, help="with --dsec_root: a window needs this many events")
    p.add_argument("--rectify_events", action="store_true",
                   help="with --dsec_root: readers map event coordinates through rectify_map.h5 (DSEC's events "
                        "are in raw sensor coordinates, its frames rectified)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="with --dsec_root: processes encoding the clip videos (default min(4, CPUs); 0: this one)")
    p.add_argument("--max_clips", type=int, default=None, help="with --dsec_root: index at most N clips per split")
    p.add_argument("--events_glob", default="event_npy/*/*.np[yz]",
                   help="with --dataset_dir: event files relative to the split folder; the parent is the sequence")
    p.add_argument("--video_pattern", default="mp4/{seq}/{clip}.mp4",
                   help="with --dataset_dir: video of a clip relative to the split folder ({seq}, {clip} filled in)")
    p.add_argument("--height", type=int, default=480,
                   help="event sensor height in pixels (DSEC: 480; --dsec_root reads it from rectify_map.h5)")
    p.add_argument("--width", type=int, default=640,
                   help="event sensor width in pixels (DSEC: 640; --dsec_root reads it from rectify_map.h5)")
    p.add_argument("--questions", "--questions_file", dest="questions", type=Path, default=None,
                   help=alias_help("questions JSON ([{question, count}] or a list of strings) copied to "
                                  "questions.json (default: keep an existing one, else the shipped "
                                  "configs/questions_driving.json)", "--questions_file"))
    p.add_argument("--val_sequences", type=int, default=None,
                   help="move this many whole train sequences (seeded choice) into a val split (default: "
                        "--dsec_root: one in ten, at least 1 when there are 2 or more; --dataset_dir: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation sequence choice")
    add_config_flag(p)
    args = parse_with_config(p, argv)
    if (args.dsec_root is None) == (args.dataset_dir is None):
        p.error("pass exactly one of --dsec_root (DSEC recordings) and --dataset_dir (per-clip files)")
    if args.dsec_root is not None and args.output_dir is None:
        p.error("--dsec_root needs --output_dir (the data set folder the stages read)")
    if args.dataset_dir is not None and args.split is None:
        p.error("--dataset_dir needs --split")
    if args.dataset_dir is not None and args.val_sequences and args.split != "train":
        p.error("--val_sequences works with --split train only")
    if args.val_sequences is not None and args.val_sequences < 0:
        p.error("--val_sequences takes a count >= 0")
    whole_ms = abs(args.clip_s * 1000 - round(args.clip_s * 1000)) < 1e-6  # 1.001 * 1000 is 1000.99999...
    if args.height <= 0 or args.width <= 0 or args.clip_s <= 0 or not whole_ms:
        p.error("--height, --width and --clip_s must be positive; --clip_s a whole number of milliseconds")
    if args.num_workers < 0:
        p.error("--num_workers must be >= 0")
    if args.min_frames < 1 or args.min_events < 0 or (args.max_clips is not None and args.max_clips < 1):
        p.error("--min_frames must be >= 1, --min_events >= 0, --max_clips >= 1")
    for flag in ("dsec_root", "dataset_dir"):
        path = getattr(args, flag)
        if path is not None and not path.is_dir():
            p.error(f"--{flag} {path} is not a folder")
    if args.questions is not None and not args.questions.is_file():
        p.error(f"--questions {args.questions} is not a file")
    return args


# --------------------------------------------------------------------------------------------------
# DSEC recordings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """One DSEC sequence: where its events, rectify map, rectified frames and frame times are."""

    split: str
    name: str
    events_h5: Path
    rectify_map: Path | None
    frames_dir: Path | None
    timestamps: Path | None


def find_recordings(root: Path) -> tuple[list[Recording], list[str]]:
    """Every {train,test} sequence under a DSEC root, in either layout; returns (recordings, problems)."""
    recordings, problems = [], []
    # Up to three folders deep (not a walk through every PNG of the download).
    found = [p for depth in range(4) for p in root.glob("*/" * depth + "*_image_timestamps.txt")]
    stamp_files = {p.name[: -len("_image_timestamps.txt")]: p for p in sorted(found)}
    for split in DSEC_SPLITS:
        event_roots = [root / split, root / f"{split}_events"]
        image_roots = [root / split, root / f"{split}_images"]
        seen: set[str] = set()
        for ev_root in event_roots:
            for h5 in sorted(ev_root.glob("*/events/left/events.h5")):
                seq = h5.parents[2].name
                if seq in seen:
                    continue
                seen.add(seq)
                frames_dir = next((r / seq / "images" / "left" / "rectified" for r in image_roots
                                   if (r / seq / "images" / "left" / "rectified").is_dir()), None)
                stamps = stamp_files.get(seq) or next(
                    (r / seq / "images" / "timestamps.txt" for r in image_roots
                     if (r / seq / "images" / "timestamps.txt").is_file()), None)
                rmap = h5.parent / "rectify_map.h5"
                rec = Recording(split, seq, h5, rmap if rmap.is_file() else None, frames_dir, stamps)
                if frames_dir is None:
                    problems.append(f"{split}/{seq}: no images/left/rectified folder (download {split}_images)")
                elif stamps is None:
                    problems.append(f"{split}/{seq}: no {seq}_image_timestamps.txt or images/timestamps.txt")
                else:
                    recordings.append(rec)
    if not recordings and not problems:
        raise UserError(f"no DSEC recording ({{train,test}}_events/{{seq}}/events/left/events.h5 or "
                        f"{{train,test}}/{{seq}}/events/left/events.h5) under {root}; point --dsec_root at the "
                        "folder the download was unpacked into")
    return recordings, problems


def read_timestamps(path: Path) -> np.ndarray:
    """Frame times [K] int64 us (absolute, DSEC's clock) from a timestamps file, one per line."""
    try:
        stamps = np.loadtxt(path, dtype=np.int64, comments="#", ndmin=1)
    except ValueError as err:
        raise UserError(f"{path}: not one integer time (us) per line ({err})") from err
    if stamps.ndim != 1 or (np.diff(stamps) <= 0).any():
        raise UserError(f"{path}: frame times must be one increasing integer (us) per line")
    return stamps


def frames_before_events(frame_times: np.ndarray) -> int:
    """How many of a recording's frames (times relative to t_offset, increasing) come before its first event
    time, t_offset: a window cannot start there, since ms_to_idx has no negative milliseconds."""
    return int(np.searchsorted(frame_times, 0, side="left"))


def cut_windows(ms_to_idx: np.ndarray, frame_times: np.ndarray, clip_us: int) -> list[dict[str, Any]]:
    """The clip windows of one recording, before any filtering.

    frame_times [K] are relative to t_offset. Windows are [t0 + i * clip_us, t0 + (i + 1) * clip_us) with
    t0 the time of the first frame at or after t_offset floored to the millisecond, as long as ms_to_idx
    covers the window's end (ms_to_idx[m] is the first event with t >= m ms). Frames before t_offset come
    before the event stream (ms_to_idx starts at 0 ms): no window holds them (`frames_before_events` counts
    them). Each window: t0_us, t1_us, event_range, frame indices (the frames whose times fall inside it).
    """
    first = frames_before_events(frame_times)
    if first == frame_times.size:
        return []
    start_ms, clip_ms = int(frame_times[first] // 1000), clip_us // 1000
    last_ms = len(ms_to_idx) - 1
    windows = []
    i = 0
    while start_ms + (i + 1) * clip_ms <= last_ms:
        a_ms, b_ms = start_ms + i * clip_ms, start_ms + (i + 1) * clip_ms
        lo, hi = np.searchsorted(frame_times, [a_ms * 1000, b_ms * 1000], side="left")
        windows.append({"t0_us": a_ms * 1000, "t1_us": b_ms * 1000,
                        "event_range": [int(ms_to_idx[a_ms]), int(ms_to_idx[b_ms])],
                        "frames": list(range(int(lo), int(hi)))})
        i += 1
    return windows


@dataclass(frozen=True)
class VideoJob:
    """One clip's mp4, to be encoded from its rectified PNGs."""

    pngs: tuple[Path, ...]
    fps: int
    codec: str
    video: Path


def encode_clip(job: VideoJob) -> str:
    """Encode one clip's mp4 (in a worker process); returns its path."""
    atomic_write_bytes(encode_mp4(np.stack([read_rgb(p) for p in job.pngs]), job.fps, job.codec), job.video)
    return str(job.video)


def index_recording(rec: Recording, out_split: Path, args: argparse.Namespace, codec: str,
                    counts: dict[str, int], reuse: bool, jobs: list[VideoJob]) -> list[dict[str, Any]]:
    """Cut one recording into clips; return the records and append the mp4s to encode to `jobs`.

    With `reuse` (the folder was cut with the same settings before) an existing mp4 is kept; otherwise
    it is encoded again and the clip's old event frames are removed, since a clip of the same name may
    now be another window (another --clip_s) or another file's (the toy world's own clips).
    """
    header = read_recording_header(rec.events_h5)
    t_offset = header["t_offset"]
    frame_times = read_timestamps(rec.timestamps) - t_offset
    pngs = sorted(rec.frames_dir.glob("*.png"))
    if len(pngs) != len(frame_times):
        raise UserError(f"{rec.frames_dir}: {len(pngs)} PNG frames but {len(frame_times)} times in {rec.timestamps}")
    height, width = args.height, args.width
    if rec.rectify_map is not None:
        height, width = read_rectify_map(rec.rectify_map).shape[:2]
    elif args.rectify_events:
        raise UserError(f"--rectify_events: {rec.events_h5.parent} has no rectify_map.h5 (download {rec.split}_events)")
    clip_us = round(args.clip_s * 1e6)

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, out_split)).as_posix()

    records = []
    counts["frames_before_events"] += frames_before_events(frame_times)
    for i, win in enumerate(cut_windows(header["ms_to_idx"], frame_times, clip_us)):
        counts["windows"] += 1
        n_events = win["event_range"][1] - win["event_range"][0]
        if n_events < max(args.min_events, 1):
            counts["dropped_few_events"] += 1
            continue
        if len(win["frames"]) < args.min_frames:
            counts["dropped_few_frames"] += 1
            continue
        clip = f"{i:06d}"
        rel_video = f"mp4/{rec.name}/{clip}.mp4"
        video = out_split / rel_video
        n = len(win["frames"])
        fps = max(1, round(n / args.clip_s))
        if not reuse:
            for stale in (out_split / "event_image" / rec.name).glob(f"{clip}_*.png"):
                stale.unlink()
        if not (reuse and video.is_file() and video.stat().st_size > 0):
            jobs.append(VideoJob(tuple(pngs[k] for k in win["frames"]), fps, codec, video))
        records.append({
            "id": f"{rec.name}/{clip}", "sequence": rec.name, "clip": clip,
            "event_h5": rel(rec.events_h5), "event_range": win["event_range"],
            "t0_us": win["t0_us"], "t_offset_us": t_offset, "duration_s": args.clip_s,
            "rectify_map": rel(rec.rectify_map) if args.rectify_events else None,
            "video": rel_video, "frames": [rel(pngs[k]) for k in win["frames"]],
            "frame_times_us": [int(frame_times[k]) for k in win["frames"]],
            "fps": fps, "num_video_frames": n, "num_events": n_events,
            "event_image_prefix": f"event_image/{rec.name}/{clip}",
            "height": int(height), "width": int(width), "meta": {},
        })
        if args.max_clips is not None and counts["clips_" + rec.split] + len(records) >= args.max_clips:
            break
    counts["clips_" + rec.split] += len(records)
    return records


def cut_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides a clip's window, video and event frames (recorded in clip_index.json; a change re-encodes
    the videos and removes the event frames)."""
    return {"dsec_root": str(Path(args.dsec_root).resolve()), "clip_s": args.clip_s, "min_frames": args.min_frames,
            "min_events": args.min_events, "rectify_events": args.rectify_events}


def default_val_count(num_sequences: int) -> int:
    return max(1, num_sequences // 10) if num_sequences >= 2 else 0


def prepare_native(args: argparse.Namespace) -> tuple[dict[str, list], dict[str, int], list[str]]:
    recordings, problems = find_recordings(args.dsec_root)
    counts = {"windows": 0, "dropped_few_events": 0, "dropped_few_frames": 0, "frames_before_events": 0,
              "videos_written": 0, "clips_train": 0, "clips_test": 0, "recordings_skipped": len(problems)}
    codec = pick_codec()
    previous = args.output_dir / "clip_index.json"
    previous = read_json(previous, "clip index summary", "delete it") if previous.is_file() else {}
    reuse = isinstance(previous, dict) and all(previous.get(k) == v for k, v in cut_settings(args).items())
    by_split: dict[str, list] = {s: [] for s in DSEC_SPLITS}
    jobs: list[VideoJob] = []
    for rec in tqdm(recordings, desc="recordings", unit="seq"):
        if args.max_clips is not None and counts["clips_" + rec.split] >= args.max_clips:
            continue
        by_split[rec.split] += index_recording(rec, args.output_dir / rec.split, args, codec, counts, reuse, jobs)
    with tqdm(total=len(jobs), desc="clip videos", unit="clip") as bar:
        if args.num_workers == 0 or len(jobs) <= 1:
            for job in jobs:
                encode_clip(job)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=args.num_workers) as pool:
                for future in as_completed([pool.submit(encode_clip, job) for job in jobs]):
                    future.result()  # a failed encode stops the run: the index is not written yet
                    bar.update(1)
    counts["videos_written"] = len(jobs)
    train_seqs = sorted({r["sequence"] for r in by_split["train"]})
    n_val = default_val_count(len(train_seqs)) if args.val_sequences is None else args.val_sequences
    splits = {"train": by_split["train"], "val": [], "test": by_split["test"]}
    if n_val:
        splits["train"], splits["val"] = split_off_validation(by_split["train"], n_val, args.seed)
    return splits, counts, problems


# --------------------------------------------------------------------------------------------------
# Per-clip files
# --------------------------------------------------------------------------------------------------


def find_clips(split_dir: Path, events_glob: str, video_pattern: str, height: int, width: int,
               duration_s: float, rel_prefix: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """Records for every event file with a video; returns (records sorted by id, problems)."""
    records, problems = [], []
    for npy in sorted(split_dir.glob(events_glob)):
        seq, clip = npy.parent.name, npy.stem
        video = video_pattern.format(seq=seq, clip=clip)
        if not (split_dir / video).is_file():
            problems.append(f"{npy}: no video at {split_dir / video}")
            continue
        if npy.stat().st_size == 0:
            problems.append(f"{npy}: empty event file")
            continue
        records.append({
            "id": f"{seq}/{clip}", "sequence": seq, "clip": clip,
            "event_npy": rel_prefix + npy.relative_to(split_dir).as_posix(),
            "video": rel_prefix + video,
            "event_image_prefix": f"{rel_prefix}event_image/{seq}/{clip}",
            "height": height, "width": width, "duration_s": duration_s, "t0_us": 0, "meta": {},
        })
    return records, problems


PATH_KEYS = ("event_npy", "event_h5", "rectify_map", "video", "event_image_prefix")


def _rebase(rec: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The record with every relative path (frames too) prefixed, for an index in another folder."""
    out = {**rec, **{k: prefix + rec[k] for k in PATH_KEYS if rec.get(k)}}
    if "frames" in rec:
        out["frames"] = [prefix + f for f in rec["frames"]]
    return out


def split_off_validation(records: list[dict[str, Any]], count: int, seed: int) -> tuple[list, list]:
    """Move `count` whole sequences (seeded choice) from train to val; paths stay in the train folder."""
    sequences = sorted({r["sequence"] for r in records})
    if count >= len(sequences):
        raise UserError(f"--val_sequences {count} leaves no training sequence (only {len(sequences)} found)")
    chosen = set(random.Random(seed).sample(sequences, count))
    train = [r for r in records if r["sequence"] not in chosen]
    val = [_rebase(r, "../train/") for r in records if r["sequence"] in chosen]
    return train, val


def prepare_clip_files(args: argparse.Namespace) -> tuple[dict[str, list], dict[str, int], list[str]]:
    split_dir = args.dataset_dir / args.split
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist; point --dataset_dir at the folder holding {args.split}/")
    out = args.output_dir or args.dataset_dir
    records, problems = find_clips(split_dir, args.events_glob, args.video_pattern, args.height, args.width,
                                   args.clip_s)
    if args.output_dir:  # an index outside the data folder must point back into it
        records = [_rebase(r, os.path.relpath(split_dir, out / args.split) + "/") for r in records]
    if not records:
        raise UserError(f"no clip with both an event file ({args.events_glob}) and a video ({args.video_pattern}) "
                        f"under {split_dir}; check the layout or pass --events_glob / --video_pattern")
    splits = {args.split: records}
    if args.val_sequences:
        splits["train"], splits["val"] = split_off_validation(records, args.val_sequences, args.seed)
    return splits, {f"clips_{args.split}": len(records)}, problems


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    out = args.output_dir or args.dataset_dir
    # Everything that can be refused is checked before the first file is written.
    questions_src = args.questions
    if questions_src is None and not (out / "questions.json").is_file():
        questions_src = DEFAULT_QUESTIONS
    if questions_src is not None:
        num_questions = len(load_questions(questions_src))
    native = args.dsec_root is not None
    splits, counts, problems = prepare_native(args) if native else prepare_clip_files(args)
    if native and not any(splits.values()):
        raise UserError(f"no clip under {args.dsec_root} has >= {args.min_frames} frames and >= "
                        f"{max(args.min_events, 1)} events in a {args.clip_s} s window ({counts['windows']} windows, "
                        f"{counts['dropped_few_frames']} with too few frames, {counts['dropped_few_events']} with "
                        "too few events)")
    for name, recs in splits.items():
        atomic_write_json(recs, out / name / "index.json")
        log.info("%s: %d clips from %d sequences -> %s", name, len(recs),
                 len({r["sequence"] for r in recs}), out / name / "index.json")
    if questions_src is not None:
        atomic_write_bytes(Path(questions_src).read_bytes(), out / "questions.json")
        log.info("questions: %d from %s -> %s", num_questions, questions_src, out / "questions.json")
    if native:
        atomic_write_json({"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "writer": "prepare_dsec_index.py",
                           **cut_settings(args),
                           "val_sequences": sorted({r["sequence"] for r in splits["val"]}), "seed": args.seed,
                           "counts": counts, "skipped_recordings": problems,
                           "splits": {k: len(v) for k, v in splits.items()}}, out / "clip_index.json")
        print(f"{'split':<6} {'sequences':>9} {'clips':>6}")
        for name, recs in splits.items():
            print(f"{name:<6} {len({r['sequence'] for r in recs}):>9} {len(recs):>6}")
        print(f"windows {counts['windows']}: indexed {sum(map(len, splits.values()))}, dropped "
              f"{counts['dropped_few_events']} for too few events (< {max(args.min_events, 1)}), "
              f"{counts['dropped_few_frames']} for too few frames (< {args.min_frames}); skipped "
              f"{counts['frames_before_events']} frames before the first event (t_offset); "
              f"{counts['videos_written']} mp4 written; skipped {len(problems)} recordings")
    else:
        print(f"indexed {len(splits[args.split])} clips, skipped {len(problems)}")
    for line in problems[:20]:
        print(f"  skipped: {line}")
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more")
    return 0


if __name__ == "__main__":
    run_cli(main, parse_args)
